"""The work queue on PostgreSQL: ``FOR UPDATE SKIP LOCKED`` claims, leases, and advisory locks."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from elmreg.registry.entities import Job, TrainingRun
from elmreg.registry.errors import CatalogueError, NotFoundError
from elmreg.registry.store.jobs import HeldLock, JobStore
from elmreg.registry.store.models import JobRow, TrainingRunRow
from elmreg.registry.store.session import ManagedSessions
from elmreg.registry.store.sql import records

_log = logging.getLogger(__name__)


def held_lease(session: Session, job_id: int, worker: str) -> JobRow:
    """The job's row, locked, if ``worker`` still holds its lease. Raises CatalogueError otherwise."""
    row = session.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
    if row is None:
        raise NotFoundError(f"no job {job_id}")
    if row.lease_owner != worker or row.status != "running":
        raise CatalogueError(f"job {job_id} is no longer held by {worker} (status {row.status})")
    return row


def _fail_exhausted_leases(session: Session) -> None:
    """End the jobs whose worker vanished (lease expired) on their last attempt. Such a job may kill every
    worker that runs it (out of memory, a crashing kernel, kill -9 by an orchestrator): re-claiming it would
    loop forever. Their still-open training runs are closed with them."""
    now = func.now()
    exhausted = (
        select(JobRow.id)
        .where(
            JobRow.status == "running", JobRow.lease_expires_at < now, JobRow.attempts >= JobRow.max_attempts
        )
        .with_for_update(skip_locked=True)
    )
    reason = func.format(
        "the worker running this job was lost %s times (its lease expired without a heartbeat; last worker %s):"
        " it may crash whatever runs it (memory, a kernel, a kill); see that worker's log",
        JobRow.attempts,
        JobRow.lease_owner,
    )
    failed = session.execute(
        update(JobRow)
        .where(JobRow.id.in_(exhausted))
        .values(status="failed", finished_at=now, lease_expires_at=None, last_error=reason)
        .returning(JobRow.id, JobRow.last_error)
    ).all()
    for job_id, error in failed:
        session.execute(
            update(TrainingRunRow)
            .where(TrainingRunRow.job_id == job_id, TrainingRunRow.status == "running")
            .values(status="failed", error=error, finished_at=now)
        )


def _lease_until(lease_seconds: float):
    return text(f"now() + interval '{float(lease_seconds)} seconds'")


