"""The CLI's :class:`~elmreg.registry.progress.Reporter`: rich progress bars on standard error; silent with
--quiet, for cron."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from elmreg.registry.progress import SILENT, Reporter

_log = logging.getLogger(__name__)


def is_quiet(ctx: click.Context, local: bool = False) -> bool:
    """Whether progress output is off: the command's own --quiet or the global ``elmreg --quiet``."""
    return local or bool((ctx.find_root().obj or {}).get("quiet"))


class BarReporter:
    """Draws each counted step as a bar (a new one per :meth:`start`) and prints stage lines above the bars."""

    def __init__(self, progress: Progress, *, bullets: bool = True):
        self.progress = progress
        self.bullets = bullets
        self._current: TaskID | None = None

    def stage(self, text: str) -> None:
        _log.info(text)
        if self.bullets:
            self.progress.console.print(f"[dim]•[/dim] {escape(text)}")
        else:
            self.progress.console.print(text, markup=False, highlight=False)

    def start(self, description: str, total: int) -> None:
        self._current = self.progress.add_task(description, total=total, detail="")

    def advance(self, done: int, *, detail: str = "") -> None:
        if self._current is not None:
            self.progress.update(self._current, completed=done, detail=detail)

    def finish(self) -> None:
        # The bar stays on screen as it ended; the next step gets its own.
        self._current = None


@contextmanager
def _bars(quiet: bool, columns: list[ProgressColumn], *, bullets: bool = True) -> Iterator[Reporter]:
    if quiet:
        yield SILENT
        return
    progress = Progress(*columns, console=Console(stderr=True))
    with progress:
        yield BarReporter(progress, bullets=bullets)


def training_progress(quiet: bool = False, *, bullets: bool = True) -> AbstractContextManager[Reporter]:
    """A reporter that shows each stage as a line and training steps as a bar with the running loss."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return _bars(quiet, columns, bullets=bullets)


def evaluation_progress(quiet: bool = False) -> AbstractContextManager[Reporter]:
    """A reporter drawing one bar per (task, answerer) pass over the examples."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return _bars(quiet, columns)


def line_progress(quiet: bool = False) -> AbstractContextManager[Reporter]:
    """A reporter that prints stage lines as they are (the steps of a merge), counted steps as bars."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return _bars(quiet, columns, bullets=False)
