"""Retrieval-of-Experts (RoE) in SQL, with an audit row for every decision.

The paper's RoE: format Q unlabeled instances of the target task like the library samples, embed them, find each
one's maximum-inner-product library entry, and use the expert retrieved most often. Here that is one SQL
statement: the Q query vectors go in as one ``vector[]`` parameter, ``unnest`` turns them into rows, a
``CROSS JOIN LATERAL`` asks the embedder's HNSW index for each query's nearest entries, and the votes are counted
in the same statement. Ties go to the expert with the higher summed similarity of its votes, then to the lower
expert id, so a decision is deterministic.

A decision can be pinned to a library version: only experts added at or before it and not retired by then are
candidates, so a decision made at version v is reproduced exactly after new experts were added.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from elmreg.registry.context import RegistryContext
from elmreg.registry.embedder import Embedder, load_embedder
from elmreg.registry.errors import NotFoundError, UserError
from elmreg.registry.prompts import PromptedExample, library_text
from elmreg.registry.store.entities import ExpertTally, RoutingDecisionRecord, RoutingVote, VoteResult

# HNSW returns approximate neighbours from a candidate list of ef_search entries (the routing_ef_search
# setting). Queries whose candidates are all hidden by the filters (kinds, backbone, library version) are searched
# further by the library store, so the list size trades speed for recall only.
DEFAULT_EF_SEARCH = 100

T = TypeVar("T")


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

    @property
    def margin(self) -> int:
        """Votes of the winner minus votes of the runner-up (0 for a tie broken by similarity)."""
        if not self.tallies:
            return 0
        runner_up = self.tallies[1].votes if len(self.tallies) > 1 else 0
        return self.tallies[0].votes - runner_up


def sample_queries(queries: Sequence[T], q: int | None, *, seed: int = 0) -> list[T]:
    """The Q instances RoE routes on: all of them for ``q`` None or ``len(queries)``, else a seeded sample in
    their original order (so a decision is reproducible).

    Raises:
        UserError: No queries, or Q < 1 or larger than the number given.
    """
    if not queries:
        raise UserError("routing needs at least one input instance")
    if q is None or q == len(queries):
        return list(queries)
    if q < 1:
        raise UserError(f"Q must be at least 1, got {q}")
    if q > len(queries):
        raise UserError(
            f"Q={q} is larger than the {len(queries)} instance(s) given; pass fewer or use --q {len(queries)}"
        )
    chosen = sorted(np.random.default_rng(seed).choice(len(queries), size=q, replace=False))
    return [queries[i] for i in chosen]


def rank_tallies(tallies: Sequence[ExpertTally]) -> list[ExpertTally]:
    """RoE's vote: most votes first; ties to the larger summed similarity, then the lower expert id."""
    return sorted(tallies, key=lambda t: (-t.votes, -t.score_sum, t.expert_id))


def exact_vote(similarities: np.ndarray, owners: Sequence[tuple[int, str]]) -> list[ExpertTally]:
    """RoE's vote over exact (not indexed) nearest entries, for experiments outside the catalogue.

    Args:
        similarities: ``(queries, entries)`` inner products.
        owners: ``(expert id, expert name)`` of each entry.
    """
    tallies: dict[tuple[int, str], list[float]] = {}
    for row in similarities:
        best = int(np.argmax(row))
        tallies.setdefault(tuple(owners[best]), []).append(float(row[best]))
    return rank_tallies([ExpertTally(i, name, len(s), sum(s)) for (i, name), s in tallies.items()])


def _search_details(result: VoteResult, ef_search: int) -> dict:
    """What a decision's audit row says about its search: the candidate list size, and which queries had to
    scan past it (their nearest candidates belonged to hidden experts) or were answered by an exact scan."""
    details: dict = {"ef_search": ef_search, "tie_break": "score_sum"}
    if result.scanned_past_ef_search:
        details["scanned_past_ef_search"] = result.scanned_past_ef_search
    if result.exact_search:
        details["exact_search"] = result.exact_search
    return details


