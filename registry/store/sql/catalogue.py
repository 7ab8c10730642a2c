"""The catalogue on PostgreSQL: backbones, embedders (each with its HNSW index), tasks, experts, lineage."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from elmreg.registry.entities import (
    Backbone,
    Embedder,
    Expert,
    Job,
    LibraryEntry,
    LibrarySearchOptions,
    Publication,
    StoredArtifact,
    Task,
)
from elmreg.registry.errors import AlreadyExistsError, CatalogueError, InvalidStateError, NotFoundError
from elmreg.registry.names import check_task_name
from elmreg.registry.pause_points import pause_point
from elmreg.registry.store.catalogue import CatalogueStore
from elmreg.registry.store.models import (
    BackboneRow,
    EmbedderRow,
    ExpertParentRow,
    ExpertRow,
    JobRow,
    LibraryChangeRow,
    TaskRow,
)
from elmreg.registry.store.session import ManagedSessions
from elmreg.registry.store.sql import records
from elmreg.registry.store.sql.jobs import held_lease
from elmreg.registry.store.sql.library import (
    copy_entries,
    copy_experts_entries,
    create_hnsw_index_sql,
    next_library_version,
)


class SqlCatalogueStore(CatalogueStore):
    """:class:`CatalogueStore` on PostgreSQL with pgvector."""

    def __init__(self, sessions: ManagedSessions, *, library_options: LibrarySearchOptions | None = None):
        self.sessions = sessions
        # How a new embedder's HNSW index is built (the library_* settings).
        self.library_options = library_options or LibrarySearchOptions()

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
            return records.backbone(row)

    def get_backbone(self, key: int | str) -> Backbone:
        with self.sessions() as session:
            return records.backbone(records.by_key(session, BackboneRow, key, "backbone"))

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
                return records.embedder(row)
            session.execute(text(create_hnsw_index_sql(row.id, dimension, self.library_options)))
            return records.embedder(row)

    def get_embedder(self, key: int | str) -> Embedder:
        with self.sessions() as session:
            return records.embedder(records.by_key(session, EmbedderRow, key, "embedder"))

    def register_trained_embedder(
        self,
        name: str,
        dimension: int,
        artifact: StoredArtifact,
        *,
        trained_from_id: int,
        training: dict[str, Any],
    ) -> Embedder:
        with self.sessions() as session:
            if session.scalar(select(EmbedderRow.id).where(EmbedderRow.name == name)) is not None:
                raise AlreadyExistsError(f"an embedder named '{name}' exists; choose another --name")
            row = EmbedderRow(
                name=name,
                dimension=dimension,
                normalized=True,
                artifact_uri=artifact.uri,
                artifact_sha256=artifact.sha256,
                artifact_size=artifact.size,
                trained_from_id=trained_from_id,
                training=training,
            )
            session.add(row)
            session.flush()  # a concurrent insert of the same name fails here, as a unique violation
            session.execute(text(create_hnsw_index_sql(row.id, dimension, self.library_options)))
            return records.embedder(row)

    def latest_trained_embedder(self) -> Embedder | None:
        with self.sessions() as session:
            row = session.scalar(
                select(EmbedderRow)
                .where(EmbedderRow.artifact_uri.is_not(None))
                .order_by(EmbedderRow.id.desc())
                .limit(1)
            )
            return records.embedder(row) if row is not None else None

    # -- tasks ---------------------------------------------------------------------------------------------
    def create_task(self, *, enqueue_training: bool = True, **fields: Any) -> tuple[Task, Job | None]:
        # Every way a task is created (CLI, API, manifests, the experiment harness) ends here.
        check_task_name(fields["name"])
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
                job = records.job(job_row)
            return records.task(row), job

    def get_task(self, key: int | str) -> Task:
        with self.sessions() as session:
            return records.task(records.by_key(session, TaskRow, key, "task"))

    def list_tasks(self) -> list[Task]:
        with self.sessions() as session:
            return [records.task(r) for r in session.scalars(select(TaskRow).order_by(TaskRow.id))]

    # -- experts -------------------------------------------------------------------------------------------
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
            return records.expert(row)

    def set_expert_status(self, expert_id: int, status: str) -> Expert:
        if status not in ("pending", "training", "failed"):
            raise CatalogueError(f"status '{status}' is set by publish_expert/retire_expert, not directly")
        with self.sessions() as session:
            row = records.by_key(session, ExpertRow, expert_id, "expert")
            if row.status in ("ready", "retired"):
                raise CatalogueError(f"expert {row.name} is {row.status}; its status can no longer go back")
            row.status = status
            return records.expert(row)

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
                held_lease(session, *lease)
            [expert] = self._publish(
                session, [Publication(expert_id, artifact, entries, metrics, config)], embedder_id
            )
            # Tests kill a worker here: every row written and locked, the transaction not yet committed.
            pause_point("publish-commit")
            return expert

    def publish_experts(self, publications: Sequence[Publication], *, embedder_id: int) -> list[Expert]:
        with self.sessions() as session:
            return self._publish(session, publications, embedder_id)

    def _publish(
        self, session: Session, publications: Sequence[Publication], embedder_id: int
    ) -> list[Expert]:
        # A batch is one transaction with one COPY and one wait for the version lock: a bulk import pays those
        # once per batch instead of once per expert.
        ids = [p.expert_id for p in publications]
        rows = {
            row.id: row
            for row in session.scalars(
                select(ExpertRow).where(ExpertRow.id.in_(ids)).order_by(ExpertRow.id).with_for_update()
            )
        }
        for expert_id in ids:
            row = rows.get(expert_id)
            if row is None:
                raise NotFoundError(f"no expert '{expert_id}'")
            if row.status in ("ready", "retired"):
                raise CatalogueError(f"expert {row.name} is already {row.status}")
        copy_experts_entries(session, embedder_id, [(p.expert_id, p.entries) for p in publications])
        first_version = next_library_version(session)
        now = dt.datetime.now(dt.UTC)
        for version, publication in enumerate(publications, start=first_version):
            row = rows[publication.expert_id]
            session.add(LibraryChangeRow(version=version, expert_id=row.id, change="added"))
            artifact = publication.artifact
            row.artifact_uri, row.artifact_sha256, row.artifact_size = (
                artifact.uri,
                artifact.sha256,
                artifact.size,
            )
            row.library_version = version
            row.status = "ready"
            row.ready_at = now
            if publication.metrics is not None:
                row.metrics = publication.metrics
            if publication.config is not None:
                row.config = publication.config
        session.flush()
        return [records.expert(rows[expert_id]) for expert_id in ids]

    def get_expert(self, key: int | str) -> Expert:
        with self.sessions() as session:
            row = records.by_key(session, ExpertRow, key, "expert")
            parents = session.scalars(
                select(ExpertParentRow).where(ExpertParentRow.expert_id == row.id)
            ).all()
            return records.expert(row, parents)

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
            return [records.expert(r, parents.get(r.id, ())) for r in rows]

    def retire_expert(self, expert_id: int) -> Expert:
        with self.sessions() as session:
            row = session.scalar(select(ExpertRow).where(ExpertRow.id == expert_id).with_for_update())
            if row is None:
                raise NotFoundError(f"no expert '{expert_id}'")
            if row.status == "retired":
                raise InvalidStateError(
                    f"expert {row.name} is already retired (at library version {row.retired_at_version})"
                )
            if row.status != "ready":
                raise InvalidStateError(
                    f"expert {row.name} is {row.status}; only ready experts can be retired"
                )
            version = next_library_version(session)
            session.add(LibraryChangeRow(version=version, expert_id=expert_id, change="retired"))
            row.status, row.retired_at_version = "retired", version
            row.retired_at = dt.datetime.now(dt.UTC)
            session.flush()
            return records.expert(row)

    def referenced_artifact_uris(self) -> set[str]:
        with self.sessions() as session:
            # Trained retrievers' weights are referenced too: collecting them would strand their entries.
            return set(
                session.scalars(select(ExpertRow.artifact_uri).where(ExpertRow.artifact_uri.is_not(None)))
            ) | set(
                session.scalars(select(EmbedderRow.artifact_uri).where(EmbedderRow.artifact_uri.is_not(None)))
            )

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
            version = next_library_version(session)
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
                copy_entries(session, row.id, embedder_id, entries)
            session.refresh(row)
            return records.expert(row, lineage)

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
            return records.expert(row, parents)
