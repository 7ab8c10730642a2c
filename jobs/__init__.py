"""Running queued jobs: the worker loop (claim, heartbeat, lease, outcome) and a handler per job kind."""

from elmreg.jobs.context import JobContext, JobHandler, LeaseLost
from elmreg.jobs.handlers import register_job_handler, registered_handlers
from elmreg.jobs.runner import DEFAULT_LEASE_SECONDS, Worker

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "JobContext",
    "JobHandler",
    "LeaseLost",
    "Worker",
    "register_job_handler",
    "registered_handlers",
]
