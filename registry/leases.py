"""A worker's hold on a claimed job, as one value that travels from the job to the publishing transaction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Lease:
    """The job a worker holds and how to check it still does.

    Attributes:
        job_id: The claimed job.
        worker: The worker holding it (the name it claimed the job under).
        check: Raises when the lease is gone (another worker took the job over) or the worker is stopping;
            called at safe points: between training steps and just before publishing.
    """

    job_id: int
    worker: str
    check: Callable[[], None]

    @property
    def holder(self) -> tuple[int, str]:
        """``(job_id, worker)``: what the catalogue checks inside the publishing transaction."""
        return self.job_id, self.worker
