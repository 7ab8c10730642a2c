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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from elmreg.data.prompts import PromptedExample, library_text
from elmreg.inference.assignment import Answerer, Assignment, Mixture, RoutingDecision
from elmreg.inference.routers import Retrieval, RoutingMethod, make_router, rank_tallies
from elmreg.models.embedder import Embedder, load_embedder
from elmreg.registry.entities import ExpertTally, RoutingDecisionRecord, RoutingVote, VoteResult
from elmreg.registry.errors import NotFoundError, UserError
from elmreg.runtime.context import RegistryContext
from elmreg.runtime.retrievers import load_catalogued_embedder

# HNSW returns approximate neighbours from a candidate list of ef_search entries (the routing_ef_search
# setting). Queries whose candidates are all hidden by the filters (kinds, backbone, library version) are searched
# further by the library store, so the list size trades speed for recall only.
DEFAULT_EF_SEARCH = 100

T = TypeVar("T")

# Writes a decision and its votes, returning its id (the library store's record_decision, or a server's batch).
Recorder = Callable[[RoutingDecisionRecord, Sequence[RoutingVote]], int]


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
    if result.index_type is not None:
        details["index_type"] = result.index_type
    if result.rerank is not None:
        details["rerank"] = result.rerank
    if result.scanned_past_ef_search:
        details["scanned_past_ef_search"] = result.scanned_past_ef_search
    if result.exact_search:
        details["exact_search"] = result.exact_search
    return details


# The adapter pool of a backbone (by id): what in-model routers run on.
PoolFor = Callable[[int], Any]

# Arrow's routing mass below this share is not recorded as a vote (it would be hundreds of empty rows).
MIN_RECORDED_MASS = 1e-3


