"""SQLAlchemy models of the catalogue. They never leave the store: callers get the dataclasses in ``entities``.

Every constraint and index has an explicit or convention-derived name so that migrations can refer to it.
The vector column has no fixed dimension: each embedder gets its own partial HNSW index over
``embedding::vector(<dimension>)`` (created by the store when the embedder is registered), so entries of
embedders with different dimensions live in one table and each is searched through its own index.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from elmreg.registry.kinds import expert_row_kinds, trainable_kinds

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

EXPERT_STATUSES = ("pending", "training", "ready", "failed", "retired")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSONB, list[Any]: JSONB}


class BackboneRow(Base):
    __tablename__ = "backbones"
    __table_args__ = (CheckConstraint(_in("family", ("causal", "seq2seq")), name="family"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(500), unique=True)
    family: Mapped[str] = mapped_column(String(16))
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    config: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[dt.datetime] = _now()


class EmbedderRow(Base):
    __tablename__ = "embedders"
    __table_args__ = (
        CheckConstraint("dimension > 0", name="dimension_positive"),
        # An artifact is all three or none: a loader must never fetch bytes it cannot verify.
        CheckConstraint(
            "(artifact_uri IS NULL) = (artifact_sha256 IS NULL) AND (artifact_uri IS NULL) = (artifact_size IS NULL)",
            name="artifact_complete",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(500), unique=True)
    dimension: Mapped[int] = mapped_column(Integer)
    normalized: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    created_at: Mapped[dt.datetime] = _now()
    # A retriever trained by elmreg (migration 0007): its packed sentence-transformers folder in the artifact
    # store, the embedder it was fine-tuned from, and how. NULL for encoders named by a hub id or a path.
    artifact_uri: Mapped[str | None] = mapped_column(Text)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    artifact_size: Mapped[int | None] = mapped_column(BigInteger)
    trained_from_id: Mapped[int | None] = mapped_column(ForeignKey("embedders.id"))
    training: Mapped[dict[str, Any] | None] = mapped_column()


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        CheckConstraint(_in("level", ("prompt", "dataset")), name="level"),
        CheckConstraint(_in("task_type", ("classification", "generative")), name="task_type"),
        CheckConstraint(_in("expert_kind", trainable_kinds()), name="expert_kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    dataset: Mapped[str] = mapped_column(String(500))
    subset: Mapped[str | None] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16))
    task_type: Mapped[str] = mapped_column(String(16))
    metric: Mapped[str] = mapped_column(String(32))
    # The prompt templates (name, jinja, answer_choices) as registered, so training is reproducible.
    templates: Mapped[list[Any]] = mapped_column()
    max_examples: Mapped[int | None] = mapped_column(Integer)
    expert_kind: Mapped[str] = mapped_column(String(32))
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    training_config: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[dt.datetime] = _now()
    # String keys to string values, and Markdown for people (migration 0010).
    tags: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    description: Mapped[str | None] = mapped_column(Text)


class ExpertRow(Base):
    __tablename__ = "experts"
    __table_args__ = (
        CheckConstraint(_in("kind", expert_row_kinds()), name="kind"),
        CheckConstraint(_in("status", EXPERT_STATUSES), name="status"),
        # The promise behind 'ready': never a routable expert without verified weights and a library version.
        CheckConstraint(
            "status NOT IN ('ready', 'retired') OR (artifact_uri IS NOT NULL AND artifact_sha256 IS NOT NULL"
            " AND artifact_size IS NOT NULL AND library_version IS NOT NULL)",
            name="ready_has_verified_artifact",
        ),
        CheckConstraint("artifact_size IS NULL OR artifact_size >= 0", name="artifact_size_nonnegative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(300), unique=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), index=True)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'pending'"), index=True)
    artifact_uri: Mapped[str | None] = mapped_column(Text)
    artifact_sha256: Mapped[str | None] = mapped_column(String(64))
    artifact_size: Mapped[int | None] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    metrics: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # Library version at which the expert became routable and at which it was retired (see library_changes);
    # routing pinned to version v sees experts added at <= v and not retired at <= v.
    library_version: Mapped[int | None] = mapped_column(Integer, unique=True)
    retired_at_version: Mapped[int | None] = mapped_column(Integer)
    merge_method: Mapped[str | None] = mapped_column(String(32))
    merge_params: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[dt.datetime] = _now()
    ready_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    tags: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    description: Mapped[str | None] = mapped_column(Text)


class ExpertAliasRow(Base):
    """A name for one expert of a task (``strategyqa@prod``) that moves when its row is updated (migration 0010)."""

    __tablename__ = "expert_aliases"

    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    updated_at: Mapped[dt.datetime] = _now()


class ExpertAliasMoveRow(Base):
    """Every move of an alias, for audit: NULL ``from_expert_id`` is a new alias, NULL ``to_expert_id`` a removal."""

    __tablename__ = "expert_alias_moves"
    __table_args__ = (
        CheckConstraint("from_expert_id IS NOT NULL OR to_expert_id IS NOT NULL", name="moved"),
        Index("ix_expert_alias_moves_task_id_alias", "task_id", "alias"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))
    alias: Mapped[str] = mapped_column(String(64))
    from_expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"))
    to_expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"))
    moved_by: Mapped[str] = mapped_column(String(200))
    moved_at: Mapped[dt.datetime] = _now()


class ExpertParentRow(Base):
    """Lineage of merged experts: which parents, in which order, with which weight."""

    __tablename__ = "expert_parents"

    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), primary_key=True, index=True)
    position: Mapped[int] = mapped_column(Integer)
    weight: Mapped[float] = mapped_column(Float)


class LibraryChangeRow(Base):
    """The library's history: each version is one expert added or retired, so any past state can be rebuilt."""

    __tablename__ = "library_changes"
    __table_args__ = (
        CheckConstraint(_in("change", ("added", "retired")), name="change"),
        UniqueConstraint("expert_id", "change"),
    )

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"))
    change: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = _now()


