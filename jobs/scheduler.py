"""``elmreg scheduler``: the clock of the registry (APScheduler 3).

It only *enqueues* work; workers do it. Three schedules:

- every minute, a training job for every task that has neither an expert nor a pending training job;
- nightly, ingestion of task manifests (YAML lists of add-task specs) from ``ELMREG_MANIFEST_DIR``;
- nightly, a ``benchmark`` job for the experts added since the last benchmark.

Only one scheduler is active at a time: each one tries to take a PostgreSQL advisory lock on a connection it
keeps open and waits as a standby until it gets it. If the active one dies, its connection closes, the lock is
released and a standby takes over. If the database restarts, the lock goes with the active one's connection while
that process lives on: so each schedule checks the lock right before it runs (a scheduler that lost it runs
nothing), the active one checks it between runs too, and one that lost it steps down to standby (and may win the
lock again). A standby that cannot reach the database keeps trying.

The schedules are code, kept in memory: nothing about them is written to the database, so no row holds the
settings (credentials) and no row needs pickle to be read. A nightly run missed while no scheduler was active (the
machine was down at 03:00) is run once when a scheduler starts within the misfire grace; both nightly jobs are
idempotent per day (the benchmark job's dedupe key, ingestion skipping registered tasks), so a restart the same
day repeats nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from elmreg.registry.errors import ServiceError, first_line
from elmreg.registry.store.jobs import HeldLock
from elmreg.runtime.context import RegistryContext

_log = logging.getLogger(__name__)

# Distinct from the library-version lock: this one is held for the whole life of the active scheduler.
SCHEDULER_LOCK_KEY = "elmreg-scheduler"


@dataclass(frozen=True)
class ScheduleConfig:
    """When the periodic jobs run (cron fields in the scheduler's local time zone)."""

    new_task_interval_seconds: int = 60
    ingest_hour: int = 1
    benchmark_hour: int = 3
    misfire_grace_seconds: int = 6 * 3600


# -- the scheduled functions: each takes the active scheduler's context (in memory, never persisted) --------------
def enqueue_untrained_tasks(context: RegistryContext) -> list[int]:
    """Queue a training job for each task with no expert and no training job; returns their job ids."""
    busy = {
        e.task_id for e in context.catalogue.list_experts() if e.status in ("pending", "training", "ready")
    }
    queued = {
        j.payload.get("task_id")
        for j in context.jobs.list_jobs()
        if j.kind == "train" and j.status in ("queued", "running")
    }
    jobs = []
    for task in context.catalogue.list_tasks():
        if task.id in busy or task.id in queued:
            continue
        jobs.append(
            context.jobs.enqueue_job("train", {"task_id": task.id}, dedupe_key=f"train-task:{task.id}").id
        )
    return jobs


def ingest_manifests_job(context: RegistryContext) -> None:
    """Register the tasks listed in the manifest folder (already-registered ones are skipped)."""
    from elmreg.runtime.tasks import ingest_manifests

    report = ingest_manifests(context)
    _log.warning("manifest ingestion: %s", report)


def enqueue_benchmark(context: RegistryContext) -> int:
    """Queue tonight's benchmark of the experts added since the previous one (one job per day)."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    job = context.jobs.enqueue_job(
        "benchmark", {"requested_by": "scheduler"}, dedupe_key=f"benchmark:{today}"
    )
    return job.id


def _missed(hour: int, grace_seconds: int, now: dt.datetime) -> bool:
    """Whether a daily run at ``hour``:00 (local time) fell within the last ``grace_seconds``."""
    last = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    if last > now:
        last -= dt.timedelta(days=1)
    return (now - last).total_seconds() <= grace_seconds


class Scheduler:
    """The active-or-standby scheduler process."""

    def __init__(self, context: RegistryContext, config: ScheduleConfig | None = None):
        self.context = context
        self.config = config or ScheduleConfig()
        self._lock: HeldLock | None = None
        # The lock's connection is used by the run loop and by the schedules' threads: one at a time.
        self._lock_guard = threading.Lock()
        self._scheduler: BackgroundScheduler | None = None

    def try_become_active(self) -> bool:
        """Take the scheduler lock if nobody holds it; a crashed scheduler's lock goes with its connection."""
        with self._lock_guard:
            if self._lock is None:
                self._lock = self.context.jobs.try_lock(SCHEDULER_LOCK_KEY)
            return self._lock is not None

    def holds_lock(self) -> bool:
        """Whether this scheduler is (still) the active one: False once its lock went with its connection."""
        with self._lock_guard:
            return self._lock is not None and self._lock.held()

    def _fenced(self, schedule_id: str, function: Callable[[RegistryContext], object]) -> Callable[[], None]:
        """``function`` as a schedule that runs only while this scheduler holds the lock. Checked at each run: a
        scheduler whose lock went with a database restart must not fire beside the standby that now holds it."""

        def fire() -> None:
            if not self.holds_lock():
                _log.warning("scheduler lost its lock (database restarted?): %s not run", schedule_id)
                return
            function(self.context)

        return fire

    def start(self) -> BackgroundScheduler:
        """Register the schedules, catch up a nightly run missed within the grace period, and start."""
        self.context.jobs  # noqa: B018 - fails early with a clear message if the schema is not migrated
        scheduler = BackgroundScheduler(
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": self.config.misfire_grace_seconds,
            },
        )
        config, now = self.config, dt.datetime.now().astimezone()
        scheduler.add_job(
            self._fenced("enqueue-untrained-tasks", enqueue_untrained_tasks),
            IntervalTrigger(seconds=config.new_task_interval_seconds),
            id="enqueue-untrained-tasks",
        )
        nightly = {
            "nightly-ingest": (ingest_manifests_job, config.ingest_hour),
            "nightly-benchmark": (enqueue_benchmark, config.benchmark_hour),
        }
        for job_id, (function, hour) in nightly.items():
            catch_up = {"next_run_time": now} if _missed(hour, config.misfire_grace_seconds, now) else {}
            scheduler.add_job(
                self._fenced(job_id, function), CronTrigger(hour=hour, minute=0), id=job_id, **catch_up
            )
        scheduler.start()
        self._scheduler = scheduler
        return scheduler

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        standby_poll_seconds: float = 15.0,
        lock_check_seconds: float = 5.0,
    ) -> None:
        """Wait to become active, then run the schedules until ``stop`` is set; step down to standby whenever the
        lock is lost (a database restart), so a standby takes over within about ``standby_poll_seconds``."""
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                try:
                    active = self.try_become_active()
                except ServiceError as exc:  # the database is down or restarting: keep standing by
                    _log.warning("scheduler: %s; trying again in %g s", first_line(exc), standby_poll_seconds)
                    active = False
                if not active:
                    _log.warning("another scheduler is active; standing by")
                    stop.wait(standby_poll_seconds)
                    continue
                _log.warning("scheduler active (it holds the scheduler lock)")
                self.start()
                while not stop.wait(lock_check_seconds) and self.holds_lock():
                    pass
                if not stop.is_set():
                    _log.warning("scheduler lost its lock (database restarted?); standing by")
                self.shutdown()
        finally:
            self.shutdown()
        _log.warning("scheduler stopped: no run in progress, the lock released")

    def next_runs(self) -> dict[str, dt.datetime | None]:
        """When each schedule fires next (for ``elmreg scheduler --list`` and tests)."""
        if self._scheduler is None:
            return {}
        return {job.id: job.next_run_time for job in self._scheduler.get_jobs()}

    def shutdown(self) -> None:
        """Stop firing, let a run in progress finish (each only queues jobs: seconds), then release the lock
        so that a standby takes over at its next poll."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        with self._lock_guard:
            if self._lock is not None:
                self._lock.release()
                self._lock = None
