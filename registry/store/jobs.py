"""The work queue (jobs with leases), the training runs workers record, and locks across processes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

from elmreg.registry.entities import Job, TrainingRun


class HeldLock(ABC):
    """A lock taken with :meth:`JobStore.try_lock`; held until :meth:`release` or until the process dies."""

    @abstractmethod
    def held(self) -> bool:
        """Whether the lock is still held: False once the connection it lives on is gone (the database
        restarted), after which someone else may hold it. Not safe to call from two threads at once."""

    @abstractmethod
    def release(self) -> None:
        """Let the lock go (idempotent)."""


class JobStore(ABC):
    """Jobs that any number of workers claim concurrently, training runs, and named locks."""

    @abstractmethod
    def enqueue_job(
        self,
        kind: str,
        payload: dict[str, Any],
        *,
        dedupe_key: str | None = None,
        priority: int = 0,
        max_attempts: int = 3,
    ) -> Job:
        """Queue a job. With a ``dedupe_key`` that is already queued or done, return that job instead."""

    @abstractmethod
    def claim_job(
        self,
        worker: str,
        *,
        lease_seconds: float,
        kinds: Sequence[str] | None = None,
        job_id: int | None = None,
    ) -> Job | None:
        """Take the next runnable job (queued, or running with an expired lease) for ``worker``; with
        ``job_id``, that job only.

        Uses ``FOR UPDATE SKIP LOCKED`` so that any number of workers on any number of machines can claim
        concurrently and each job goes to exactly one of them.
        """

    @abstractmethod
    def heartbeat(self, job_id: int, worker: str, *, lease_seconds: float) -> bool:
        """Extend the lease; returns False when the worker no longer holds it (it must stop)."""

    @abstractmethod
    def finish_job(self, job_id: int, worker: str) -> Job:
        """Mark a job the worker holds as succeeded."""

    @abstractmethod
    def fail_job(
        self,
        job_id: int,
        worker: str,
        error: str,
        *,
        retry_delay_seconds: float = 30.0,
        permanent: bool = False,
    ) -> Job:
        """Record a failure: queue the job again after a delay, or mark it failed once attempts are used up
        (at once when ``permanent``: a failure that retrying cannot fix, such as bad task data)."""

    @abstractmethod
    def release_job(self, job_id: int, worker: str, reason: str) -> Job:
        """Give a held job back to the queue at once (the worker is stopping): it is runnable again now, and the
        interrupted attempt does not count against ``max_attempts``.

        Raises:
            CatalogueError: ``worker`` no longer holds the job.
        """

    @abstractmethod
    def get_job(self, job_id: int) -> Job:
        """Look a job up. Raises NotFoundError."""

    @abstractmethod
    def list_jobs(self, *, status: str | None = None) -> list[Job]:
        """Jobs, oldest first."""

    # -- training runs -------------------------------------------------------------------------------------
    @abstractmethod
    def start_training_run(
        self,
        *,
        task_id: int,
        expert_id: int | None,
        worker: str,
        config: dict[str, Any],
        job_id: int | None = None,
    ) -> TrainingRun:
        """Record that ``worker`` started training an expert for a task."""

    @abstractmethod
    def finish_training_run(
        self, run_id: int, *, status: str, metrics: dict[str, Any] | None = None, error: str | None = None
    ) -> TrainingRun:
        """Close a training run as 'succeeded' or 'failed'."""

    @abstractmethod
    def abandon_training_runs(self, job_id: int, reason: str) -> int:
        """Close the still-running runs of a job whose worker vanished (its job was re-claimed) as failed."""

    @abstractmethod
    def list_training_runs(
        self, *, task_id: int | None = None, status: str | None = None
    ) -> list[TrainingRun]:
        """Training runs, oldest first, optionally filtered."""

    # -- locks across processes ----------------------------------------------------------------------------
    @abstractmethod
    def exclusive(self, key: str, *, shared: bool = False) -> AbstractContextManager[None]:
        """A context manager holding a lock named ``key`` across every process that uses this catalogue, so that
        work which must not run twice at once (the same merge requested by two callers) runs once. Waits.

        Args:
            shared: Take the lock in shared mode: any number of shared holders at once, but none while someone
                holds it exclusively (publishers share the artifacts lock; garbage collection takes it alone).
        """

    @abstractmethod
    def try_lock(self, key: str) -> HeldLock | None:
        """Take the lock named ``key`` if nobody holds it, without waiting (None when someone does). It stays
        held until released or until this process's connection dies, so a crashed holder frees it."""
