"""Plain, frozen records that the store returns. ORM rows never leave the store."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Backbone:
    id: int
    name: str
    family: str
    fingerprint: str | None
    config: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class Embedder:
    id: int
    name: str
    dimension: int
    normalized: bool
    created_at: dt.datetime
    # A retriever trained by elmreg: its packed sentence-transformers folder (None for hub ids and paths),
    # the embedder it was fine-tuned from and how it was trained.
    artifact: StoredArtifact | None = None
    trained_from_id: int | None = None
    training: dict[str, Any] | None = None

    @property
    def trained(self) -> bool:
        return self.artifact is not None


@dataclass(frozen=True)
class Task:
    id: int
    name: str
    dataset: str
    subset: str | None
    split: str
    level: str
    task_type: str
    metric: str
    templates: list[dict[str, Any]]
    max_examples: int | None
    expert_kind: str
    backbone_id: int
    training_config: dict[str, Any]
    created_at: dt.datetime
    tags: dict[str, str] = field(default_factory=dict)
    description: str | None = None  # Markdown


@dataclass(frozen=True)
class StoredArtifact:
    """Where an expert's weights are, and what they must hash to."""

    uri: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Expert:
    id: int
    name: str
    task_id: int | None
    backbone_id: int
    kind: str
    status: str
    artifact: StoredArtifact | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    library_version: int | None
    retired_at_version: int | None
    merge_method: str | None
    merge_params: dict[str, Any] | None
    created_at: dt.datetime
    ready_at: dt.datetime | None
    retired_at: dt.datetime | None
    parents: tuple[tuple[int, float], ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    description: str | None = None  # Markdown
    # The aliases that name this expert, as ``task@alias`` (filled by get_expert and search).
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertAlias:
    """An alias of a task (``task@alias``) and the expert it names now."""

    task: str
    alias: str
    expert_id: int
    expert_name: str
    updated_at: dt.datetime

    @property
    def ref(self) -> str:
        return f"{self.task}@{self.alias}"


@dataclass(frozen=True)
class AliasMove:
    """One move of an alias: ``from_expert`` None when it was created, ``to_expert`` None when it was removed."""

    id: int
    task: str
    alias: str
    from_expert: str | None
    to_expert: str | None
    moved_by: str
    moved_at: dt.datetime


@dataclass(frozen=True)
class LibraryEntry:
    """One embedded training sample of an expert, ready to insert."""

    sample_index: int
    text: str
    embedding: Any  # a 1-D float sequence (numpy array or list)


@dataclass(frozen=True)
class LibraryHit:
    """A library entry found by inner-product search; ``score`` is the inner product (higher is closer)."""

    entry_id: int
    expert_id: int
    sample_index: int
    text: str
    score: float


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    status: str
    priority: int
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    last_error: str | None
    dedupe_key: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class TrainingRun:
    id: int
    job_id: int | None
    task_id: int
    expert_id: int | None
    worker: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class CatalogueSummary:
    """What ``elmreg status`` shows about the catalogue."""

    schema_revision: str | None
    head_revision: str
    library_version: int
    row_counts: dict[str, int] = field(default_factory=dict)
    pgvector_version: str | None = None
    server_version: str | None = None


@dataclass(frozen=True)
class LibraryChange:
    """One step of the library's history: an expert added or retired at a library version."""

    version: int
    change: str  # 'added' or 'retired'
    expert_id: int
    expert_name: str
    expert_kind: str
    entries: int  # the expert's library entries (all embedders)
    created_at: dt.datetime


@dataclass(frozen=True)
class RoutingVote:
    """One query's ``rank``-th nearest library entry (None: an expert's centroid), and the expert it votes for
    with ``weight`` (1 unless the router weighs its votes)."""

    query_index: int
    rank: int
    entry_id: int | None
    expert_id: int
    score: float
    weight: float = 1.0


@dataclass(frozen=True)
class ExpertTally:
    """An expert's votes in one routing decision: the most ``weight`` wins (the number of votes for RoE),
    ``score_sum`` breaks ties."""

    expert_id: int
    expert_name: str
    votes: int
    score_sum: float
    weight: float | None = None

    @property
    def strength(self) -> float:
        """What the decision compares: the summed vote weights, or the vote count when votes are unweighted."""
        return self.votes if self.weight is None else self.weight


@dataclass(frozen=True)
class RoutingDecisionRecord:
    """What ``routing_decisions`` keeps about one decision (its votes go to ``routing_votes``)."""

    embedder_id: int | None  # None: an in-model router (Arrow), which searches no library
    library_version: int
    q: int
    top_k: int
    chosen_expert_id: int
    latency_ms: float
    caller_label: str | None = None
    task_id: int | None = None
    backbone_id: int | None = None
    kinds: tuple[str, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    router: str = "roe"
    router_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Evaluation:
    id: int
    task_id: int
    expert_id: int | None
    route: str
    split: str
    metric: str
    score: float
    n_examples: int
    library_version: int | None
    benchmark_run_id: int | None
    details: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True)
class BenchmarkRun:
    id: int
    status: str
    since: dt.datetime | None
    suite: dict[str, Any]
    summary: dict[str, Any]
    report_uri: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class BenchmarkCell:
    """One score of a benchmark run, with names resolved: ``expert`` is '' for the base backbone."""

    task: str
    expert: str
    route: str
    metric: str
    score: float


@dataclass(frozen=True)
class ApiKey:
    """A key of the HTTP API (``elmreg serve``); the key itself is never stored, only its hash."""

    id: int
    name: str
    prefix: str
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    rate: float | None = None  # requests per second a server takes with this key (None: no limit)
    concurrency: int | None = None  # requests in flight at once (None: no limit)


@dataclass(frozen=True)
class PendingDecision:
    """A routing decision whose id was reserved when it was made, written later with others in one batch.

    ``made_at`` is when it was made: a decision spilled to a file and replayed later keeps that time (written
    straight away, it gets the catalogue's clock at insert, a fraction of a second later).
    """

    decision_id: int
    record: RoutingDecisionRecord
    votes: tuple[RoutingVote, ...]
    made_at: dt.datetime | None = None


@dataclass(frozen=True)
class VoteResult:
    """RoE's retrieval for one set of queries: the votes, the tallies and how far the search had to go.

    ``scanned_past_ef_search`` lists the queries whose first ``ef_search`` index candidates held fewer than
    ``top_k`` visible entries (retired, pinned-out or filtered experts crowded them), so the index scan went on;
    ``exact_search`` those that were answered by an exact scan (the index scan stopped at its tuple limit, or
    the server's pgvector has no iterative scans). ``index_type`` is the type the index compared in (``None``
    when no index was searched) and ``rerank`` how many Hamming candidates per query a ``bit`` index's search
    re-ranked exactly (``None`` for the other types).
    """

    votes: list[RoutingVote]
    tallies: list[ExpertTally]
    scanned_past_ef_search: list[int] = field(default_factory=list)
    exact_search: list[int] = field(default_factory=list)
    index_type: str | None = None
    rerank: int | None = None


@dataclass(frozen=True)
class LibrarySearchOptions:
    """How the library's vector index is built and searched (from the ``library_*`` / ``routing_*`` settings)."""

    # Storage type the HNSW index compares in: 'vector' (float32), 'halfvec' (float16, half the size) or 'bit'
    # (binary quantization by Hamming distance, its candidates re-ranked by the exact inner product).
    index_type: str = "vector"
    # With 'bit': the Hamming-nearest candidates per query re-ranked by the exact inner product.
    rerank: int = 100
    # pgvector 0.8 iterative index scan mode for filtered queries: 'strict_order', 'relaxed_order' or 'off'
    # (such queries are answered by an exact scan instead).
    iterative_scan: str = "strict_order"
    # Index tuples one filtered query may visit before elmreg falls back to an exact scan.
    max_scan_tuples: int = 20000
    # Connections the Q queries of one decision are split over (1: one statement).
    parallel_connections: int = 1
    # Memory and parallel workers for an HNSW build.
    build_memory: str = "2GB"
    build_workers: int = 2
    # The HNSW graph: links per node and candidate list while building (pgvector's m and ef_construction).
    # Larger is a better graph (recall at the same ef_search) for a slower build and a larger index.
    hnsw_m: int = 16
    hnsw_ef_construction: int = 64


@dataclass(frozen=True)
class LibraryStorage:
    """What an embedder's library occupies on the server."""

    entries: int
    # The whole library_entries table (all embedders) with its TOAST data, and this embedder's HNSW index.
    table_bytes: int
    index_bytes: int
    index_type: str | None


@dataclass(frozen=True)
class Publication:
    """One expert to make routable in :meth:`CatalogueStore.publish_experts`."""

    expert_id: int
    artifact: StoredArtifact
    entries: Sequence[LibraryEntry]
    metrics: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
