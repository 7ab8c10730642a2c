"""Compositional instructions: merge the K experts RoE votes for most, and use the merged expert.

An instruction that combines skills ("summarise and translate") retrieves library samples of several experts.
Composition takes the K most voted distinct experts of one routing decision, merges them by task arithmetic
with equal weights (the paper's λ_i = 1/N), and records on the decision that it composed and which experts.
Parents are sorted by id, so the same set of experts is the same merge whatever their vote order, and is found
in the catalogue instead of being merged again. Composed experts get no library entries of their own: they
would only duplicate their parents' samples and change what RoE retrieves for everyone else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from elmreg.merging.pipeline import merge_experts
from elmreg.registry.entities import Expert
from elmreg.registry.errors import UserError
from elmreg.registry.kinds import weights_kind
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext


class _Tally(Protocol):
    expert_id: int
    votes: int


class _Decision(Protocol):
    """What composition reads from ``inference.router.RoutingDecision``."""

    decision_id: int | None
    tallies: Sequence[_Tally]


@dataclass(frozen=True)
class Composition:
    """The expert to run for a composed decision.

    Attributes:
        expert: The merged expert (or the winner alone when no second expert could be composed with it).
        parents: The experts composed, most voted first.
        composed: Whether a merged expert is used.
        reused: Whether the merged expert already existed.
        details: What was recorded in ``routing_decisions.details["compose"]``.
    """

    expert: Expert
    parents: list[Expert]
    composed: bool
    reused: bool
    details: dict[str, Any]


def compose(
    context: RegistryContext, decision: _Decision, k: int, *, reporter: Reporter = SILENT
) -> Composition:
    """Merge the ``k`` most voted experts of ``decision`` (cached) and record it on the decision.

    Experts that cannot be merged with the winner (another kind or backbone) are passed over and listed as
    skipped. With fewer than two mergeable experts among the votes, the winner alone is used and the decision
    records why.

    Raises:
        UserError: ``k`` below 2.
    """
    if k < 2:
        raise UserError(f"--compose needs K of at least 2 (the number of experts to merge), got {k}")
    winner = context.catalogue.get_expert(decision.tallies[0].expert_id)
    chosen, skipped = [winner], []
    for tally in decision.tallies[1:]:
        if len(chosen) == k:
            break
        candidate = context.catalogue.get_expert(tally.expert_id)
        if (
            candidate.status == "ready"
            and candidate.backbone_id == winner.backbone_id
            and weights_kind(candidate) == weights_kind(winner)
        ):
            chosen.append(candidate)
        else:
            skipped.append(candidate.name)
    votes = {t.expert_id: t.votes for t in decision.tallies}
    details: dict[str, Any] = {
        "k": k,
        "experts": [e.id for e in chosen],
        "expert_names": [e.name for e in chosen],
        "votes": [votes[e.id] for e in chosen],
        "skipped": skipped,
    }
    if len(chosen) < 2:
        details |= {
            "composed": False,
            "reason": "no second expert that can be merged with the winner got votes",
        }
        expert, reused = winner, False
    else:
        result = merge_experts(
            context,
            [e.id for e in sorted(chosen, key=lambda e: e.id)],
            method="task_arithmetic",
            library="none",
            reporter=reporter,
        )
        expert, reused = result.expert, result.reused
        details |= {
            "composed": True,
            "merged_expert_id": expert.id,
            "merged_expert": expert.name,
            "method": "task_arithmetic",
            "reused": reused,
        }
    if decision.decision_id is not None:
        context.library.annotate_decision(decision.decision_id, {"compose": details})
    return Composition(expert, chosen, len(chosen) >= 2, reused, details)
