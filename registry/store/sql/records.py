"""ORM rows -> the frozen records of ``entities``, and the lookups every SQL store shares."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from elmreg.registry.entities import (
    Backbone,
    BenchmarkRun,
    Embedder,
    Evaluation,
    Expert,
    Job,
    StoredArtifact,
    Task,
    TrainingRun,
)
from elmreg.registry.errors import NotFoundError
from elmreg.registry.store.models import (
    BackboneRow,
    BenchmarkRunRow,
    EmbedderRow,
    EvaluationRow,
    ExpertParentRow,
    ExpertRow,
    JobRow,
    TaskRow,
    TrainingRunRow,
)


def backbone(row: BackboneRow) -> Backbone:
    return Backbone(row.id, row.name, row.family, row.fingerprint, dict(row.config), row.created_at)


def embedder(row: EmbedderRow) -> Embedder:
    artifact = (
        StoredArtifact(row.artifact_uri, row.artifact_sha256, row.artifact_size)
        if row.artifact_uri is not None
        else None
    )
    return Embedder(
        row.id,
        row.name,
        row.dimension,
        row.normalized,
        row.created_at,
        artifact=artifact,
        trained_from_id=row.trained_from_id,
        training=dict(row.training) if row.training is not None else None,
    )


def task(row: TaskRow) -> Task:
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
        tags=dict(row.tags),
        description=row.description,
    )


def expert(row: ExpertRow, parents: Sequence[ExpertParentRow] = (), aliases: Sequence[str] = ()) -> Expert:
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
        tags=dict(row.tags),
        description=row.description,
        aliases=tuple(sorted(aliases)),
    )


def job(row: JobRow) -> Job:
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


def training_run(row: TrainingRunRow) -> TrainingRun:
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


def evaluation(row: EvaluationRow) -> Evaluation:
    return Evaluation(
        id=row.id,
        task_id=row.task_id,
        expert_id=row.expert_id,
        route=row.route,
        split=row.split,
        metric=row.metric,
        score=row.score,
        n_examples=row.n_examples,
        library_version=row.library_version,
        benchmark_run_id=row.benchmark_run_id,
        details=dict(row.details),
        created_at=row.created_at,
    )


def benchmark_run(row: BenchmarkRunRow) -> BenchmarkRun:
    return BenchmarkRun(
        id=row.id,
        status=row.status,
        since=row.since,
        suite=dict(row.suite),
        summary=dict(row.summary),
        report_uri=row.report_uri,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def by_key(session: Session, model: type, key: int | str, what: str):
    """The row of ``model`` whose id (an int or digits) or name is ``key``. Raises NotFoundError."""
    column = model.id if isinstance(key, int) or (isinstance(key, str) and key.isdigit()) else model.name
    value = int(key) if column is model.id else key
    row = session.scalar(select(model).where(column == value))
    if row is None:
        raise NotFoundError(f"no {what} '{key}': list them with 'elmreg {what}s list'")
    return row
