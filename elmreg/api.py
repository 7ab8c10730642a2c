"""The Python API: ``from elmreg import Registry``. The CLI is a thin layer over these verbs."""

from __future__ import annotations

import datetime as dt
from typing import Any

from elmreg.registry.context import RegistryContext
from elmreg.registry.gc import DEFAULT_MIN_AGE, GcReport, collect_garbage
from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.store.entities import CatalogueSummary, Expert, Job, Task, TrainingRun


class Registry:
    """An expert registry: its catalogue (PostgreSQL + pgvector) and its weights (S3).

    Example::

        from elmreg import Registry
        registry = Registry()                # embedded services, or ELMREG_* settings
        for expert in registry.experts(status="ready"):
            print(expert.name, expert.library_version)
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any):
        """Args:
        settings: Complete settings; by default read from ``ELMREG_*`` variables and the config file.
        **overrides: Individual settings to override, e.g. ``home="/data/elmreg"``.
        """
        self.context = RegistryContext(settings or load_settings(**overrides))

    @property
    def settings(self) -> Settings:
        return self.context.settings

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- catalogue -----------------------------------------------------------------------------------------
    def status(self) -> CatalogueSummary:
        """Schema revision, library version and row counts."""
        return self.context.store.summary()

    def tasks(self) -> list[Task]:
        """Every registered task, oldest first."""
        return self.context.store.list_tasks()

    def task(self, key: int | str) -> Task:
        """A task by id or name. Raises NotFoundError."""
        return self.context.store.get_task(key)

    def experts(self, *, status: str | None = None, task: int | str | None = None) -> list[Expert]:
        """Experts, oldest first, optionally only those of one status or task."""
        task_id = self.task(task).id if task is not None else None
        return self.context.store.list_experts(status=status, task_id=task_id)

    def expert(self, key: int | str) -> Expert:
        """An expert by id or name. Raises NotFoundError."""
        return self.context.store.get_expert(key)

    def retire(self, key: int | str) -> Expert:
        """Take an expert out of routing; it stays in the catalogue and S3 with its audit history."""
        return self.context.store.retire_expert(self.expert(key).id)

    def training_runs(self, task: int | str | None = None) -> list[TrainingRun]:
        """Training runs, oldest first."""
        return self.context.store.list_training_runs(task_id=self.task(task).id if task is not None else None)

    def jobs(self, *, status: str | None = None) -> list[Job]:
        """Queued, running and finished jobs, oldest first."""
        return self.context.store.list_jobs(status=status)

    def gc(self, *, delete: bool = False, min_age: dt.timedelta = DEFAULT_MIN_AGE) -> GcReport:
        """Report (and with ``delete``, remove) bucket objects that no expert references."""
        return collect_garbage(self.context.store, self.context.artifacts, delete=delete, min_age=min_age)
