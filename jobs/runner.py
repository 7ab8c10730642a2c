"""The worker loop: claim a queued job, keep its lease alive, run its handler, record the outcome.

Any number of workers on any number of machines share one catalogue: claiming uses ``FOR UPDATE SKIP LOCKED``,
so each job goes to one worker; a worker that dies stops heartbeating, its lease expires and another worker
re-claims the job. Handlers are plain functions per job kind (``jobs.handlers``: ``train``, ``benchmark``), so
this loop knows nothing about what a job does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import traceback
from collections.abc import Mapping

from elmreg.jobs.context import Interrupted, JobContext, JobHandler, LeaseLost
from elmreg.jobs.handlers import registered_handlers
from elmreg.registry.entities import Job
from elmreg.registry.errors import ElmregError, ServiceError, UserError, first_line
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext

_log = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 300.0


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Heartbeat(threading.Thread):
    def __init__(self, job: JobContext, lease_seconds: float):
        super().__init__(name=f"heartbeat-{job.job.id}", daemon=True)
        self.job, self.lease_seconds = job, lease_seconds
        self.stopped = threading.Event()

    def run(self) -> None:
        # Three beats per lease: one missed beat (a slow query, a GC pause) does not lose the job.
        while not self.stopped.wait(self.lease_seconds / 3):
            try:
                held = self.job.context.jobs.heartbeat(
                    self.job.job.id, self.job.worker, lease_seconds=self.lease_seconds
                )
            except ElmregError as exc:  # the database blinked; the next beat may get through
                _log.warning("heartbeat for job %s failed: %s", self.job.job.id, exc)
                continue
            if not held:
                self.job._lost.set()
                return


class Worker:
    """Runs queued jobs of the kinds it has handlers for."""

    def __init__(
        self,
        context: RegistryContext,
        handlers: Mapping[str, JobHandler] | None = None,
        *,
        reporter: Reporter = SILENT,
        name: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retry_delay_seconds: float = 30.0,
    ):
        """Args:
        handlers: Handler per job kind; by default every registered one (``jobs.handlers.registered_handlers``).
        reporter: Passed to handlers as ``JobContext.reporter``.
        """
        self.context = context
        self.handlers = dict(registered_handlers() if handlers is None else handlers)
        self.reporter = reporter
        self.name = name or default_worker_name()
        self.lease_seconds = lease_seconds
        self.retry_delay_seconds = retry_delay_seconds
        self._stopping = threading.Event()
        self._current: JobContext | None = None
        self._idle_wait: threading.Event | None = None

    def stop(self) -> None:
        """Stop soon (safe from a signal handler): claim nothing more, and hand the running job back to the queue
        at its next safe point (a training step), so another worker takes it at once instead of after its lease."""
        self._stopping.set()
        if self._idle_wait is not None:
            self._idle_wait.set()
        if (current := self._current) is not None:
            current._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run_once(self, job_id: int | None = None) -> Job | None:
        """Claim and run one job (``job_id``: that one); returns it as it ended, or None if none was runnable
        (or the worker is stopping)."""
        if self.stopping:
            return None
        job = self.context.jobs.claim_job(
            self.name, lease_seconds=self.lease_seconds, kinds=list(self.handlers), job_id=job_id
        )
        if job is None:
            return None
        running = JobContext(self.context, job, self.name, self.reporter)
        self._current = running
        if self.stopping:  # stop() came between the claim and now
            running._stop.set()
        heartbeat = _Heartbeat(running, self.lease_seconds)
        heartbeat.start()
        try:
            self.handlers[job.kind](running)
            running.check_lease()
        except LeaseLost as exc:
            _log.warning("%s", exc)
            return self.context.jobs.get_job(job.id)
        except Interrupted as exc:
            _log.warning("%s", exc)
            return self.context.jobs.release_job(job.id, self.name, str(exc))
        except Exception as exc:  # noqa: BLE001 - any failure is recorded on the job and retried
            # A user error (bad data) will not fix itself: no retries. Anything else may be transient.
            message = str(exc) if isinstance(exc, UserError) else traceback.format_exc()
            _log.error("job %s (%s) failed: %s", job.id, job.kind, first_line(exc))
            return self.context.jobs.fail_job(
                job.id,
                self.name,
                message,
                retry_delay_seconds=self.retry_delay_seconds,
                permanent=isinstance(exc, UserError),
            )
        finally:
            self._current = None
            heartbeat.stopped.set()
            heartbeat.join()
        return self.context.jobs.finish_job(job.id, self.name)

    def run_forever(self, *, poll_seconds: float = 5.0, stop: threading.Event | None = None) -> None:
        """Run jobs until ``stop`` is set; sleeps ``poll_seconds`` whenever the queue is empty."""
        stop = stop or threading.Event()
        # stop() sets this event too, so an idle wait ends at once: an orchestrator's grace period is short.
        self._idle_wait = stop
        while not stop.is_set() and not self.stopping:
            try:
                ran = self.run_once()
            except ServiceError as exc:
                # The catalogue is down (restarting, failing over): a long-running worker outlives that, as its
                # pooled connections do (pre-ping), and treats it as an empty queue until the database is back.
                # A job it held meanwhile keeps its lease until that expires, and is then claimed again.
                _log.warning("worker %s: %s; trying again in %g s", self.name, first_line(exc), poll_seconds)
                ran = None
            if ran is None:
                stop.wait(poll_seconds)

    def drain(self, *, max_jobs: int | None = None) -> list[Job]:
        """Run jobs until none is runnable (or ``max_jobs`` ran); returns them as they ended."""
        done: list[Job] = []
        while max_jobs is None or len(done) < max_jobs:
            job = self.run_once()
            if job is None:
                break
            done.append(job)
        return done