class LibraryEntryRow(Base):
    __tablename__ = "library_entries"
    __table_args__ = (UniqueConstraint("expert_id", "embedder_id", "sample_index"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), index=True)
    embedder_id: Mapped[int] = mapped_column(ForeignKey("embedders.id"), index=True)
    sample_index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    embedding: Mapped[Any] = mapped_column(Vector())


class ExpertCentroidRow(Base):
    """The normalised mean of an expert's library embeddings for one embedder (the centroid router's library),
    kept whenever entries are written (migration 0006)."""

    __tablename__ = "expert_centroids"

    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id", ondelete="CASCADE"), primary_key=True)
    embedder_id: Mapped[int] = mapped_column(ForeignKey("embedders.id"), primary_key=True)
    embedding: Mapped[Any] = mapped_column(Vector())
    entries: Mapped[int] = mapped_column(Integer)


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint("attempts >= 0 AND max_attempts > 0", name="attempts"),
        # Claiming scans queued jobs by priority and time; a partial index keeps that scan small.
        Index("ix_jobs_claimable", "priority", "run_after", postgresql_where=text("status = 'queued'")),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'queued'"), index=True)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    run_after: Mapped[dt.datetime] = _now()
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # Stops a task's training from being enqueued twice (e.g. 'train-task:42').
    dedupe_key: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = _now()
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class TrainingRunRow(Base):
    __tablename__ = "training_runs"
    __table_args__ = (CheckConstraint(_in("status", ("running", "succeeded", "failed")), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"), index=True)
    worker: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), server_default=text("'running'"))
    config: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    metrics: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = _now()
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class RoutingDecisionRow(Base):
    __tablename__ = "routing_decisions"
    __table_args__ = (
        CheckConstraint("q > 0 AND top_k > 0", name="q_top_k_positive"),
        # Newest-first audit queries and pruning by date (migration 0005).
        Index("ix_routing_decisions_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    created_at: Mapped[dt.datetime] = _now()
    caller_label: Mapped[str | None] = mapped_column(String(200), index=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), index=True)
    embedder_id: Mapped[int | None] = mapped_column(ForeignKey("embedders.id"))  # None: in-model routing
    backbone_id: Mapped[int | None] = mapped_column(ForeignKey("backbones.id"))
    library_version: Mapped[int] = mapped_column(Integer)
    q: Mapped[int] = mapped_column(Integer)
    top_k: Mapped[int] = mapped_column(Integer)
    kinds: Mapped[list[Any] | None] = mapped_column()
    chosen_expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"), index=True)
    latency_ms: Mapped[float] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    # The vote margin, kept with the decision so that audit queries over many decisions need not count votes.
    winner_votes: Mapped[int | None] = mapped_column(Integer)
    runner_up_votes: Mapped[int | None] = mapped_column(Integer)
    runner_up_expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"))
    # The routing method that decided and its parameters (migration 0006; earlier decisions were RoE's).
    router: Mapped[str] = mapped_column(String(32), server_default=text("'roe'"))
    router_params: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))