class Router:
    """Runs RoE for a registry with one embedder (loaded once)."""

    def __init__(
        self,
        context: RegistryContext,
        embedder: Embedder | None = None,
        *,
        ef_search: int | None = None,
    ):
        self.context = context
        self.embedder = embedder or load_embedder(context.settings.embedder)
        self.ef_search = ef_search if ef_search is not None else context.settings.routing_ef_search

    def embed_queries(self, queries: Sequence[PromptedExample | str]) -> np.ndarray:
        """Queries formatted exactly like library samples (``Answer Choices: ..., Instance: ...``), embedded."""
        texts = [q if isinstance(q, str) else library_text(q) for q in queries]
        return self.embedder.embed(texts)

    def route(
        self,
        queries: Sequence[PromptedExample | str],
        *,
        q: int | None = 32,
        top_k: int = 1,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        library_version: int | None = None,
        caller_label: str | None = None,
        task_id: int | None = None,
        record: bool = True,
        seed: int = 0,
        recorder: Callable[[RoutingDecisionRecord, Sequence[RoutingVote]], int] | None = None,
    ) -> RoutingDecision:
        """Choose an expert for a set of unlabeled instances of one task.

        Args:
            queries: Instances of the target task: prompted examples (their input and answer choices are used)
                or texts already in the library format.
            q: How many instances to use (the paper's Q=32); a seeded sample when more are given; None for all.
            top_k: Nearest entries per query that vote (the paper: 1).
            kinds: Only experts of these kinds.
            backbone_id: Only experts on this backbone.
            library_version: Route against the library as it was at this version (default: now).
            caller_label: Free text stored with the decision (who or what asked).
            task_id: The registered task the instances come from, if any (for the audit views).
            record: Write the decision and its votes to the audit tables.
            recorder: Writes them instead of the library store and returns the decision id (a server's batched
                audit writer, which answers before the rows are inserted).

        Raises:
            UserError: No queries, Q larger than the number given, or nothing routable.
        """
        queries = sample_queries(queries, q, seed=seed)
        if top_k < 1:
            raise UserError(f"top-k must be at least 1, got {top_k}")
        embedder = self.context.catalogue.get_or_create_embedder(self.embedder.name, self.embedder.dimension)
        current = self.context.library.library_version()
        version = current if library_version is None else library_version
        if version < 0 or version > current:
            raise UserError(f"library version {version} does not exist (current: {current})")

        started = time.perf_counter()
        vectors = self.embed_queries(queries)
        result = self.context.library.vote(
            embedder.id,
            vectors,
            library_version=version,
            top_k=top_k,
            ef_search=self.ef_search,
            kinds=kinds,
            backbone_id=backbone_id,
        )
        latency_ms = (time.perf_counter() - started) * 1000
        votes, tallies = result.votes, result.tallies
        if not votes:
            raise NotFoundError(
                f"no routable expert at library version {version} for embedder {embedder.name}"
                + (f" and kinds {', '.join(kinds)}" if kinds else "")
                + "; train one with 'elmreg add-task' and 'elmreg worker'"
            )
        tallies = rank_tallies(tallies)
        winner = tallies[0]
        decision_id = None
        if record:
            decision_id = (recorder or self.context.library.record_decision)(
                RoutingDecisionRecord(
                    embedder_id=embedder.id,
                    library_version=version,
                    q=len(vectors),
                    top_k=top_k,
                    chosen_expert_id=winner.expert_id,
                    latency_ms=latency_ms,
                    caller_label=caller_label,
                    task_id=task_id,
                    backbone_id=backbone_id,
                    kinds=tuple(kinds) if kinds else None,
                    details=_search_details(result, max(self.ef_search, top_k)),
                ),
                votes,
            )
        return RoutingDecision(
            decision_id=decision_id,
            chosen_expert_id=winner.expert_id,
            chosen_expert_name=winner.expert_name,
            library_version=version,
            q=len(vectors),
            top_k=top_k,
            latency_ms=latency_ms,
            tallies=tallies,
            votes=votes,
        )
