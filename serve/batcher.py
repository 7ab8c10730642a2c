"""The server's queue in front of the engine: one thread runs the engine, requests queue prompts for it.

Requests arrive concurrently from the HTTP loop; each prompt becomes one ``inference.engine.Prompt``. The batcher's
thread asks the engine for the oldest waiting prompt and everything that can share its work
(``Engine.take_batch``), and runs that batch; results reach each prompt's sink. Batches are static (rows join
only between batches). When the engine is idle, the thread waits a few milliseconds after the first arrival so
that a burst of requests lands in one batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from elmreg.inference.engine import Engine, Prompt

_log = logging.getLogger(__name__)

# Waiting this long after the first request of an idle spell costs little latency and lets a burst share a batch.
DEFAULT_BATCH_WINDOW_S = 0.005


class Batcher:
    """Queues prompts for one engine and runs them from one thread (PEFT's active adapters are process state)."""

    def __init__(self, engine: Engine, *, batch_window_s: float = DEFAULT_BATCH_WINDOW_S):
        self.engine = engine
        self.batch_window_s = batch_window_s
        self._pending: list[Prompt] = []
        self._condition = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="elmreg-engine", daemon=True)

    # -- the HTTP side -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, prompts: Sequence[Prompt]) -> None:
        """Queue prompts (thread-safe); results go to each prompt's sink."""
        with self._condition:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._pending.extend(prompts)
            self._condition.notify_all()

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._pending) + (1 if self._busy else 0)

    def close(self, timeout: float | None = None) -> None:
        """Answer everything queued, then stop the thread."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        max_batch = self.engine.max_batch
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return  # closing, nothing left
                if len(self._pending) < max_batch and not self._closing:
                    self._condition.wait_for(
                        lambda: len(self._pending) >= max_batch or self._closing,
                        timeout=self.batch_window_s,
                    )
                batch = self.engine.take_batch(self._pending)
                taken = {id(p) for p in batch}
                self._pending = [p for p in self._pending if id(p) not in taken]
                self._busy = True
            try:
                self.engine.run(batch)
            except BaseException as error:  # a batch's failure is its requests' error, never the server's end
                _log.exception("a batch of %d failed", len(batch))
                for prompt in batch:
                    prompt.sink.fail(error)
            finally:
                with self._condition:
                    self._busy = False
