"""What a router returns: who answers each instance.

Every router answers one question, "who answers these instances?", with an :class:`Assignment`: one
:class:`Answerer` per instance (an expert, the plain backbone, or a mixture of experts an in-model router mixes
token by token) and the decisions it recorded on the way. RoE, kNN, centroid and trained routers give every
instance the task's expert; per-instance routing gives each its own; Arrow gives mixtures. An engine
(``inference.engine``) answers assignments, so no caller needs to know which kind of router made one.

Torch-free: the CLI and the server build assignments for named experts without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from elmreg.registry.entities import Expert, ExpertTally, RoutingVote
from elmreg.registry.errors import UserError
from elmreg.registry.kinds import get_expert_kind, weights_kind


@dataclass(frozen=True)
class RoutingDecision:
    """The outcome of one RoE run, as recorded in ``routing_decisions`` / ``routing_votes``."""

    decision_id: int | None
    chosen_expert_id: int | None
    chosen_expert_name: str | None
    library_version: int
    q: int
    top_k: int
    latency_ms: float
    tallies: list[ExpertTally] = field(default_factory=list)
    votes: list[RoutingVote] = field(default_factory=list)
    router: str = "roe"
    router_params: dict[str, Any] = field(default_factory=dict)
    # The embedder that embedded the queries and whose library entries were searched (None: an in-model router).
    embedder: str | None = None
    # An in-model router's experts, mixed inside the model for the answers (ids); empty for the others.
    mixture: tuple[int, ...] = ()

    @property
    def margin(self) -> int:
        """Votes of the winner minus votes of the runner-up (0 for a tie broken by similarity); the runner-up
        is the second in the router's ranking (by weight, for weighted routers)."""
        if not self.tallies:
            return 0
        runner_up = self.tallies[1].votes if len(self.tallies) > 1 else 0
        return self.tallies[0].votes - runner_up


@dataclass(frozen=True)
class Mixture:
    """Experts mixed inside the model (Arrow): every token goes to its ``top_k`` best-aligned experts."""

    experts: tuple[Expert, ...]
    top_k: int
    temperature: float

    @property
    def key(self) -> tuple:
        return ("mixture", tuple(e.id for e in self.experts), self.top_k, self.temperature)


@dataclass(frozen=True)
class Answerer:
    """Who answers one instance: ``expert`` (None: the plain backbone), or ``mixture`` (then ``expert`` is the
    mixture's expert with the most routing mass, the one the decision records as chosen). ``decision_id`` is
    the routing decision that chose it (None: named by the caller)."""

    expert: Expert | None = None
    mixture: Mixture | None = None
    decision_id: int | None = None

    @property
    def key(self) -> tuple:
        """Identifies what runs: instances with equal keys run the same weights."""
        if self.mixture is not None:
            return self.mixture.key
        return ("expert", self.expert.id) if self.expert is not None else ("base",)

    @property
    def mixable(self) -> bool:
        """Whether rows for this answerer can share a forward pass with rows for other experts (PEFT's
        per-row ``adapter_names``): the plain backbone and mixable kinds (LoRA); not a mixture, which takes
        every resident adapter under its own router."""
        if self.mixture is not None:
            return False
        return self.expert is None or get_expert_kind(weights_kind(self.expert)).mixable

    @property
    def backbone_id(self) -> int | None:
        if self.mixture is not None:
            return self.mixture.experts[0].backbone_id
        return self.expert.backbone_id if self.expert is not None else None

    @property
    def label(self) -> str:
        return self.expert.name if self.expert is not None else "base"


BASE = Answerer()


@dataclass(frozen=True)
class Assignment:
    """One :class:`Answerer` per instance, in input order, and the routing decisions that chose them (none when
    the caller named the expert)."""

    answerers: tuple[Answerer, ...]
    decisions: tuple[RoutingDecision, ...] = field(default=())

    @classmethod
    def fixed(
        cls, expert: Expert | None, count: int, *, decision: RoutingDecision | None = None
    ) -> Assignment:
        """Every one of ``count`` instances answered by ``expert`` (None: the plain backbone)."""
        answerer = Answerer(expert, decision_id=decision.decision_id if decision is not None else None)
        return cls((answerer,) * count, (decision,) if decision is not None else ())

    def __len__(self) -> int:
        return len(self.answerers)

    @property
    def decision(self) -> RoutingDecision | None:
        """The one decision behind every answer (None: none, or one per instance)."""
        return self.decisions[0] if len(self.decisions) == 1 else None

    def experts_chosen(self) -> dict[str, int]:
        """Instances per answering expert's name (``base`` for the backbone), most first."""
        counts: dict[str, int] = {}
        for answerer in self.answerers:
            counts[answerer.label] = counts.get(answerer.label, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def backbone_id(self) -> int | None:
        """The backbone every expert of the assignment is on (None: only the plain backbone answers).

        Raises:
            UserError: Experts of several backbones (an engine runs one backbone).
        """
        ids = {a.backbone_id for a in self.answerers if a.backbone_id is not None}
        if len(ids) > 1:
            raise UserError("the experts of one call must share a backbone; split the instances by backbone")
        return ids.pop() if ids else None

    def details(self) -> dict[str, Any]:
        """What an evaluation records about how its answers were chosen."""
        decision = self.decision
        if decision is None:
            ids = [d.decision_id for d in self.decisions if d.decision_id is not None]
            return {"experts": self.experts_chosen(), "decision_ids": [min(ids), max(ids)] if ids else []}
        if self.answerers and self.answerers[0].mixture is not None:
            return {
                "decision_id": decision.decision_id,
                "mass": {t.expert_name: round(t.strength, 3) for t in decision.tallies},
            }
        return {"decision_id": decision.decision_id, "votes": decision.tallies[0].votes}


def assign_each(experts: Sequence[Expert | None]) -> Assignment:
    """Each instance answered by its own named expert (None: the plain backbone)."""
    return Assignment(tuple(Answerer(e) for e in experts))