class Router:
    """Routes instances to experts with any registered routing method (RoE by default), and records each decision
    with its method's name and options. Queries are embedded with the registry's embedder (loaded once), or with
    the one a method names (``RoutingMethod.embedder_name``, e.g. a trained retriever), loaded on first use and
    kept. In-model methods (Arrow) run on the adapter pool ``pool_for`` gives for the backbone."""

    def __init__(
        self,
        context: RegistryContext,
        embedder: Embedder | None = None,
        *,
        ef_search: int | None = None,
        pool_for: PoolFor | None = None,
    ):
        self.context = context
        self.pool_for = pool_for
        self.embedder = embedder or load_embedder(context.settings.embedder)
        self.ef_search = ef_search if ef_search is not None else context.settings.routing_ef_search
        self._embedders: dict[str, Embedder] = {self.embedder.name: self.embedder}
        self._embedder_ids: dict[str, int] = {}

    def embedder_for(self, method: RoutingMethod) -> Embedder:
        """The embedder ``method`` routes with: the router's own, or the one it names (fetched from the artifact
        store and loaded on first use)."""
        name = method.embedder_name(self.context.catalogue)
        if name is None:
            return self.embedder
        if name not in self._embedders:
            self._embedders[name] = load_catalogued_embedder(self.context, name)
        return self._embedders[name]

    def embed_queries(
        self, queries: Sequence[PromptedExample | str], embedder: Embedder | None = None
    ) -> np.ndarray:
        """Queries formatted exactly like library samples (``Answer Choices: ..., Instance: ...``), embedded (by
        the router's embedder unless another is given)."""
        texts = [q if isinstance(q, str) else library_text(q) for q in queries]
        return (embedder or self.embedder).embed(texts)

    def route(
        self,
        queries: Sequence[PromptedExample | str],
        *,
        q: int | None = 32,
        router: str | RoutingMethod = "roe",
        router_options: Mapping[str, Any] | None = None,
        top_k: int | None = None,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        library_version: int | None = None,
        caller_label: str | None = None,
        task_id: int | None = None,
        record: bool = True,
        seed: int = 0,
        recorder: Recorder | None = None,
        prefer_alias: str | None = None,
    ) -> RoutingDecision:
        """Choose one expert for a set of unlabeled instances of one task.

        Args:
            queries: Instances of the target task: prompted examples (their input and answer choices are used)
                or texts already in the library format.
            q: How many instances to use (the paper's Q=32); a seeded sample when more are given; None for all.
            router: The routing method (a name from ``inference.routers.router_names()``, or an instance).
            router_options: Its options by name (e.g. ``{"top_k": 8}`` for ``roe-knn``).
            top_k: Shorthand for the ``top_k`` option: nearest entries per query that vote (the paper: 1).
            kinds: Only experts of these kinds.
            backbone_id: Only experts on this backbone.
            prefer_alias: Of each task that has this alias, only the expert it names (default: the
                ``routing_prefer_alias`` setting); the alias is recorded in the decision's details.
            library_version: Route against the library as it was at this version (default: now).
            caller_label: Free text stored with the decision (who or what asked).
            task_id: The registered task the instances come from, if any (for the audit views).
            record: Write the decision and its votes to the audit tables.
            recorder: Writes them instead of the library store and returns the decision id (a server's batched
                audit writer, which answers before the rows are inserted).

        Raises:
            UserError: No queries, Q larger than the number given, a per-instance router (see
                :meth:`assign`), an unknown router or option, or nothing routable.
        """
        method = self._method(router, router_options, top_k)
        if method.per_instance:
            raise UserError(
                f"router {method.name} chooses an expert per instance, not per task: use assign "
                "(elmreg route/predict/eval --router per-instance)"
            )
        queries = sample_queries(queries, q, seed=seed)
        version = self._version(library_version)
        prefer_alias = self._prefer_alias(prefer_alias, method)
        if method.in_model:
            facts = _DecisionFacts(method, None, None, version, kinds, backbone_id, caller_label, task_id)
            return self._route_in_model(facts, queries, record=record, recorder=recorder)
        facts = self._facts(method, version, kinds, backbone_id, caller_label, task_id, prefer_alias)
        started = time.perf_counter()
        result = self._search(facts, queries)
        votes, tallies = method.tally(result)
        latency_ms = (time.perf_counter() - started) * 1000
        self._require_votes(facts.embedder, votes, version, kinds)
        decision_id = (
            self._record(facts, result, votes, tallies, len(queries), latency_ms, recorder)
            if record
            else None
        )
        return facts.decision(decision_id, len(queries), latency_ms, tallies, votes)

    def assign(
        self,
        queries: Sequence[PromptedExample | str],
        *,
        q: int | None = 32,
        router: str | RoutingMethod = "roe",
        router_options: Mapping[str, Any] | None = None,
        top_k: int | None = None,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        library_version: int | None = None,
        caller_label: str | None = None,
        task_id: int | None = None,
        record: bool = True,
        seed: int = 0,
        recorder: Recorder | None = None,
        prefer_alias: str | None = None,
    ) -> Assignment:
        """Who answers each of ``queries``, by any routing method, with the decisions recorded on the way.

        Methods that choose per task route a seeded sample of ``q`` instances once and give every instance the
        chosen expert (or, routing inside the model, the mixture); per-instance methods route every instance on
        its own (Q=1, one decision each, all retrieved in one search). Arguments as for :meth:`route`.

        Raises:
            UserError: No queries, Q larger than the number given, an unknown router or option, or nothing
                routable.
        """
        method = self._method(router, router_options, top_k)
        scope = dict(
            kinds=kinds,
            backbone_id=backbone_id,
            library_version=library_version,
            caller_label=caller_label,
            task_id=task_id,
            record=record,
            recorder=recorder,
            prefer_alias=prefer_alias,
        )
        if method.per_instance:
            decisions = self._route_each(queries, method, **scope)
            experts = self._experts({d.chosen_expert_id for d in decisions})
            answerers = [Answerer(experts[d.chosen_expert_id], decision_id=d.decision_id) for d in decisions]
            return Assignment(tuple(answerers), tuple(decisions))
        decision = self.route(queries, q=q, router=method, seed=seed, **scope)
        experts = self._experts({decision.chosen_expert_id, *decision.mixture})
        mixture = None
        if decision.mixture:
            mixture = Mixture(
                tuple(experts[i] for i in decision.mixture),
                top_k=method.options["top_k"],
                temperature=method.options["temperature"],
            )
        answerer = Answerer(experts[decision.chosen_expert_id], mixture, decision.decision_id)
        return Assignment((answerer,) * len(queries), (decision,))

    def _experts(self, ids) -> dict:
        return {i: self.context.catalogue.get_expert(i) for i in ids}

    def _route_each(
        self,
        queries: Sequence[PromptedExample | str],
        method: RoutingMethod,
        *,
        kinds: Sequence[str] | None,
        backbone_id: int | None,
        library_version: int | None,
        caller_label: str | None,
        task_id: int | None,
        record: bool,
        recorder: Recorder | None,
        prefer_alias: str | None,
    ) -> list[RoutingDecision]:
        """One decision per instance, in input order, all retrieved in one search."""
        if not queries:
            raise UserError("routing needs at least one input instance")
        version = self._version(library_version)
        prefer_alias = self._prefer_alias(prefer_alias, method)
        facts = self._facts(method, version, kinds, backbone_id, caller_label, task_id, prefer_alias)
        started = time.perf_counter()
        result = self._search(facts, queries)
        # One latency for the shared search, split evenly over the decisions it made.
        latency_ms = (time.perf_counter() - started) * 1000 / len(queries)
        names = {t.expert_id: t.expert_name for t in result.tallies}
        by_query: dict[int, list[RoutingVote]] = {}
        for vote in result.votes:
            by_query.setdefault(vote.query_index, []).append(replace(vote, query_index=0))
        decisions = []
        for index in range(len(queries)):
            own = VoteResult(
                by_query.get(index, []),
                [ExpertTally(e, names[e], 0, 0.0) for e in {v.expert_id for v in by_query.get(index, [])}],
                scanned_past_ef_search=[0] if index in result.scanned_past_ef_search else [],
                exact_search=[0] if index in result.exact_search else [],
                index_type=result.index_type,
                rerank=result.rerank,
            )
            votes, tallies = method.tally(own)
            self._require_votes(facts.embedder, votes, version, kinds)
            decision_id = (
                self._record(facts, own, votes, tallies, 1, latency_ms, recorder) if record else None
            )
            decisions.append(facts.decision(decision_id, 1, latency_ms, tallies, votes))
        return decisions

    def _facts(
        self,
        method: RoutingMethod,
        version: int,
        kinds: Sequence[str] | None,
        backbone_id: int | None,
        caller_label: str | None,
        task_id: int | None,
        prefer_alias: str | None,
    ) -> _DecisionFacts:
        """What a retrieving decision is made with: the method's embedder and its catalogue id, and the scope."""
        embedder = self.embedder_for(method)
        embedder_id = self._embedder_id(embedder, version, kinds)
        return _DecisionFacts(
            method, embedder, embedder_id, version, kinds, backbone_id, caller_label, task_id, prefer_alias
        )

    def _search(self, facts: _DecisionFacts, queries: Sequence[PromptedExample | str]) -> VoteResult:
        """Embed ``queries`` and retrieve the library entries that vote for them, in one search."""
        vectors = self.embed_queries(queries, facts.embedder)
        scope = self._retrieval(
            facts.embedder_id, facts.version, facts.kinds, facts.backbone_id, facts.prefer_alias
        )
        return facts.method.retrieve(scope, vectors)

    def _route_in_model(
        self,
        facts: _DecisionFacts,
        queries: Sequence[PromptedExample | str],
        *,
        record: bool,
        recorder: Recorder | None,
    ) -> RoutingDecision:
        """Arrow: the backbone runs the queries with every visible LoRA expert mixed in; each (query, expert)
        share of the routing mass is a weighted vote, and the expert with the most mass is the choice."""
        from elmreg.inference.arrow import arrow_experts, routing_mass

        if self.pool_for is None:
            raise UserError(
                f"router {facts.method.name} runs the backbone: route through elmreg.Registry or an Evaluator"
            )
        if any(isinstance(query, str) for query in queries):
            raise UserError(f"router {facts.method.name} needs prompted instances, not library texts")
        backbone_id = facts.backbone_id
        if backbone_id is None:
            backbone_id = self.context.catalogue.get_backbone(self.context.settings.backbone).id
        facts = replace(facts, backbone_id=backbone_id)
        experts = arrow_experts(
            self.context.catalogue, library_version=facts.version, backbone_id=backbone_id, kinds=facts.kinds
        )
        pool = self.pool_for(backbone_id)
        loading = time.perf_counter()
        options = facts.method.options
        with pool.use_arrow(experts, top_k=options["top_k"], temperature=options["temperature"]) as model:
            started = time.perf_counter()
            mass = routing_mass(model, pool.backbone, queries)
            latency_ms = (time.perf_counter() - started) * 1000
        load_ms = (started - loading) * 1000
        votes = [
            RoutingVote(index, rank, None, experts[e].id, float(row[e]), float(row[e]))
            for index, row in enumerate(mass)
            for rank, e in enumerate(np.argsort(-row, kind="stable"))
            if row[e] >= MIN_RECORDED_MASS
        ]
        result = VoteResult(votes, [ExpertTally(e.id, e.name, 0, 0.0) for e in experts])
        votes, tallies = facts.method.tally(result)
        mixture = tuple(e.id for e in experts)
        details = {"mixture": list(mixture), "load_ms": round(load_ms, 1)}
        decision_id = (
            self._record(facts, result, votes, tallies, len(queries), latency_ms, recorder, details)
            if record
            else None
        )
        return replace(facts.decision(decision_id, len(queries), latency_ms, tallies, votes), mixture=mixture)

    def _method(
        self, router: str | RoutingMethod, options: Mapping[str, Any] | None, top_k: int | None
    ) -> RoutingMethod:
        if isinstance(router, RoutingMethod):
            if options or top_k is not None:
                raise UserError("give router options when naming the router, not with a router instance")
            return router
        options = dict(options or {})
        if top_k is not None:
            if top_k < 1:
                raise UserError(f"top-k must be at least 1, got {top_k}")
            options.setdefault("top_k", top_k)
        return make_router(router, options)

    def _version(self, library_version: int | None) -> int:
        current = self.context.library.library_version()
        version = current if library_version is None else library_version
        if version < 0 or version > current:
            raise UserError(f"library version {version} does not exist (current: {current})")
        return version

    def _embedder_id(self, embedder: Embedder, version: int, kinds: Sequence[str] | None) -> int:
        """The catalogue id of ``embedder``, looked up once per router (a read: an embedder the catalogue does
        not know has no library entries, so nothing is routable with it)."""
        if embedder.name not in self._embedder_ids:
            try:
                self._embedder_ids[embedder.name] = self.context.catalogue.get_embedder(embedder.name).id
            except NotFoundError:
                self._require_votes(embedder, [], version, kinds)
        return self._embedder_ids[embedder.name]

    def _retrieval(
        self,
        embedder_id: int,
        version: int,
        kinds: Sequence[str] | None,
        backbone_id: int | None,
        prefer_alias: str | None,
    ) -> Retrieval:
        return Retrieval(
            self.context.library, embedder_id, version, kinds, backbone_id, self.ef_search, prefer_alias
        )

    def _prefer_alias(self, prefer_alias: str | None, method: RoutingMethod) -> str | None:
        """The alias filter of a call: its own, else the setting's ('' turns the setting off)."""
        alias = prefer_alias if prefer_alias is not None else self.context.settings.routing_prefer_alias
        if alias and method.in_model:
            raise UserError(f"router {method.name} mixes every visible expert; it takes no --prefer-alias")
        return alias or None

    def _require_votes(
        self, embedder: Embedder, votes: Sequence[RoutingVote], version: int, kinds: Sequence[str] | None
    ) -> None:
        if not votes:
            raise NotFoundError(
                f"no routable expert at library version {version} for embedder {embedder.name}"
                + (f" and kinds {', '.join(kinds)}" if kinds else "")
                + "; train one with 'elmreg add-task' and 'elmreg worker'"
            )

    def _record(
        self,
        facts: _DecisionFacts,
        result: VoteResult,
        votes: list[RoutingVote],
        tallies: list[ExpertTally],
        q: int,
        latency_ms: float,
        recorder: Recorder | None,
        details: dict | None = None,
    ) -> int:
        details = (
            details
            if details is not None
            else _search_details(result, max(self.ef_search, facts.method.top_k))
        )
        if facts.prefer_alias:
            details = {**details, "prefer_alias": facts.prefer_alias}
        record = RoutingDecisionRecord(
            embedder_id=facts.embedder_id,
            library_version=facts.version,
            q=q,
            top_k=facts.method.top_k,
            chosen_expert_id=tallies[0].expert_id,
            latency_ms=latency_ms,
            caller_label=facts.caller_label,
            task_id=facts.task_id,
            backbone_id=facts.backbone_id,
            kinds=tuple(facts.kinds) if facts.kinds else None,
            details=details,
            router=facts.method.name,
            router_params=facts.method.options,
        )
        return (recorder or self.context.library.record_decision)(record, votes)


@dataclass(frozen=True)
class _DecisionFacts:
    """What every decision of one call shares."""

    method: RoutingMethod
    embedder: Embedder | None  # None: an in-model router
    embedder_id: int | None
    version: int
    kinds: Sequence[str] | None
    backbone_id: int | None
    caller_label: str | None
    task_id: int | None
    prefer_alias: str | None = None

    def decision(
        self,
        decision_id: int | None,
        q: int,
        latency_ms: float,
        tallies: list[ExpertTally],
        votes: list[RoutingVote],
    ) -> RoutingDecision:
        return RoutingDecision(
            decision_id=decision_id,
            chosen_expert_id=tallies[0].expert_id,
            chosen_expert_name=tallies[0].expert_name,
            library_version=self.version,
            q=q,
            top_k=self.method.top_k,
            latency_ms=latency_ms,
            tallies=tallies,
            votes=votes,
            router=self.method.name,
            router_params=dict(self.method.options),
            embedder=self.embedder.name if self.embedder is not None else None,
        )
