"""Rich progress bars for long work (on standard error); silent with --quiet, for cron."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from elmreg.trainers.pipeline import TrainingHooks


@contextmanager
def training_progress(quiet: bool = False) -> Iterator[TrainingHooks]:
    """Hooks that show each stage as a line and training steps as a bar with the running loss."""
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
