"""Limits per API key: requests per second (a token bucket) and requests in flight, in this server's memory.

Each key's limits come with its record (``elmreg serve keys create --rate R --concurrency C``), so a changed key
bites within the key cache's lifetime. A request over either limit is refused with HTTP 429 and ``Retry-After``
(whole seconds, as the header takes), counted in ``/metrics`` by key and limit; a refused request takes no token
and no slot. Several servers behind one balancer each enforce the limits on their own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from elmreg.api import ApiKey
from elmreg.serve.metrics import ServeMetrics
from elmreg.serve.protocol import ApiError


@dataclass
class _KeyState:
    tokens: float
    refilled: float
    in_flight: int = 0


class CallerLimits:
    """Admits or refuses each keyed request by its key's ``rate`` and ``concurrency``."""

    def __init__(self, metrics: ServeMetrics, *, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.clock = clock
        self._states: dict[int, _KeyState] = {}
        self._lock = threading.Lock()

    @contextmanager
    def admit(self, key: ApiKey) -> Iterator[None]:
        """Hold one of the key's slots (and take a token) for the block.

        Raises:
            ApiError: 429 when the key is at its concurrency or out of tokens.
        """
        if key.rate is None and key.concurrency is None:
            yield
            return
        self._take(key)
        try:
            yield
        finally:
            with self._lock:
                self._states[key.id].in_flight -= 1

    def _take(self, key: ApiKey) -> None:
        now = self.clock()
        with self._lock:
            # A bucket holds a second's worth of requests (one at least): bursts within the rate pass.
            burst = max(1.0, key.rate or 1.0)
            state = self._states.setdefault(key.id, _KeyState(tokens=burst, refilled=now))
            if key.rate is not None:
                state.tokens = min(burst, state.tokens + (now - state.refilled) * key.rate)
                state.refilled = now
            if key.concurrency is not None and state.in_flight >= key.concurrency:
                self._refuse(key, "concurrency", 1, f"{key.concurrency} request(s) in flight at once")
            if key.rate is not None:
                if state.tokens < 1.0:
                    wait = math.ceil((1.0 - state.tokens) / key.rate)
                    self._refuse(key, "rate", wait, f"{key.rate:g} request(s) per second")
                state.tokens -= 1.0
            state.in_flight += 1

    def _refuse(self, key: ApiKey, limit: str, retry_after: int, what: str) -> None:
        self.metrics.limited.labels(key.name, limit).inc()
        raise ApiError(
            429,
            f"key '{key.name}' is limited to {what}; retry after {retry_after} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )
