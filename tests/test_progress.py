"""The one progress protocol: the CLI's bars and lines, and the silent default every layer falls back on."""

from __future__ import annotations

import io
import logging

from rich.console import Console
from rich.progress import Progress, TextColumn

from elmreg.cli.progress import BarReporter, evaluation_progress, training_progress
from elmreg.registry.progress import SILENT


def _reporter(**options) -> tuple[BarReporter, Progress, io.StringIO]:
    out = io.StringIO()
    progress = Progress(TextColumn("{task.description}"), console=Console(file=out, width=120))
    return BarReporter(progress, **options), progress, out


def test_each_counted_step_gets_its_own_bar_and_finish_stops_updating_it():
    reporter, progress, _ = _reporter()
    reporter.start("training", 4)
    reporter.advance(2, detail="loss 0.5000")
    reporter.finish()
    reporter.advance(3)  # after finish: no bar to move
    reporter.start("training", 6)
    reporter.advance(1)
    first, second = progress.tasks
    assert (first.completed, first.total, first.fields["detail"]) == (2, 4, "loss 0.5000")
    assert (second.completed, second.total, second.description) == (1, 6, "training")


def test_stage_lines_keep_their_brackets():
    bulleted, _, out = _reporter()
    bulleted.stage("loading backbone [tiny]")
    plain, _, plain_out = _reporter(bullets=False)
    plain.stage("[prepare]")
    assert out.getvalue() == "• loading backbone [tiny]\n"
    assert plain_out.getvalue() == "[prepare]\n"


def test_quiet_gives_the_silent_reporter_which_only_logs(caplog):
    with training_progress(quiet=True) as training, evaluation_progress(quiet=True) as evaluation:
        assert training is SILENT and evaluation is SILENT
    with caplog.at_level(logging.INFO, logger="elmreg.registry.progress"):
        SILENT.start("x", 3)
        SILENT.advance(1, detail="d")
        SILENT.finish()
        SILENT.stage("uploading weights")
    assert [r.getMessage() for r in caplog.records] == ["uploading weights"]
