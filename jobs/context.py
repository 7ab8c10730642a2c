"""What a job handler gets (:class:`JobContext`), and how it learns that another worker took its job over."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from elmreg.registry.entities import Job
from elmreg.registry.errors import ElmregError
from elmreg.registry.leases import Lease
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext


class LeaseLost(ElmregError):
    """Another worker took the job over (our lease expired); stop without publishing anything."""


class Interrupted(ElmregError):
    """The worker was asked to stop (SIGTERM): stop without publishing; the job goes back to the queue."""


@dataclass
class JobContext:
    """What a handler gets: the registry context, its job, and a way to check it still owns the job.

    Attributes:
        reporter: How the worker's caller watches its jobs (the CLI draws progress bars).
    """

    context: RegistryContext
    job: Job
    worker: str
    reporter: Reporter = SILENT
    _lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def lease(self) -> Lease:
        """This worker's hold on the job, for the steps that must stop once it is lost."""
        return Lease(self.job.id, self.worker, self.check_lease)

    def check_lease(self) -> None:
        """Call at safe points (between training steps, before publishing): raises :class:`LeaseLost` if the
        heartbeat found the lease gone, :class:`Interrupted` if the worker is stopping."""
        if self._lost.is_set():
            raise LeaseLost(f"job {self.job.id} was taken over by another worker")
        if self._stop.is_set():
            raise Interrupted(f"job {self.job.id} interrupted: worker {self.worker} is stopping")


# handler(job): does the job; raising fails it (a UserError for good, anything else to be retried).
JobHandler = Callable[[JobContext], None]
