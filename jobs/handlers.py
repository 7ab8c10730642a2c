"""What each kind of queued job does: a handler per job kind, registered here.

Handlers import what their job needs when the job runs, so a worker (or ``elmreg --help``) that imports this
module pays for torch only once a job that trains or evaluates is claimed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from elmreg.jobs.context import JobContext, JobHandler

_HANDLERS: dict[str, JobHandler] = {}


def register_job_handler(kind: str) -> Callable[[JobHandler], JobHandler]:
    """Register the decorated function as the handler of jobs of ``kind`` (``jobs.kind`` in the catalogue).

    Raises:
        ValueError: ``kind`` has a handler already.
    """

    def register(handler: JobHandler) -> JobHandler:
        if kind in _HANDLERS:
            raise ValueError(f"job kind '{kind}' already has a handler")
        _HANDLERS[kind] = handler
        return handler

    return register


def registered_handlers() -> dict[str, JobHandler]:
    """Every registered handler, by job kind."""
    return dict(_HANDLERS)


@register_job_handler("train")
def handle_train(job: JobContext) -> None:
    """Train the expert of ``payload["task_id"]`` (queued by ``add-task`` and the scheduler)."""
    from elmreg.trainers.pipeline import train_task

    task = job.context.catalogue.get_task(int(job.job.payload["task_id"]))
    train_task(job.context, task, lease=job.lease, reporter=job.reporter)


@register_job_handler("benchmark")
def handle_benchmark(job: JobContext) -> None:
    """Benchmark experts added since ``payload["since"]`` (queued nightly by the scheduler)."""
    from elmreg.inference.benchmark import run_benchmark

    payload = job.job.payload
    since = dt.datetime.fromisoformat(payload["since"]) if payload.get("since") else None
    run_benchmark(job.context, since=since, limit=int(payload.get("limit", 50)))
