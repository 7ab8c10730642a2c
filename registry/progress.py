"""How long work reports its progress: one :class:`Reporter` for training, evaluation, merging and experiments.

The layers doing the work (trainers, inference, merging, experiments) say what they are doing and how far they
are; an entry point decides what the user sees (the CLI draws rich progress bars on standard error; a library
caller passes nothing and sees nothing). Torch-free and in the lowest layer, so every layer can import it.
"""

from __future__ import annotations

import logging
from typing import Protocol

_log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Receives the progress of long work: stage lines, and counted steps (``start``, ``advance``, ``finish``)."""

    def stage(self, text: str) -> None:
        """What happens now, as one line ("loading backbone ...")."""

    def start(self, description: str, total: int) -> None:
        """A counted step begins: ``total`` units (training steps, examples) under ``description``."""

    def advance(self, done: int, *, detail: str = "") -> None:
        """``done`` units of the current counted step are finished; ``detail``: a running figure ("loss 0.41")."""

    def finish(self) -> None:
        """The current counted step is over (finished or abandoned)."""


class Silent:
    """The default :class:`Reporter`: stage lines go to the log at INFO level, counted steps nowhere."""

    def stage(self, text: str) -> None:
        _log.info(text)

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, done: int, *, detail: str = "") -> None:
        pass

    def finish(self) -> None:
        pass


SILENT: Reporter = Silent()