class _AdvisoryLock(HeldLock):
    """A session-level advisory lock; it lives as long as its own connection."""

    def __init__(self, connection: Connection):
        self._connection: Connection | None = connection

    def held(self) -> bool:
        if self._connection is None:
            return False
        try:
            # Nothing but the end of its connection releases a session-level lock: a live connection holds it.
            self._connection.execute(text("SELECT 1"))
            self._connection.commit()
        except DBAPIError:
            self.release()
            return False
        return True

    def release(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                # Unlocked before the connection closes: the server ends a closed connection's backend (and
                # frees its locks) a moment later, and whoever takes the lock next must not see it still held.
                connection.execute(text("SELECT pg_advisory_unlock_all()"))
                connection.commit()
            except DBAPIError:
                pass  # the connection is gone already, and the lock with it
            # Invalidate rather than return it to the pool: a pooled connection would keep any lock it holds.
            connection.invalidate()
            connection.close()


class SqlJobStore(JobStore):
    """:class:`JobStore` on PostgreSQL."""

    def __init__(self, sessions: ManagedSessions):
        self.sessions = sessions

    @property
    def engine(self) -> Engine:
        return self.sessions.engine

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
                    return records.job(existing)
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
            return records.job(row)

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
            _fail_exhausted_leases(session)
            row = session.scalar(query.with_for_update(skip_locked=True))
            if row is None:
                return None
            session.execute(
                update(JobRow)
                .where(JobRow.id == row.id)
                .values(
                    status="running",
                    attempts=JobRow.attempts + 1,
                    lease_owner=worker,
                    lease_expires_at=_lease_until(lease_seconds),
                    heartbeat_at=now,
                    started_at=func.coalesce(JobRow.started_at, now),
                )
            )
            session.refresh(row)
            return records.job(row)

    def heartbeat(self, job_id: int, worker: str, *, lease_seconds: float) -> bool:
        with self.sessions() as session:
            result = session.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == worker, JobRow.status == "running")
                .values(lease_expires_at=_lease_until(lease_seconds), heartbeat_at=func.now())
            )
            return result.rowcount == 1

    def finish_job(self, job_id: int, worker: str) -> Job:
        with self.sessions() as session:
            row = held_lease(session, job_id, worker)
            row.status, row.finished_at, row.lease_expires_at = "succeeded", dt.datetime.now(dt.UTC), None
            session.flush()
            return records.job(row)

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
            row = held_lease(session, job_id, worker)
            row.last_error = error[-4000:]
            row.lease_expires_at = None
            if permanent or row.attempts >= row.max_attempts:
                row.status, row.finished_at = "failed", dt.datetime.now(dt.UTC)
            else:
                row.status = "queued"
                row.run_after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=retry_delay_seconds)
            session.flush()
            return records.job(row)

    def release_job(self, job_id: int, worker: str, reason: str) -> Job:
        with self.sessions() as session:
            row = held_lease(session, job_id, worker)
            row.status, row.lease_owner, row.lease_expires_at = "queued", None, None
            row.attempts = max(row.attempts - 1, 0)
            row.run_after = dt.datetime.now(dt.UTC)
            row.last_error = reason
            session.flush()
            return records.job(row)

    def get_job(self, job_id: int) -> Job:
        with self.sessions() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise NotFoundError(f"no job {job_id}: list them with 'elmreg jobs list'")
            return records.job(row)

    def list_jobs(self, *, status: str | None = None) -> list[Job]:
        query = select(JobRow).order_by(JobRow.id)
        if status is not None:
            query = query.where(JobRow.status == status)
        with self.sessions() as session:
            return [records.job(r) for r in session.scalars(query)]

    # -- training runs -------------------------------------------------------------------------------------
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
            return records.training_run(row)

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
            return records.training_run(row)

    def abandon_training_runs(self, job_id: int, reason: str) -> int:
        with self.sessions() as session:
            result = session.execute(
                update(TrainingRunRow)
                .where(TrainingRunRow.job_id == job_id, TrainingRunRow.status == "running")
                .values(status="failed", error=reason, finished_at=func.now())
            )
            return result.rowcount

    def list_training_runs(
        self, *, task_id: int | None = None, status: str | None = None
    ) -> list[TrainingRun]:
        query = select(TrainingRunRow).order_by(TrainingRunRow.id)
        if task_id is not None:
            query = query.where(TrainingRunRow.task_id == task_id)
        if status is not None:
            query = query.where(TrainingRunRow.status == status)
        with self.sessions() as session:
            return [records.training_run(r) for r in session.scalars(query)]

    # -- locks across processes ----------------------------------------------------------------------------
    @contextmanager
    def exclusive(self, key: str, *, shared: bool = False) -> Iterator[None]:
        # A session-level advisory lock on its own autocommit connection: held for the whole block (a merge
        # takes seconds to minutes) without keeping a transaction open meanwhile.
        mode = "_shared" if shared else ""
        with self.sessions.connect(autocommit=True) as connection:
            connection.execute(
                text(f"SELECT pg_advisory_lock{mode}(hashtextextended(:key, 0))"), {"key": key}
            )
            try:
                yield
            finally:
                try:
                    connection.execute(
                        text(f"SELECT pg_advisory_unlock{mode}(hashtextextended(:key, 0))"), {"key": key}
                    )
                except DBAPIError as exc:
                    if not exc.connection_invalidated:
                        raise
                    # The server restarted during the block and took the lock with the connection: there is
                    # nothing left to unlock, and the block's work is done (a publish committed on a fresh
                    # connection), so raising now would only report a success as a failure. What the lock
                    # guarded stays safe without it: GC leaves objects younger than its grace period alone.
                    _log.warning(
                        "lock %s was lost with its connection (database restarted): %s", key, exc.orig
                    )

    def try_lock(self, key: str) -> HeldLock | None:
        connection = self.sessions.open_connection()
        try:
            with self.sessions.translating():
                got = connection.execute(
                    text("SELECT pg_try_advisory_lock(hashtextextended(:key, 0))"), {"key": key}
                ).scalar()
                connection.commit()
        except BaseException:
            connection.close()
            raise
        if not got:
            connection.close()
            return None
        return _AdvisoryLock(connection)
