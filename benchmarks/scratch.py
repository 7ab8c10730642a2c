"""What the library benchmarks share: a scratch database on the configured server, and the synthetic library.

Synthetic experts have 100 entries each, clustered around a per-expert unit centre like the samples of one task;
the benchmarks import this module by name (they run as scripts from this folder).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from sqlalchemy import text

from elmreg.registry.settings import Settings
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext

DIM, PER_EXPERT, NOISE = 384, 100, 1.0


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_experts(
    rng: np.random.Generator, experts: int, first: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``experts`` new centres, the owner (``first`` + row) of each of their entries, and the entries."""
    centres = unit(rng.normal(size=(experts, DIM)))
    owners = np.repeat(np.arange(first, first + experts), PER_EXPERT)
    # Noise of norm ~1 around a unit centre: samples of one expert have cosine ~0.5 with each other, about what
    # all-MiniLM-L6-v2 gives for instances of one task.
    vectors = unit(centres[owners - first] + NOISE * rng.normal(size=(len(owners), DIM)) / np.sqrt(DIM))
    return centres, owners, vectors


def queries_near(rng: np.random.Generator, centre: np.ndarray, q: int) -> np.ndarray:
    """``q`` queries drawn near one expert's centre, as the instances of one task are."""
    return unit(centre + NOISE * rng.normal(size=(q, DIM)) / np.sqrt(DIM))


@contextmanager
def scratch_context(settings: Settings, prefix: str) -> Iterator[RegistryContext]:
    """A migrated registry on a new database of the configured server, dropped afterwards however it ends."""
    base = RegistryContext(settings)
    name = f"{prefix}_{uuid.uuid4().hex[:6]}"
    with base.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    context = RegistryContext(
        settings.replace(database_url=base.engine.url.set(database=name).render_as_string(False))
    )
    try:
        schema.upgrade(context.engine)
        yield context
    finally:
        context.close()
        with base.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        base.close()
        base.close()
