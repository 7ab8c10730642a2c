"""The Expert Library: embedded samples of every expert, the searches over them, and each routing decision."""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from elmreg.registry.entities import (
    LibraryChange,
    LibraryEntry,
    LibraryHit,
    LibraryStorage,
    PendingDecision,
    RoutingDecisionRecord,
    RoutingVote,
    VoteResult,
)


class LibraryStore(ABC):
    """Library entries (one vector per sample and embedder), library versions, RoE votes and their audit rows."""

    @abstractmethod
    def library_version(self) -> int:
        """The current library version (0 for an empty library)."""

    @abstractmethod
    def history(self) -> list[LibraryChange]:
        """Every library version's change (expert added or retired), oldest first."""

    @abstractmethod
    def add_entries(self, expert_id: int, embedder_id: int, entries: Iterable[LibraryEntry]) -> int:
        """Bulk-insert (COPY) entries of an existing expert for one embedder; returns how many were written."""

    @abstractmethod
    def index_built_after(self, embedder_id: int) -> AbstractContextManager[None]:
        """For bulk imports: the embedder's vector index is dropped for the block and built once after it
        (searches inside the block scan without it)."""

    @abstractmethod
    def texts(self, expert_id: int, embedder_id: int) -> list[tuple[int, str]]:
        """The ``(sample_index, text)`` of an expert's entries for one embedder, in sample order."""

    @abstractmethod
    def entries(self, expert_id: int, embedder_id: int) -> list[LibraryEntry]:
        """An expert's entries for one embedder, with their embeddings, in sample order (to copy them)."""

    @abstractmethod
    def nearest_entries(
        self, embedder_id: int, query: Sequence[float], *, k: int = 1, library_version: int | None = None
    ) -> list[LibraryHit]:
        """The ``k`` entries of routable experts with the largest inner product with ``query``.

        Args:
            library_version: Search the library as it was at that version (default: now).
        """

    @abstractmethod
    def vote(
        self,
        embedder_id: int,
        queries: np.ndarray,
        *,
        library_version: int,
        top_k: int = 1,
        ef_search: int = 100,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        prefer_alias: str | None = None,
    ) -> VoteResult:
        """RoE's retrieval and vote: each query's ``top_k`` nearest entries among experts routable at
        ``library_version`` (optionally of some ``kinds`` / one backbone; with ``prefer_alias``, only the
        aliased expert of each task that has that alias), and the votes per expert.

        Every query gets ``top_k`` votes whenever that many visible entries exist, however many hidden
        (retired, later, other-kind, other-backbone) entries lie nearer: the index scan goes on past
        ``ef_search`` for such queries, and an exact scan answers any it still cannot.

        Args:
            queries: ``(Q, dimension)`` query embeddings.
            ef_search: HNSW candidate list size per query (widened to ``top_k`` when smaller).

        Returns:
            The votes ordered by query and rank, one tally per expert that got a vote (by expert id: which
            one wins is the router's rule), both empty when nothing is routable; and which queries needed a
            longer or exact scan.
        """

    @abstractmethod
    def centroid_vote(
        self,
        embedder_id: int,
        queries: np.ndarray,
        *,
        library_version: int,
        top_k: int = 1,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        prefer_alias: str | None = None,
    ) -> VoteResult:
        """Like :meth:`vote`, over one centroid per expert (the normalised mean of its entries) instead of its
        entries: each query votes for the experts with the ``top_k`` most similar centroids among those
        routable at ``library_version``. An exact scan (one row per expert). Votes have no entry id."""

    @abstractmethod
    def storage(self, embedder_id: int) -> LibraryStorage:
        """How many entries the embedder has and the bytes of the entries table and of its vector index."""

    @abstractmethod
    def drop_index(self, embedder_id: int) -> None:
        """Drop the embedder's vector index (searches scan exactly until :meth:`build_index`)."""

    @abstractmethod
    def build_index(self, embedder_id: int, dimension: int) -> None:
        """(Re)build the embedder's vector index with the configured index type, memory and workers."""

    @abstractmethod
    def record_decision(self, decision: RoutingDecisionRecord, votes: Sequence[RoutingVote]) -> int:
        """Write a routing decision and its votes to the audit tables; returns the decision id."""

    @abstractmethod
    def reserve_decision_ids(self, count: int) -> list[int]:
        """``count`` unused decision ids (never handed out twice, even across processes), for callers that must
        answer with the id before the decision is stored (a server writes its decisions later, in batches)."""

    @abstractmethod
    def record_decisions(self, decisions: Sequence[PendingDecision]) -> None:
        """Insert decisions with their reserved ids and all their votes, in one transaction."""

    @abstractmethod
    def replay_decisions(self, decisions: Sequence[PendingDecision], *, dry_run: bool = False) -> int:
        """Insert those of ``decisions`` whose ids are not in the catalogue yet, with their votes and their
        ``made_at`` times, in one transaction (the same decision replayed twice is written once).

        Returns:
            How many were (or, with ``dry_run``, would be) written.
        """

    @abstractmethod
    def prune_decisions(self, before: dt.datetime, *, dry_run: bool = True) -> tuple[int, int]:
        """Delete routing decisions made before ``before`` with their votes (nothing with ``dry_run``).

        Returns:
            How many decisions and votes were (or, with ``dry_run``, would be) deleted.
        """

    @abstractmethod
    def recount_audit_summary(self) -> None:
        """Recount the per-day choice counts the audit views read from the decisions themselves (after
        decisions were written or changed other than through :meth:`record_decision`)."""

    @abstractmethod
    def annotate_decision(self, decision_id: int, details: dict[str, Any]) -> None:
        """Add ``details`` (top-level keys) to a recorded routing decision's ``details``, e.g. that its experts
        were composed into a merged one.

        Raises:
            NotFoundError: No such decision.
        """
