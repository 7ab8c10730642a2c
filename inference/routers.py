"""Routing methods as plug-ins: how the embedded instances of a task become one chosen expert.

Every method retrieves from the catalogue (in SQL) and turns what it found into votes with weights; the
:class:`~elmreg.inference.router.Router` then ranks the tallies, records the decision with the method's name and
parameters, and returns it. Methods that route inside the model (``in_model``: Arrow) need no library search: the
router runs the backbone with the experts mixed and records each expert's share of the routing mass as its votes. Adding a method is a subclass of :class:`RoutingMethod` decorated with
:func:`register_router`; the CLI's ``--router`` / ``--route`` choices, the API's ``router=`` and the experiment
harness read this registry, so the method is available everywhere at once.

This module must stay free of torch: the CLI reads :func:`router_names` to build its choices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from elmreg.registry.entities import ExpertTally, RoutingVote, VoteResult
from elmreg.registry.errors import UserError

if TYPE_CHECKING:  # annotations only: the CLI imports this module for its choices, and must start instantly
    import numpy as np

    from elmreg.registry.store.catalogue import CatalogueStore
    from elmreg.registry.store.library import LibraryStore


@dataclass(frozen=True)
class RouterParam:
    """One parameter a routing method takes (``--router-option NAME=VALUE`` on the CLI)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None

    def parse(self, value: Any, router: str) -> Any:
        try:
            parsed = self.type(value)
        except (TypeError, ValueError):
            raise UserError(
                f"router {router}: {self.name} must be {self.type.__name__}, got '{value}'"
            ) from None
        if self.choices is not None and parsed not in self.choices:
            raise UserError(
                f"router {router}: {self.name} must be one of {', '.join(self.choices)}, got '{value}'"
            )
        if self.minimum is not None and parsed < self.minimum:
            raise UserError(f"router {router}: {self.name} must be at least {self.minimum:g}, got {value}")
        return parsed


@dataclass(frozen=True)
class Retrieval:
    """What a method needs to search the library for one decision."""

    library: LibraryStore
    embedder_id: int
    library_version: int
    kinds: Sequence[str] | None
    backbone_id: int | None
    ef_search: int
    # Only each task's expert of this alias, where the task has one (None: no such filter).
    prefer_alias: str | None = None


