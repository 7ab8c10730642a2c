"""Evaluations and benchmark runs on PostgreSQL."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Integer, exists, func, select

from elmreg.registry.entities import BenchmarkCell, BenchmarkRun, Evaluation
from elmreg.registry.errors import NotFoundError
from elmreg.registry.store.evaluations import EvaluationStore
from elmreg.registry.store.models import BenchmarkRunRow, EvaluationRow, ExpertRow, TaskRow
from elmreg.registry.store.session import ManagedSessions
from elmreg.registry.store.sql import records


class SqlEvaluationStore(EvaluationStore):
    """:class:`EvaluationStore` on PostgreSQL."""

    def __init__(self, sessions: ManagedSessions):
        self.sessions = sessions

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

    def list_evaluations(self, *, task_id: int | None = None) -> list[Evaluation]:
        query = select(EvaluationRow).order_by(EvaluationRow.id)
        if task_id is not None:
            query = query.where(EvaluationRow.task_id == task_id)
        with self.sessions() as session:
            return [records.evaluation(row) for row in session.scalars(query)]

    def start_benchmark_run(self, *, since: dt.datetime | None, suite: dict[str, Any]) -> BenchmarkRun:
        with self.sessions() as session:
            row = BenchmarkRunRow(since=since, suite=suite)
            session.add(row)
            session.flush()
            session.refresh(row)
            return records.benchmark_run(row)

    def finish_benchmark_run(
        self, run_id: int, *, status: str, summary: dict[str, Any], report_uri: str | None
    ) -> BenchmarkRun:
        with self.sessions() as session:
            row = session.get(BenchmarkRunRow, run_id)
            if row is None:
                raise NotFoundError(f"no benchmark run {run_id}")
            row.status, row.summary, row.report_uri = status, summary, report_uri
            row.finished_at = dt.datetime.now(dt.UTC)
            session.flush()
            return records.benchmark_run(row)

    def last_benchmark_start(self) -> dt.datetime | None:
        with self.sessions() as session:
            return session.scalar(
                select(func.max(BenchmarkRunRow.started_at)).where(BenchmarkRunRow.status == "succeeded")
            )

    def benchmark_expert_scores(self, task_id: int, *, split: str, limit: int) -> dict[int, float]:
        latest = (
            select(func.max(EvaluationRow.id))
            .join(BenchmarkRunRow, BenchmarkRunRow.id == EvaluationRow.benchmark_run_id)
            .where(
                BenchmarkRunRow.status == "succeeded",
                EvaluationRow.route == "expert",
                EvaluationRow.task_id == task_id,
                EvaluationRow.split == split,
                BenchmarkRunRow.suite["limit"].astext.cast(Integer) == limit,
            )
            .group_by(EvaluationRow.expert_id)
        )
        query = select(EvaluationRow.expert_id, EvaluationRow.score).where(EvaluationRow.id.in_(latest))
        with self.sessions() as session:
            return {expert_id: score for expert_id, score in session.execute(query)}

    def latest_benchmark_scores(self) -> tuple[BenchmarkRun, list[BenchmarkCell]] | None:
        scored_experts = exists().where(
            EvaluationRow.benchmark_run_id == BenchmarkRunRow.id, EvaluationRow.route == "expert"
        )
        with self.sessions() as session:
            # The latest finished run that scored experts (a run can have found none on the suite's backbones).
            run = session.scalar(
                select(BenchmarkRunRow)
                .where(BenchmarkRunRow.status == "succeeded", scored_experts)
                .order_by(BenchmarkRunRow.id.desc())
                .limit(1)
            )
            if run is None:
                return None
            cells = session.execute(
                select(
                    TaskRow.name,
                    func.coalesce(ExpertRow.name, ""),
                    EvaluationRow.route,
                    EvaluationRow.metric,
                    EvaluationRow.score,
                )
                .join(TaskRow, TaskRow.id == EvaluationRow.task_id)
                .outerjoin(ExpertRow, ExpertRow.id == EvaluationRow.expert_id)
                .where(EvaluationRow.benchmark_run_id == run.id)
                .order_by(EvaluationRow.id)
            ).all()
            return records.benchmark_run(run), [BenchmarkCell(*cell) for cell in cells]