class RoutingDailyChoiceRow(Base):
    """Decisions per day, task (or caller label) and chosen expert, kept as decisions are recorded (migration
    0005): ``audit_choices_by_task`` and ``audit_experts_never_chosen`` read this instead of every decision."""

    __tablename__ = "routing_daily_choices"
    __table_args__ = (
        UniqueConstraint(
            "day", "task_id", "caller_label", "chosen_expert_id", postgresql_nulls_not_distinct=True
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    day: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    caller_label: Mapped[str | None] = mapped_column(String(200))
    chosen_expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"), index=True)
    decisions: Mapped[int] = mapped_column(Integer)
    first_version: Mapped[int] = mapped_column(Integer)
    last_version: Mapped[int] = mapped_column(Integer)


class RoutingVoteRow(Base):
    __tablename__ = "routing_votes"

    decision_id: Mapped[int] = mapped_column(
        ForeignKey("routing_decisions.id", ondelete="CASCADE"), primary_key=True
    )
    query_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    # NULL when the vote matched an expert's centroid rather than a library sample (migration 0006).
    library_entry_id: Mapped[int | None] = mapped_column(ForeignKey("library_entries.id"), index=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    score: Mapped[float] = mapped_column(Float)
    # What the vote counted for in its router's tally (1 for RoE; the similarity for a weighted kNN).
    weight: Mapped[float] = mapped_column(Float, server_default=text("1.0"))


class BenchmarkRunRow(Base):
    __tablename__ = "benchmark_runs"
    __table_args__ = (CheckConstraint(_in("status", ("running", "succeeded", "failed")), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), server_default=text("'running'"))
    since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    suite: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    summary: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    report_uri: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[dt.datetime] = _now()
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class EvaluationRow(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    expert_id: Mapped[int | None] = mapped_column(ForeignKey("experts.id"), index=True)
    # 'roe', 'oracle', 'base' or 'expert'; for roe/oracle expert_id is the expert that was used.
    route: Mapped[str] = mapped_column(String(32))
    split: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    n_examples: Mapped[int] = mapped_column(Integer)
    library_version: Mapped[int | None] = mapped_column(Integer)
    benchmark_run_id: Mapped[int | None] = mapped_column(ForeignKey("benchmark_runs.id"), index=True)
    details: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[dt.datetime] = _now()


class ApiKeyRow(Base):
    """A key of ``elmreg serve``'s HTTP API: only the key's sha256 is kept, so a leaked catalogue leaks no key."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint(
            "(rate_per_second IS NULL OR rate_per_second > 0) AND (max_concurrent IS NULL OR max_concurrent > 0)",
            name="limits_positive",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    # The key's first characters, to tell keys apart in listings without being able to use one.
    prefix: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = _now()
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Limits of the key's callers on a server (migration 0009; NULL: none).
    rate_per_second: Mapped[float | None] = mapped_column(Float)
    max_concurrent: Mapped[int | None] = mapped_column(Integer)


def hnsw_index_name(embedder_id: int) -> str:
    """Name of the per-embedder HNSW index over ``library_entries.embedding``."""
    return f"ix_library_entries_embedding_hnsw_e{embedder_id}"