class RoutingMethod(ABC):
    """A way of choosing an expert from embedded instances. Subclasses set ``name``, ``summary`` and
    ``params``, and implement :meth:`retrieve`; :meth:`weigh` may give votes weights (default: one each)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[RouterParam, ...]] = ()
    # True: every instance is routed on its own (Q=1) and answered by its own expert.
    per_instance: ClassVar[bool] = False
    # True: the method routes inside the model (token by token, no library search) and answers with a mixture
    # of experts; the Router runs the backbone for it (inference.arrow) instead of calling retrieve.
    in_model: ClassVar[bool] = False

    def __init__(self, **options: Any):
        known = {p.name: p for p in self.params}
        unknown = sorted(set(options) - set(known))
        if unknown:
            accepted = ", ".join(known) or "none"
            raise UserError(f"router {self.name} has no option {', '.join(unknown)} (options: {accepted})")
        self.options = {
            name: param.parse(options[name], self.name) if name in options else param.default
            for name, param in known.items()
        }

    @property
    def top_k(self) -> int:
        """Library entries (or centroids) retrieved per query; what ``routing_decisions.top_k`` records."""
        return int(self.options.get("top_k", 1))

    @abstractmethod
    def retrieve(self, retrieval: Retrieval, vectors: np.ndarray) -> VoteResult:
        """Search the library for the ``(Q, dimension)`` query embeddings."""

    def weigh(self, votes: list[RoutingVote]) -> list[RoutingVote]:
        """The votes with the weight each counts for (default: unchanged, one each)."""
        return votes

    def embedder_name(self, catalogue: CatalogueStore) -> str | None:
        """The embedder this method routes with, when it needs its own (default None: the router's). The
        :class:`~elmreg.inference.router.Router` loads it once, embeds the queries with it, searches its library
        entries and records it with the decision."""
        return None

    def tally(self, result: VoteResult) -> tuple[list[RoutingVote], list[ExpertTally]]:
        """Weighted votes and one tally per expert, ranked: most weight, then summed similarity, then lower id."""
        votes = self.weigh(result.votes)
        names = {t.expert_id: t.expert_name for t in result.tallies}
        weighted = any(v.weight != 1.0 for v in votes)
        sums: dict[int, tuple[int, float, float]] = {}
        for v in votes:
            n, score, weight = sums.get(v.expert_id, (0, 0.0, 0.0))
            sums[v.expert_id] = (n + 1, score + v.score, weight + v.weight)
        tallies = [
            ExpertTally(e, names[e], n, score, weight if weighted else None)
            for e, (n, score, weight) in sums.items()
        ]
        return votes, rank_tallies(tallies)


def rank_tallies(tallies: Sequence[ExpertTally]) -> list[ExpertTally]:
    """The decision rule: most weight (votes, for unweighted routers) first; ties to the larger summed
    similarity, then the lower expert id, so a decision is deterministic."""
    return sorted(tallies, key=lambda t: (-t.strength, -t.score_sum, t.expert_id))


_ROUTERS: dict[str, type[RoutingMethod]] = {}


def register_router(cls: type[RoutingMethod]) -> type[RoutingMethod]:
    """Class decorator: make a routing method available under its ``name``."""
    if cls.name in _ROUTERS:
        raise ValueError(f"a router named '{cls.name}' is already registered")
    _ROUTERS[cls.name] = cls
    return cls


def router_names() -> list[str]:
    return list(_ROUTERS)


def router_class(name: str) -> type[RoutingMethod]:
    try:
        return _ROUTERS[name]
    except KeyError:
        raise UserError(f"unknown router '{name}'; use one of {', '.join(_ROUTERS)}") from None


def make_router(name: str, options: Mapping[str, Any] | None = None) -> RoutingMethod:
    """The routing method ``name`` with ``options`` (strings from the CLI are parsed and checked)."""
    return router_class(name)(**dict(options or {}))


def parse_router_options(pairs: Sequence[str]) -> dict[str, str]:
    """``["k=8", "weighting=uniform"]`` -> ``{"k": "8", "weighting": "uniform"}``."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"router option '{pair}' is not NAME=VALUE, e.g. --router-option k=8")
        options[key.strip()] = value.strip()
    return options


_TOP_K = RouterParam("top_k", int, 1, "Nearest library entries per instance that vote.", minimum=1)


@register_router
class RetrievalOfExperts(RoutingMethod):
    name = "roe"
    summary = "the paper's Retrieval-of-Experts: each instance's nearest library sample votes, majority wins"
    params = (_TOP_K,)

    def retrieve(self, retrieval: Retrieval, vectors: np.ndarray) -> VoteResult:
        return retrieval.library.vote(
            retrieval.embedder_id,
            vectors,
            library_version=retrieval.library_version,
            top_k=self.top_k,
            ef_search=retrieval.ef_search,
            kinds=retrieval.kinds,
            backbone_id=retrieval.backbone_id,
            prefer_alias=retrieval.prefer_alias,
        )


@register_router
class NearestNeighbourVote(RetrievalOfExperts):
    name = "roe-knn"
    summary = "RoE with k nearest samples per instance, each vote weighted by its similarity"
    params = (
        RouterParam("top_k", int, 8, "Nearest library entries per instance that vote.", minimum=1),
        RouterParam(
            "weighting",
            str,
            "similarity",
            "How much each vote counts: its similarity (clipped at 0), or one vote each.",
            choices=("similarity", "uniform"),
        ),
    )

    def weigh(self, votes: list[RoutingVote]) -> list[RoutingVote]:
        if self.options["weighting"] == "uniform":
            return votes
        return [replace(v, weight=max(v.score, 0.0)) for v in votes]


@register_router
class NearestCentroid(RoutingMethod):
    name = "centroid"
    summary = (
        "each instance votes for the expert whose mean library embedding is nearest (the cheap baseline)"
    )
    params = (RouterParam("top_k", int, 1, "Nearest centroids per instance that vote.", minimum=1),)

    def retrieve(self, retrieval: Retrieval, vectors: np.ndarray) -> VoteResult:
        return retrieval.library.centroid_vote(
            retrieval.embedder_id,
            vectors,
            library_version=retrieval.library_version,
            top_k=self.top_k,
            kinds=retrieval.kinds,
            backbone_id=retrieval.backbone_id,
            prefer_alias=retrieval.prefer_alias,
        )


@register_router
class TrainedRetriever(RetrievalOfExperts):
    name = "trained"
    summary = (
        "RoE over the library re-embedded by a retriever fine-tuned on it ('elmreg library train-retriever')"
    )
    params = (
        _TOP_K,
        RouterParam(
            "embedder", str, None, "The trained retriever to route with (default: the most recently trained)."
        ),
    )

    def embedder_name(self, catalogue: CatalogueStore) -> str:
        chosen = self.options["embedder"]
        if chosen is None:
            latest = catalogue.latest_trained_embedder()
            if latest is None:
                raise UserError(
                    "router trained: the catalogue has no trained retriever; "
                    "train one with 'elmreg library train-retriever'"
                )
            # Recorded with the decision: which retriever the default meant at the time.
            self.options["embedder"] = latest.name
            return latest.name
        if not catalogue.get_embedder(chosen).trained:
            raise UserError(
                f"router trained: embedder '{chosen}' is not a trained retriever; route with it by configuring "
                "it as ELMREG_EMBEDDER, or train one with 'elmreg library train-retriever'"
            )
        return chosen


@register_router
class PerInstance(RoutingMethod):
    name = "per-instance"
    summary = "every instance routed alone (Q=1) by another router and answered by its own expert"
    params = (
        RouterParam(
            "base",
            str,
            "roe",
            "The router that routes each instance.",
            choices=("roe", "roe-knn", "centroid", "trained"),
        ),
    )
    per_instance = True

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.base = make_router(self.options["base"])

    @property
    def top_k(self) -> int:
        return self.base.top_k

    def retrieve(self, retrieval: Retrieval, vectors: np.ndarray) -> VoteResult:
        return self.base.retrieve(retrieval, vectors)

    def weigh(self, votes: list[RoutingVote]) -> list[RoutingVote]:
        return self.base.weigh(votes)

    def embedder_name(self, catalogue: CatalogueStore) -> str | None:
        return self.base.embedder_name(catalogue)


@register_router
class ArrowRouting(RoutingMethod):
    name = "arrow"
    summary = (
        "PEFT's Arrow: the library's LoRA experts mixed token by token inside the model, by each adapter's top "
        "singular direction (no library samples)"
    )
    params = (
        RouterParam("top_k", int, 3, "Experts mixed per token at each layer.", minimum=1),
        RouterParam(
            "temperature", float, 1.0, "Softmax temperature of the mixing coefficients.", minimum=1e-6
        ),
    )
    in_model = True

    def retrieve(self, retrieval: Retrieval, vectors: np.ndarray) -> VoteResult:
        raise UserError("router arrow routes inside the model, not by library search")
