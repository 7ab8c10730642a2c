"""The server's audit writer: routing decisions leave the request path and reach the catalogue in batches.

A request routed by RoE is answered with its decision id before the decision is stored, so ids are reserved in
blocks from the decision table's own sequence (one round trip per block, shared by all requests), and a thread
inserts the queued decisions with their votes, many per transaction. Nothing queued is dropped: a failed insert
is retried (the rows stay queued in order), ``close`` writes everything left, and if the catalogue stays
unreachable past the shutdown deadline the remaining decisions go to a spill file in ``HOME/serve``
(``registry/audit_spill.py``), which the next ``elmreg serve`` start or ``elmreg audit replay`` writes under the
reserved ids; the log says where.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from elmreg.api import PendingDecision, RoutingDecisionRecord, RoutingVote
from elmreg.registry.audit_spill import write_spill

_log = logging.getLogger(__name__)


class DecisionStore(Protocol):
    """What the writer needs of the catalogue's library store."""

    def reserve_decision_ids(self, count: int) -> list[int]: ...

    def record_decisions(self, decisions: Sequence[PendingDecision]) -> None: ...


class DecisionWriter:
    """Queues routing decisions and writes them in batches from a thread of its own.

    Its :meth:`record` has the signature of the library store's ``record_decision``, so it is what a server hands the
    router as ``recorder``.
    """

    def __init__(
        self,
        store: DecisionStore,
        *,
        spill_dir: Path,
        flush_interval_s: float = 0.2,
        max_rows: int = 256,
        reserve: int = 64,
        on_written: Callable[[int], None] | None = None,
    ):
        self.store = store
        self.spill_dir = spill_dir
        self.flush_interval_s = flush_interval_s
        self.max_rows = max_rows
        self.reserve = reserve
        self.on_written = on_written
        self._ids: deque[int] = deque()
        self._queue: deque[PendingDecision] = deque()
        self._writing = 0
        self._condition = threading.Condition()
        self._id_lock = threading.Lock()
        self._closing = False
        self._abandoned = False  # close() gave up waiting: a batch that fails now is spilled, not retried
        self._thread = threading.Thread(target=self._run, name="elmreg-audit-writer", daemon=True)
        self._thread.start()

    def record(self, record: RoutingDecisionRecord, votes: Sequence[RoutingVote]) -> int:
        """Queue a decision and its votes; returns the id it will have."""
        with self._id_lock:
            if not self._ids:
                self._ids.extend(self.store.reserve_decision_ids(self.reserve))
            decision_id = self._ids.popleft()
        with self._condition:
            self._queue.append(PendingDecision(decision_id, record, tuple(votes), dt.datetime.now(dt.UTC)))
            self._condition.notify_all()
        return decision_id

    @property
    def pending(self) -> int:
        """Decisions queued or being written."""
        with self._condition:
            return len(self._queue) + self._writing

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written; False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._condition:
            self._condition.notify_all()
            while self._queue or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._condition.wait(min(left, 0.05))
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop; what the catalogue would not take by ``timeout`` is spilled."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        self._thread.join(timeout)
        with self._condition:
            self._abandoned = True
            left = list(self._queue)
            self._queue.clear()
        if left:
            self._spill(left)

    def _run(self) -> None:
        failures = 0
        while True:
            with self._condition:
                if not self._queue and not self._closing:
                    self._condition.wait(self.flush_interval_s)
                if not self._queue:
                    if self._closing:
                        return
                    continue
                batch = [self._queue.popleft() for _ in range(min(self.max_rows, len(self._queue)))]
                self._writing = len(batch)
            try:
                self.store.record_decisions(batch)
                failures = 0
                if self.on_written is not None:
                    self.on_written(len(batch))
            except Exception as error:  # the catalogue is away: keep the rows, in order, and try again
                failures += 1
                with self._condition:
                    abandoned = self._abandoned
                if abandoned:
                    self._spill(batch)
                    return
                _log.warning("writing %d routing decisions failed (%s); retrying", len(batch), error)
                with self._condition:
                    self._queue.extendleft(reversed(batch))
                time.sleep(min(0.1 * 2**failures, 5.0))
            finally:
                with self._condition:
                    self._writing = 0
                    self._condition.notify_all()

    def _spill(self, decisions: list[PendingDecision]) -> None:
        path = write_spill(self.spill_dir, decisions)
        _log.error(
            "the catalogue did not take %d routing decisions; they are in %s (the next 'elmreg serve' start or "
            "'elmreg audit replay' writes them)",
            len(decisions),
            path,
        )
