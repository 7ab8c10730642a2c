"""Rich progress bars for long work (on standard error); silent with --quiet, for cron."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from elmreg.trainers.pipeline import TrainingHooks


def is_quiet(ctx: click.Context, local: bool = False) -> bool:
    """Whether progress output is off: the command's own --quiet or the global ``elmreg --quiet``."""
    return local or bool((ctx.find_root().obj or {}).get("quiet"))


@contextmanager
def training_progress(quiet: bool = False) -> Iterator[TrainingHooks]:
    """Hooks that show each stage as a line and training steps as a bar with the running loss."""
    # Here, not at the top: the training pipeline imports torch, and every verb imports this module.
    from elmreg.trainers.pipeline import TrainingHooks

    if quiet:
        yield TrainingHooks()
        return
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    bars: dict[str, int] = {}

    def on_stage(message: str) -> None:
        progress.console.print(f"[dim]•[/dim] {message}")
        bars.pop("train", None)

    def on_step(step: int, total: int, loss: float) -> None:
        if "train" not in bars:
            bars["train"] = progress.add_task("training", total=total, loss="-")
        progress.update(bars["train"], completed=step, loss=f"{loss:.4f}")

    with progress:
        yield TrainingHooks(on_step=on_step, on_stage=on_stage)


@contextmanager
def evaluation_progress(quiet: bool = False) -> Iterator[Callable[[str, int, int], None] | None]:
    """A ``progress(description, done, total)`` callback drawing one bar per (task, expert) pass."""
    if quiet:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    bars: dict[str, int] = {}

    def update(description: str, done: int, total: int) -> None:
        if description not in bars:
            bars[description] = progress.add_task(description, total=total)
        progress.update(bars[description], completed=done, total=total)

    with progress:
        yield update
