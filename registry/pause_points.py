"""Named points where a process can be stopped on purpose, so that a test can kill it exactly there.

Fault-injection tests (``tests/faults/test_process_faults.py``) need a worker to die at a precise step, such as
after its weights are uploaded but before any row refers to them, or inside the publishing transaction before it
commits. Timing a ``kill -9`` from outside cannot hit those windows reliably; a barrier can. With
``ELMREG_TEST_PAUSE=<point>:<folder>`` in its environment, a process reaching ``pause_point(<point>)`` writes
``<folder>/<point>.reached`` (its pid) and waits until ``<folder>/<point>.go`` exists (or :data:`MAX_PAUSE_SECONDS`
pass), and the test kills it meanwhile. Without that variable (always, outside the tests) a pause point returns at
once and does nothing.
"""

from __future__ import annotations

import os
import time

from elmreg.registry.settings import pause_request

# A paused process that nobody kills or releases goes on by itself, so a broken test never leaves it hanging.
MAX_PAUSE_SECONDS = 300.0
_POLL_SECONDS = 0.05


def pause_point(point: str) -> None:
    """Wait here if ``ELMREG_TEST_PAUSE`` names ``point`` (tests only); otherwise return at once."""
    request = pause_request()
    if request is None or request[0] != point:
        return
    folder = request[1]
    # Written aside and renamed, so the test never sees a half-written file.
    reached = folder / f"{point}.reached"
    reached.with_suffix(".tmp").write_text(str(os.getpid()))
    reached.with_suffix(".tmp").replace(reached)
    deadline = time.monotonic() + MAX_PAUSE_SECONDS
    while not (folder / f"{point}.go").exists() and time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
