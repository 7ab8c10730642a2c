"""The catalogue on PostgreSQL: backbones, embedders (each with its HNSW index), tasks, experts, lineage."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from elmreg.registry.entities import (
    AliasMove,
    Backbone,
    Embedder,
    Expert,
    ExpertAlias,
    Job,
    LibraryEntry,
    LibrarySearchOptions,
    Publication,
    StoredArtifact,
    Task,
)
from elmreg.registry.errors import AlreadyExistsError, CatalogueError, InvalidStateError, NotFoundError
from elmreg.registry.names import check_alias, check_task_name, split_alias_ref
from elmreg.registry.pause_points import pause_point
from elmreg.registry.search import ExpertQuery
from elmreg.registry.store.catalogue import CatalogueStore
from elmreg.registry.store.models import (
    BackboneRow,
    EmbedderRow,
    ExpertAliasMoveRow,
    ExpertAliasRow,
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
from elmreg.registry.store.sql.search import search_statement
from elmreg.registry.tags import check_description, check_tags, merged_tags


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
        fields["tags"] = merged_tags({}, fields.get("tags") or {})
        if fields.get("description") is not None:
            check_description(fields["description"])
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
            reference = split_alias_ref(key) if isinstance(key, str) else None
            if reference is not None:
                row = _aliased_expert(session, *reference)
            else:
                row = records.by_key(session, ExpertRow, key, "expert")
            parents = session.scalars(
                select(ExpertParentRow).where(ExpertParentRow.expert_id == row.id)
            ).all()
            return records.expert(row, parents, _alias_refs(session, [row.id]).get(row.id, ()))

    def search_experts(self, query: ExpertQuery) -> list[Expert]:
        with self.sessions() as session:
            rows = session.scalars(search_statement(query)).all()
            ids = [r.id for r in rows]
            parents: dict[int, list[ExpertParentRow]] = {}
            merged = [r.id for r in rows if r.kind == "merged"]
            if merged:
                for link in session.scalars(
                    select(ExpertParentRow).where(ExpertParentRow.expert_id.in_(merged))
                ):
                    parents.setdefault(link.expert_id, []).append(link)
            aliases = _alias_refs(session, ids)
            return [records.expert(r, parents.get(r.id, ()), aliases.get(r.id, ())) for r in rows]

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
            aliases = _alias_refs(session, [r.id for r in rows])
            return [records.expert(r, parents.get(r.id, ()), aliases.get(r.id, ())) for r in rows]

    def retire_expert(self, expert_id: int, *, force: bool = False, moved_by: str = "") -> Expert:
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
            # The expert row is locked, and set_alias takes it FOR SHARE: no alias can land on it meanwhile.
            aliases = session.scalars(
                select(ExpertAliasRow)
                .where(ExpertAliasRow.expert_id == expert_id)
                .order_by(ExpertAliasRow.task_id, ExpertAliasRow.alias)
                .with_for_update()
            ).all()
            if aliases and not force:
                refs = ", ".join(_alias_refs(session, [expert_id])[expert_id])
                raise InvalidStateError(
                    f"expert {row.name} is aliased as {refs}: move the alias first "
                    "('elmreg experts alias set'), or retire with --force to remove it"
                )
            for alias in aliases:
                session.add(_move(alias.task_id, alias.alias, expert_id, None, moved_by))
                session.delete(alias)
            version = next_library_version(session)
            session.add(LibraryChangeRow(version=version, expert_id=expert_id, change="retired"))
            row.status, row.retired_at_version = "retired", version
            row.retired_at = dt.datetime.now(dt.UTC)
            session.flush()
            return records.expert(row)

    # -- aliases, tags and descriptions --------------------------------------------------------------------
    def set_alias(self, task_id: int, alias: str, expert_id: int, *, moved_by: str) -> AliasMove | None:
        check_alias(alias)
        with self.sessions() as session:
            # The task row's lock serialises the moves of its aliases: each reads the alias, then writes it.
            task = session.scalar(select(TaskRow).where(TaskRow.id == task_id).with_for_update())
            if task is None:
                raise NotFoundError(f"no task '{task_id}'")
            # FOR SHARE: the expert cannot be retired while an alias lands on it (retire locks it FOR UPDATE).
            expert = session.scalar(
                select(ExpertRow).where(ExpertRow.id == expert_id).with_for_update(read=True)
            )
            if expert is None:
                raise NotFoundError(f"no expert '{expert_id}'")
            if expert.task_id != task.id:
                owner = (
                    f"of task {session.get(TaskRow, expert.task_id).name}"
                    if expert.task_id is not None
                    else "of no task (a merge)"
                )
                raise InvalidStateError(
                    f"expert {expert.name} is an expert {owner}, not of {task.name}: "
                    f"{task.name}@{alias} can only name an expert of {task.name}"
                )
            if expert.status != "ready":
                raise InvalidStateError(
                    f"expert {expert.name} is {expert.status}; only ready experts are aliased"
                )
            row = session.get(ExpertAliasRow, (task_id, alias))
            if row is not None and row.expert_id == expert_id:
                return None
            previous = row.expert_id if row is not None else None
            if row is None:
                session.add(ExpertAliasRow(task_id=task_id, alias=alias, expert_id=expert_id))
            else:
                row.expert_id, row.updated_at = expert_id, dt.datetime.now(dt.UTC)
            move = _move(task_id, alias, previous, expert_id, moved_by)
            session.add(move)
            session.flush()
            return _alias_move(session, move)

    def remove_alias(self, task_id: int, alias: str, *, moved_by: str) -> AliasMove:
        with self.sessions() as session:
            task = session.scalar(select(TaskRow).where(TaskRow.id == task_id).with_for_update())
            if task is None:
                raise NotFoundError(f"no task '{task_id}'")
            row = session.get(ExpertAliasRow, (task_id, alias))
            if row is None:
                raise NotFoundError(_no_alias(session, task, alias))
            move = _move(task_id, alias, row.expert_id, None, moved_by)
            session.add(move)
            session.delete(row)
            session.flush()
            return _alias_move(session, move)

    def list_aliases(self, task_id: int | None = None) -> list[ExpertAlias]:
        query = (
            select(ExpertAliasRow, TaskRow.name, ExpertRow.name)
            .join(TaskRow, TaskRow.id == ExpertAliasRow.task_id)
            .join(ExpertRow, ExpertRow.id == ExpertAliasRow.expert_id)
            .order_by(TaskRow.name, ExpertAliasRow.alias)
        )
        if task_id is not None:
            query = query.where(ExpertAliasRow.task_id == task_id)
        with self.sessions() as session:
            return [
                ExpertAlias(task, row.alias, row.expert_id, expert, row.updated_at)
                for row, task, expert in session.execute(query)
            ]

    def alias_moves(self, task_id: int | None = None, alias: str | None = None) -> list[AliasMove]:
        query = select(ExpertAliasMoveRow).order_by(ExpertAliasMoveRow.id)
        if task_id is not None:
            query = query.where(ExpertAliasMoveRow.task_id == task_id)
        if alias is not None:
            query = query.where(ExpertAliasMoveRow.alias == alias)
        with self.sessions() as session:
            return [_alias_move(session, move) for move in session.scalars(query)]

    def tag_task(
        self,
        task_id: int,
        *,
        tags: dict[str, str] | None = None,
        remove: Sequence[str] = (),
        description: str | None = None,
    ) -> Task:
        with self.sessions() as session:
            row = session.scalar(select(TaskRow).where(TaskRow.id == task_id).with_for_update())
            if row is None:
                raise NotFoundError(f"no task '{task_id}'")
            _tag(row, tags, remove, description)
            return records.task(row)

    def tag_expert(
        self,
        expert_id: int,
        *,
        tags: dict[str, str] | None = None,
        remove: Sequence[str] = (),
        description: str | None = None,
    ) -> Expert:
        with self.sessions() as session:
            row = session.scalar(select(ExpertRow).where(ExpertRow.id == expert_id).with_for_update())
            if row is None:
                raise NotFoundError(f"no expert '{expert_id}'")
            _tag(row, tags, remove, description)
            return records.expert(row, (), _alias_refs(session, [row.id]).get(row.id, ()))

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


def _aliased_expert(session: Session, task_name: str, alias: str) -> ExpertRow:
    task = records.by_key(session, TaskRow, task_name, "task")
    row = session.scalar(
        select(ExpertRow)
        .join(ExpertAliasRow, ExpertAliasRow.expert_id == ExpertRow.id)
        .where(ExpertAliasRow.task_id == task.id, ExpertAliasRow.alias == alias)
    )
    if row is None:
        raise NotFoundError(_no_alias(session, task, alias))
    return row


def _no_alias(session: Session, task: TaskRow, alias: str) -> str:
    known = session.scalars(
        select(ExpertAliasRow.alias).where(ExpertAliasRow.task_id == task.id).order_by(ExpertAliasRow.alias)
    ).all()
    return f"task {task.name} has no alias '{alias}' (aliases: {', '.join(known) or 'none'})"


def _alias_refs(session: Session, expert_ids: Sequence[int]) -> dict[int, list[str]]:
    """``task@alias`` of each alias naming one of ``expert_ids``."""
    refs: dict[int, list[str]] = {}
    if not expert_ids:
        return refs
    for expert_id, task, alias in session.execute(
        select(ExpertAliasRow.expert_id, TaskRow.name, ExpertAliasRow.alias)
        .join(TaskRow, TaskRow.id == ExpertAliasRow.task_id)
        .where(ExpertAliasRow.expert_id.in_(list(expert_ids)))
        .order_by(TaskRow.name, ExpertAliasRow.alias)
    ):
        refs.setdefault(expert_id, []).append(f"{task}@{alias}")
    return refs


def _move(
    task_id: int, alias: str, from_id: int | None, to_id: int | None, moved_by: str
) -> ExpertAliasMoveRow:
    return ExpertAliasMoveRow(
        task_id=task_id,
        alias=alias,
        from_expert_id=from_id,
        to_expert_id=to_id,
        moved_by=moved_by or "unknown",
    )


def _alias_move(session: Session, move: ExpertAliasMoveRow) -> AliasMove:
    session.refresh(move)
    names = dict(
        session.execute(
            select(ExpertRow.id, ExpertRow.name).where(
                ExpertRow.id.in_([i for i in (move.from_expert_id, move.to_expert_id) if i is not None])
            )
        ).all()
    )
    return AliasMove(
        id=move.id,
        task=session.get(TaskRow, move.task_id).name,
        alias=move.alias,
        from_expert=names.get(move.from_expert_id),
        to_expert=names.get(move.to_expert_id),
        moved_by=move.moved_by,
        moved_at=move.moved_at,
    )


def _tag(
    row: TaskRow | ExpertRow, tags: dict[str, str] | None, remove: Sequence[str], description: str | None
) -> None:
    row.tags = merged_tags(row.tags or {}, check_tags(tags or {}), remove)
    if description is not None:
        row.description = check_description(description) or None
