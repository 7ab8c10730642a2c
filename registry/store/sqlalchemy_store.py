"""The catalogue on PostgreSQL + pgvector, through SQLAlchemy 2.0."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from elmreg.registry.errors import CatalogueError, NotFoundError, UserError
from elmreg.registry.store import schema
from elmreg.registry.store.abstract import RegistryStore
from elmreg.registry.store.entities import (
    Backbone,
    CatalogueSummary,
    Embedder,
    Expert,
    Job,
    LibraryEntry,
    LibraryHit,
    StoredArtifact,
    Task,
    TrainingRun,
)
from elmreg.registry.store.models import (
    BackboneRow,
    Base,
    EmbedderRow,
    EvaluationRow,
    ExpertParentRow,
    ExpertRow,
    JobRow,
    LibraryChangeRow,
    LibraryEntryRow,
    TaskRow,
    TrainingRunRow,
    hnsw_index_name,
)
from elmreg.registry.store.session import ManagedSessions, translate_error

# Serialises library version numbers across every process that publishes or retires experts.
_LIBRARY_VERSION_LOCK = 0x656C6D726567  # "elmreg"
# HNSW build parameters (pgvector defaults); ef_search is set per query by the router.
_HNSW_M, _HNSW_EF_CONSTRUCTION = 16, 64


def _backbone(row: BackboneRow) -> Backbone:
    return Backbone(row.id, row.name, row.family, row.fingerprint, dict(row.config), row.created_at)


def _embedder(row: EmbedderRow) -> Embedder:
    return Embedder(row.id, row.name, row.dimension, row.normalized, row.created_at)


def _task(row: TaskRow) -> Task:
    return Task(
        id=row.id,
        name=row.name,
        dataset=row.dataset,
        subset=row.subset,
        split=row.split,
        level=row.level,
        task_type=row.task_type,
        metric=row.metric,
        templates=list(row.templates),
        max_examples=row.max_examples,
        expert_kind=row.expert_kind,
        backbone_id=row.backbone_id,
        training_config=dict(row.training_config),
        created_at=row.created_at,
    )


def _expert(row: ExpertRow, parents: Sequence[ExpertParentRow] = ()) -> Expert:
    artifact = (
        StoredArtifact(row.artifact_uri, row.artifact_sha256, row.artifact_size)
        if row.artifact_uri and row.artifact_sha256 and row.artifact_size is not None
        else None
    )
    return Expert(
        id=row.id,
        name=row.name,
        task_id=row.task_id,
        backbone_id=row.backbone_id,
        kind=row.kind,
        status=row.status,
        artifact=artifact,
        config=dict(row.config),
        metrics=dict(row.metrics),
        library_version=row.library_version,
        retired_at_version=row.retired_at_version,
        merge_method=row.merge_method,
        merge_params=dict(row.merge_params) if row.merge_params is not None else None,
        created_at=row.created_at,
        ready_at=row.ready_at,
        retired_at=row.retired_at,
        parents=tuple((p.parent_id, p.weight) for p in sorted(parents, key=lambda p: p.position)),
    )


def _job(row: JobRow) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        payload=dict(row.payload),
        status=row.status,
        priority=row.priority,
        attempts=row.attempts,
        max_attempts=row.max_attempts,
        lease_owner=row.lease_owner,
        lease_expires_at=row.lease_expires_at,
        last_error=row.last_error,
        dedupe_key=row.dedupe_key,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _run(row: TrainingRunRow) -> TrainingRun:
    return TrainingRun(
        id=row.id,
        job_id=row.job_id,
        task_id=row.task_id,
        expert_id=row.expert_id,
        worker=row.worker,
        status=row.status,
        config=dict(row.config),
        metrics=dict(row.metrics),
        error=row.error,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _by_key(session: Session, model: type, key: int | str, what: str):
    column = model.id if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else model.name
    value = int(key) if column is model.id else key
    row = session.scalar(select(model).where(column == value))
    if row is None:
        raise NotFoundError(f"no {what} '{key}': list them with 'elmreg {what}s list'")
    return row


def visible_experts_clause(version_param: str = "library_version") -> str:
    """SQL condition on ``experts e``: routable at the library version bound to ``:<version_param>``."""
    return (
        f"e.library_version IS NOT NULL AND e.library_version <= :{version_param}"
        f" AND (e.retired_at_version IS NULL OR e.retired_at_version > :{version_param})"
    )


class SqlAlchemyStore(RegistryStore):
    """:class:`RegistryStore` on PostgreSQL with pgvector."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.sessions = ManagedSessions(engine)

    # -- status --------------------------------------------------------------------------------------------
    def summary(self) -> CatalogueSummary:
        try:
            revision = schema.current_revision(self.engine)
        except Exception as exc:  # noqa: BLE001 - translated into a user-facing message
            raise translate_error(exc, self.engine.url.render_as_string(hide_password=True)) from exc
        counts: dict[str, int] = {}
        pgvector_version = server_version = None
        with self.sessions() as session:
            server_version = session.scalar(text("SHOW server_version"))
            pgvector_version = session.scalar(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            )
            if revision is not None:
                for table in Base.metadata.sorted_tables:
                    counts[table.name] = session.scalar(select(func.count()).select_from(table)) or 0
        return CatalogueSummary(
            schema_revision=revision,
            head_revision=schema.head_revision(),
            library_version=self.library_version() if revision is not None else 0,
            row_counts=counts,
            pgvector_version=pgvector_version,
            server_version=server_version,
        )

    # -- backbones and embedders ---------------------------------------------------------------------------
    def get_or_create_backbone(
        self, name: str, family: str, fingerprint: str | None = None, config: dict[str, Any] | None = None
    ) -> Backbone:
        with self.sessions() as session:
            # ON CONFLICT: two workers registering the same backbone at once both get the one row.
            session.execute(
                pg_insert(BackboneRow)
                .values(name=name, family=family, fingerprint=fingerprint, config=config or {})
                .on_conflict_do_nothing(index_elements=[BackboneRow.name])
            )
            row = session.scalar(select(BackboneRow).where(BackboneRow.name == name))
            if fingerprint and row.fingerprint is None:
                row.fingerprint = fingerprint
            return _backbone(row)

    def get_backbone(self, key: int | str) -> Backbone:
        with self.sessions() as session:
            return _backbone(_by_key(session, BackboneRow, key, "backbone"))

    def get_or_create_embedder(self, name: str, dimension: int, normalized: bool = True) -> Embedder:
        with self.sessions() as session:
            # ON CONFLICT: two workers publishing their first experts at once must not both create the embedder.
            inserted = session.scalar(
                pg_insert(EmbedderRow)
                .values(name=name, dimension=dimension, normalized=normalized)
                .on_conflict_do_nothing(index_elements=[EmbedderRow.name])
                .returning(EmbedderRow.id)
            )
            row = session.scalar(select(EmbedderRow).where(EmbedderRow.name == name))
            if row.dimension != dimension:
                raise CatalogueError(
                    f"embedder '{name}' is registered with dimension {row.dimension}, not {dimension}"
                )
            if inserted is None:
                return _embedder(row)
            # The column has no fixed dimension; a partial expression index per embedder is what lets
            # pgvector's HNSW serve "ORDER BY embedding::vector(d) <#> q" for that embedder's entries.
            session.execute(
                text(
                    f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(row.id)} ON library_entries "
                    f"USING hnsw ((embedding::vector({int(dimension)})) vector_ip_ops) "
                    f"WITH (m = {_HNSW_M}, ef_construction = {_HNSW_EF_CONSTRUCTION}) "
                    f"WHERE embedder_id = {int(row.id)}"
                )
            )
            return _embedder(row)

    def get_embedder(self, key: int | str) -> Embedder:
        with self.sessions() as session:
            return _embedder(_by_key(session, EmbedderRow, key, "embedder"))

    # -- tasks ---------------------------------------------------------------------------------------------
    def create_task(self, *, enqueue_training: bool = True, **fields: Any) -> tuple[Task, Job | None]:
        with self.sessions() as session:
            row = TaskRow(**fields)
            session.add(row)
            session.flush()
            session.refresh(row)
            job = None
            if enqueue_training:
                job_row = JobRow(kind="train", payload={"task_id": row.id}, dedupe_key=f"train-task:{row.id}")
                session.add(job_row)
                session.flush()
                session.refresh(job_row)
                job = _job(job_row)
            return _task(row), job

    def get_task(self, key: int | str) -> Task:
        with self.sessions() as session:
            return _task(_by_key(session, TaskRow, key, "task"))

    def list_tasks(self) -> list[Task]:
        with self.sessions() as session:
            return [_task(r) for r in session.scalars(select(TaskRow).order_by(TaskRow.id))]

    # -- experts and the library ---------------------------------------------------------------------------
    def create_expert(
        self,
        *,
        name: str,
        backbone_id: int,
        kind: str,
        task_id: int | None = None,
        config: dict[str, Any] | None = None,
        status: str = "pending",
    ) -> Expert:
        if status in ("ready", "retired"):
            raise CatalogueError("an expert becomes ready only through publish_expert, after its upload")
        with self.sessions() as session:
            row = ExpertRow(
                name=name,
                backbone_id=backbone_id,
                kind=kind,
                task_id=task_id,
                config=config or {},
                status=status,
            )
            session.add(row)
            session.flush()
            session.refresh(row)
            return _expert(row)

    def set_expert_status(self, expert_id: int, status: str) -> Expert:
        if status not in ("pending", "training", "failed"):
            raise CatalogueError(f"status '{status}' is set by publish_expert/retire_expert, not directly")
        with self.sessions() as session:
            row = _by_key(session, ExpertRow, expert_id, "expert")
            if row.status in ("ready", "retired"):
                raise CatalogueError(f"expert {row.name} is {row.status}; its status can no longer go back")
            row.status = status
            return _expert(row)

    def _next_version(self, session: Session) -> int:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LIBRARY_VERSION_LOCK})
        return (session.scalar(select(func.max(LibraryChangeRow.version))) or 0) + 1

    def publish_expert(
        self,
        expert_id: int,
        *,
        artifact: StoredArtifact,
        embedder_id: int,
        entries: Sequence[LibraryEntry],
        metrics: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        lease: tuple[int, str] | None = None,
    ) -> Expert:
        with self.sessions() as session:
            if lease is not None:
                self._held(session, *lease)
            row = session.scalar(select(ExpertRow).where(ExpertRow.id == expert_id).with_for_update())
            if row is None:
                raise NotFoundError(f"no expert '{expert_id}'")
            if row.status in ("ready", "retired"):
                raise CatalogueError(f"expert {row.name} is already {row.status}")
            self._copy_entries(session, expert_id, embedder_id, entries)
            version = self._next_version(session)
            session.add(LibraryChangeRow(version=version, expert_id=expert_id, change="added"))
            row.artifact_uri, row.artifact_sha256, row.artifact_size = (
                artifact.uri,
                artifact.sha256,
                artifact.size,
            )
            row.library_version = version
            row.status = "ready"
            row.ready_at = dt.datetime.now(dt.UTC)
            if metrics is not None:
                row.metrics = metrics
            if config is not None:
                row.config = config
            session.flush()
            return _expert(row)

    def get_expert(self, key: int | str) -> Expert:
        with self.sessions() as session:
            row = _by_key(session, ExpertRow, key, "expert")
            parents = session.scalars(
                select(ExpertParentRow).where(ExpertParentRow.expert_id == row.id)
            ).all()
            return _expert(row, parents)

    def list_experts(self, *, status: str | None = None, task_id: int | None = None) -> list[Expert]:
        query = select(ExpertRow).order_by(ExpertRow.id)
        if status is not None:
            query = query.where(ExpertRow.status == status)
        if task_id is not None:
            query = query.where(ExpertRow.task_id == task_id)
        with self.sessions() as session:
            rows = session.scalars(query).all()
            # Lineage of the merged ones in one query, so listed experts carry their parents like get_expert's.
            parents: dict[int, list[ExpertParentRow]] = {}
            merged = [r.id for r in rows if r.kind == "merged"]
            if merged:
                for link in session.scalars(
                    select(ExpertParentRow).where(ExpertParentRow.expert_id.in_(merged))
                ):
                    parents.setdefault(link.expert_id, []).append(link)
            return [_expert(r, parents.get(r.id, ())) for r in rows]

    def retire_expert(self, expert_id: int) -> Expert:
        with self.sessions() as session:
            row = session.scalar(select(ExpertRow).where(ExpertRow.id == expert_id).with_for_update())
            if row is None:
                raise NotFoundError(f"no expert '{expert_id}'")
            if row.status != "ready":
                raise CatalogueError(f"expert {row.name} is {row.status}; only ready experts can be retired")
            version = self._next_version(session)
            session.add(LibraryChangeRow(version=version, expert_id=expert_id, change="retired"))
            row.status, row.retired_at_version = "retired", version
            row.retired_at = dt.datetime.now(dt.UTC)
            session.flush()
            return _expert(row)

    def library_version(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.max(LibraryChangeRow.version))) or 0

    def _copy_entries(
        self, session: Session, expert_id: int, embedder_id: int, entries: Iterable[LibraryEntry]
    ) -> int:
        dimension = session.scalar(select(EmbedderRow.dimension).where(EmbedderRow.id == embedder_id))
        if dimension is None:
            raise NotFoundError(f"no embedder '{embedder_id}'")
        connection = session.connection().connection.driver_connection
        register_vector(connection)
        written = 0
        # Binary COPY: one round trip for all rows, vectors sent as float4 arrays rather than text.
        with (
            connection.cursor() as cursor,
            cursor.copy(
                "COPY library_entries (expert_id, embedder_id, sample_index, text, embedding) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["int4", "int4", "int4", "text", "vector"])
            for entry in entries:
                vector = np.asarray(entry.embedding, dtype=np.float32)
                if vector.shape != (dimension,):
                    raise CatalogueError(
                        f"library entry {entry.sample_index} has shape {vector.shape}; the embedder has {dimension} dims"
                    )
                copy.write_row((expert_id, embedder_id, entry.sample_index, entry.text, vector))
                written += 1
        return written

    def add_library_entries(self, expert_id: int, embedder_id: int, entries: Iterable[LibraryEntry]) -> int:
        with self.sessions() as session:
            _by_key(session, ExpertRow, expert_id, "expert")
            return self._copy_entries(session, expert_id, embedder_id, entries)

    def library_texts(self, expert_id: int, embedder_id: int) -> list[tuple[int, str]]:
        query = (
            select(LibraryEntryRow.sample_index, LibraryEntryRow.text)
            .where(LibraryEntryRow.expert_id == expert_id, LibraryEntryRow.embedder_id == embedder_id)
            .order_by(LibraryEntryRow.sample_index)
        )
        with self.sessions() as session:
            return [(r.sample_index, r.text) for r in session.execute(query)]

    def library_entries(self, expert_id: int, embedder_id: int) -> list[LibraryEntry]:
        query = (
            select(LibraryEntryRow.sample_index, LibraryEntryRow.text, LibraryEntryRow.embedding)
            .where(LibraryEntryRow.expert_id == expert_id, LibraryEntryRow.embedder_id == embedder_id)
            .order_by(LibraryEntryRow.sample_index)
        )
        with self.sessions() as session:
            return [LibraryEntry(r.sample_index, r.text, r.embedding) for r in session.execute(query)]

    def nearest_entries(
        self, embedder_id: int, query: Sequence[float], *, k: int = 1, library_version: int | None = None
    ) -> list[LibraryHit]:
        embedder = self.get_embedder(embedder_id)
        version = self.library_version() if library_version is None else library_version
        vector = "[" + ",".join(repr(float(x)) for x in query) + "]"
        # <#> is the NEGATIVE inner product, so ascending order is most similar first and score = -distance.
        sql = text(
            f"""
            SELECT le.id, le.expert_id, le.sample_index, le.text,
                   -(le.embedding::vector({embedder.dimension}) <#> CAST(:query AS vector({embedder.dimension}))) AS score
            FROM library_entries le JOIN experts e ON e.id = le.expert_id
            WHERE le.embedder_id = :embedder_id AND {visible_experts_clause()}
            ORDER BY le.embedding::vector({embedder.dimension}) <#> CAST(:query AS vector({embedder.dimension}))
            LIMIT :k
            """
        )
        with self.sessions() as session:
            rows = session.execute(
                sql, {"query": vector, "embedder_id": embedder_id, "library_version": version, "k": k}
            ).all()
        return [LibraryHit(r.id, r.expert_id, r.sample_index, r.text, float(r.score)) for r in rows]

    def referenced_artifact_uris(self) -> set[str]:
        with self.sessions() as session:
            return set(
                session.scalars(select(ExpertRow.artifact_uri).where(ExpertRow.artifact_uri.is_not(None)))
            )

    def start_training_run(
        self,
        *,
        task_id: int,
        expert_id: int | None,
        worker: str,
        config: dict[str, Any],
        job_id: int | None = None,
    ) -> TrainingRun:
        with self.sessions() as session:
            row = TrainingRunRow(
                task_id=task_id, expert_id=expert_id, worker=worker, config=config, job_id=job_id
            )
            session.add(row)
            session.flush()
            session.refresh(row)
            return _run(row)

    def finish_training_run(
        self, run_id: int, *, status: str, metrics: dict[str, Any] | None = None, error: str | None = None
    ) -> TrainingRun:
        with self.sessions() as session:
            row = session.get(TrainingRunRow, run_id)
            if row is None:
                raise NotFoundError(f"no training run {run_id}")
            row.status, row.error, row.finished_at = status, error, dt.datetime.now(dt.UTC)
            if metrics is not None:
                row.metrics = metrics
            session.flush()
            return _run(row)

    def abandon_training_runs(self, job_id: int, reason: str) -> int:
        with self.sessions() as session:
            result = session.execute(
                update(TrainingRunRow)
                .where(TrainingRunRow.job_id == job_id, TrainingRunRow.status == "running")
                .values(status="failed", error=reason, finished_at=func.now())
            )
            return result.rowcount

    def list_training_runs(self, *, task_id: int | None = None) -> list[TrainingRun]:
        query = select(TrainingRunRow).order_by(TrainingRunRow.id)
        if task_id is not None:
            query = query.where(TrainingRunRow.task_id == task_id)
        with self.sessions() as session:
            return [_run(r) for r in session.scalars(query)]

    def record_evaluation(
        self,
        *,
        task_id: int,
        expert_id: int | None,
        route: str,
        split: str,
        metric: str,
        score: float,
        n_examples: int,
        library_version: int | None,
        details: dict[str, Any] | None = None,
        benchmark_run_id: int | None = None,
    ) -> int:
        with self.sessions() as session:
            row = EvaluationRow(
                task_id=task_id,
                expert_id=expert_id,
                route=route,
                split=split,
                metric=metric,
                score=score,
                n_examples=n_examples,
                library_version=library_version,
                details=details or {},
                benchmark_run_id=benchmark_run_id,
            )
            session.add(row)
            session.flush()
            return row.id

    def list_evaluations(self, *, task_id: int | None = None) -> list[dict[str, Any]]:
        query = select(EvaluationRow).order_by(EvaluationRow.id)
        if task_id is not None:
            query = query.where(EvaluationRow.task_id == task_id)
        with self.sessions() as session:
            return [
                {c.name: getattr(row, c.name) for c in EvaluationRow.__table__.columns}
                for row in session.scalars(query)
            ]

    def audit_rows(
        self, view: str, *, order_by: str | None, filters: dict[str, Any], limit: int
    ) -> list[dict[str, Any]]:
        # View and column names come from the fixed AUDIT_VIEWS table and the view's own columns, never from
        # free text; the filter values are bound parameters.
        with self.sessions() as session:
            columns = set(session.execute(text(f"SELECT * FROM {view} LIMIT 0")).keys())
            unknown = sorted(set(filters) - columns)
            if unknown:
                raise UserError(f"audit view {view} has no column {', '.join(unknown)}")
            where = " AND ".join(f"{column} = :{column}" for column in filters) or "true"
            order = f"ORDER BY {order_by} DESC" if order_by else ""
            result = session.execute(
                text(f"SELECT * FROM {view} WHERE {where} {order} LIMIT :limit"), {**filters, "limit": limit}
            )
            return [dict(row) for row in result.mappings()]

    # -- merged experts ------------------------------------------------------------------------------------
    def create_merged_expert(
        self,
        *,
        name: str,
        backbone_id: int,
        config: dict[str, Any],
        merge_method: str,
        merge_params: dict[str, Any],
        parents: Sequence[tuple[int, float]],
        artifact: StoredArtifact,
        embedder_id: int | None,
        entries: Sequence[LibraryEntry],
    ) -> Expert:
        parent_ids = [parent_id for parent_id, _ in parents]
        with self.sessions() as session:
            # FOR SHARE: a parent cannot be deleted or changed under a merge that is being recorded.
            found = {
                r.id: r
                for r in session.scalars(
                    select(ExpertRow).where(ExpertRow.id.in_(parent_ids)).with_for_update(read=True)
                )
            }
            for parent_id in parent_ids:
                if parent_id not in found:
                    raise NotFoundError(f"no expert '{parent_id}' to merge")
                if found[parent_id].status != "ready":
                    raise CatalogueError(
                        f"expert {found[parent_id].name} is {found[parent_id].status}; only ready experts are merged"
                    )
            version = self._next_version(session)
            row = ExpertRow(
                name=name,
                backbone_id=backbone_id,
                kind="merged",
                task_id=None,
                config=config,
                status="ready",
                artifact_uri=artifact.uri,
                artifact_sha256=artifact.sha256,
                artifact_size=artifact.size,
                library_version=version,
                merge_method=merge_method,
                merge_params=merge_params,
                ready_at=dt.datetime.now(dt.UTC),
            )
            session.add(row)
            session.flush()
            session.add(LibraryChangeRow(version=version, expert_id=row.id, change="added"))
            lineage = [
                ExpertParentRow(
                    expert_id=row.id, parent_id=parent_id, position=position, weight=float(weight)
                )
                for position, (parent_id, weight) in enumerate(parents)
            ]
            session.add_all(lineage)
            session.flush()
            if entries:
                if embedder_id is None:
                    raise CatalogueError("library entries need the embedder they were made with")
                self._copy_entries(session, row.id, embedder_id, entries)
            session.refresh(row)
            return _expert(row, lineage)

    def find_merged_expert(self, signature: str) -> Expert | None:
        with self.sessions() as session:
            row = session.scalar(
                select(ExpertRow)
                .where(
                    ExpertRow.kind == "merged",
                    ExpertRow.status == "ready",
                    ExpertRow.merge_params["signature"].astext == signature,
                )
                .order_by(ExpertRow.id)
                .limit(1)
            )
            if row is None:
                return None
            parents = session.scalars(
                select(ExpertParentRow).where(ExpertParentRow.expert_id == row.id)
            ).all()
            return _expert(row, parents)

    @contextmanager
    def exclusive(self, key: str) -> Iterator[None]:
        # A session-level advisory lock on its own autocommit connection: held for the whole block (a merge
        # takes seconds to minutes) without keeping a transaction open meanwhile.
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("SELECT pg_advisory_lock(hashtextextended(:key, 0))"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(hashtextextended(:key, 0))"), {"key": key})

    def annotate_routing_decision(self, decision_id: int, details: dict[str, Any]) -> None:
        with self.sessions() as session:
            updated = session.execute(
                text(
                    "UPDATE routing_decisions SET details = details || CAST(:details AS jsonb) WHERE id = :id"
                ),
                {"details": json.dumps(details), "id": decision_id},
            )
            if updated.rowcount != 1:
                raise NotFoundError(f"no routing decision {decision_id}")

    # -- work queue ----------------------------------------------------------------------------------------
    def enqueue_job(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
    ) -> Job:
        with self.sessions() as session:
            if dedupe_key is not None:
                existing = session.scalar(select(JobRow).where(JobRow.dedupe_key == dedupe_key))
                if existing is not None:
                    return _job(existing)
            row = JobRow(
                kind=kind,
                payload=payload,
                dedupe_key=dedupe_key,
                priority=priority,
                max_attempts=max_attempts,
            )
            session.add(row)
            session.flush()
            session.refresh(row)
            return _job(row)

    def claim_job(
        self,
        worker: str,
        *,
        lease_seconds: float,
        kinds: Sequence[str] | None = None,
        job_id: int | None = None,
    ) -> Job | None:
        now = func.now()
        runnable = ((JobRow.status == "queued") & (JobRow.run_after <= now)) | (
            (JobRow.status == "running") & (JobRow.lease_expires_at < now)
        )
        query = select(JobRow).where(runnable)
        if kinds:
            query = query.where(JobRow.kind.in_(list(kinds)))
        if job_id is not None:
            query = query.where(JobRow.id == job_id)
        query = query.order_by(JobRow.priority.desc(), JobRow.run_after, JobRow.id).limit(1)
        with self.sessions() as session:
            row = session.scalar(query.with_for_update(skip_locked=True))
            if row is None:
                return None
            lease = text(f"now() + interval '{float(lease_seconds)} seconds'")
            session.execute(
                update(JobRow)
                .where(JobRow.id == row.id)
                .values(
                    status="running",
                    attempts=JobRow.attempts + 1,
                    lease_owner=worker,
                    lease_expires_at=lease,
                    heartbeat_at=now,
                    started_at=func.coalesce(JobRow.started_at, now),
                )
            )
            session.refresh(row)
            return _job(row)

    def heartbeat(self, job_id: int, worker: str, *, lease_seconds: float) -> bool:
        lease = text(f"now() + interval '{float(lease_seconds)} seconds'")
        with self.sessions() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == worker, JobRow.status == "running")
                .values(lease_expires_at=lease, heartbeat_at=func.now())
            )
            return result.rowcount == 1

    def _held(self, session: Session, job_id: int, worker: str) -> JobRow:
        row = session.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
        if row is None:
            raise NotFoundError(f"no job {job_id}")
        if row.lease_owner != worker or row.status != "running":
            raise CatalogueError(f"job {job_id} is no longer held by {worker} (status {row.status})")
        return row

    def finish_job(self, job_id: int, worker: str) -> Job:
        with self.sessions() as session:
            row = self._held(session, job_id, worker)
            row.status, row.finished_at, row.lease_expires_at = "succeeded", dt.datetime.now(dt.UTC), None
            session.flush()
            return _job(row)

    def fail_job(
        self,
        job_id: int,
        worker: str,
        error: str,
        *,
        retry_delay_seconds: float = 30.0,
        permanent: bool = False,
    ) -> Job:
        with self.sessions() as session:
            row = self._held(session, job_id, worker)
            row.last_error = error[-4000:]
            row.lease_expires_at = None
            if permanent or row.attempts >= row.max_attempts:
                row.status, row.finished_at = "failed", dt.datetime.now(dt.UTC)
            else:
                row.status = "queued"
                row.run_after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retry_delay_seconds)
            session.flush()
            return _job(row)

    def get_job(self, job_id: int) -> Job:
        with self.sessions() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}: list them with 'elmreg jobs list'")
            return _job(row)

    def list_jobs(self, *, status: str | None = None) -> list[Job]:
        query = select(JobRow).order_by(JobRow.id)
        if status is not None:
            query = query.where(JobRow.status == status)
        with self.sessions() as session:
            return [_job(r) for r in session.scalars(query)]
