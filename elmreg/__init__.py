"""elmreg: a continual-learning registry of expert language models.

One small expert per task on a frozen backbone, chosen at inference by Retrieval-of-Experts in SQL
(PostgreSQL + pgvector), with weights in S3-compatible storage. See README.md.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from elmreg.api import Registry

__all__ = ["Registry", "__version__"]

try:
    __version__ = version("elmreg")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    # `from elmreg import Registry` loads the API (SQLAlchemy, Alembic, ...) on first use, not on every import of
    # a submodule: `elmreg --help` and `import elmreg.registry.errors` need none of it.
    if name == "Registry":
        from elmreg.api import Registry

        return Registry
    raise AttributeError(f"module 'elmreg' has no attribute {name!r}")
