"""The embedded PostgreSQL + pgvector server, from the ``pgserver`` package.

``pgserver`` 0.1.4 ships PostgreSQL 16.2 with pgvector 0.6.2 and listens on a Unix socket only (no TCP port to
collide with). The server outlives the process that started it, so every elmreg process of a user shares one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from elmreg.registry.errors import ServiceError

DATABASE_NAME = "elmreg"
_log = logging.getLogger(__name__)


def _pgserver():
    # platformdirs warns about a missing XDG_RUNTIME_DIR on headless machines; pgserver copes, so stay quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        from pgserver import utils
    return pgserver, utils


@dataclass(frozen=True)
class PostgresState:
    running: bool
    pid: int | None
    socket_dir: Path | None

    def url(self, database: str = DATABASE_NAME) -> str | None:
        if self.socket_dir is None:
            return None
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"


class EmbeddedPostgres:
    """Start, stop and inspect the PostgreSQL server whose data lives in ``data_dir``."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir

    def state(self) -> PostgresState:
        _, utils = _pgserver()
        info = utils.PostmasterInfo.read_from_pgdata(self.data_dir) if self.data_dir.exists() else None
        if info is None or not info.is_running():
            return PostgresState(running=False, pid=None, socket_dir=None)
        return PostgresState(running=True, pid=info.pid, socket_dir=info.socket_dir)

    def start(self) -> PostgresState:
        """Start the server (initialising the data directory on first use) and create the elmreg database."""
        pgserver, _ = _pgserver()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Not pgserver.get_server(): it caches one handle per directory per process and would hand
                # back a stale one after 'services down'. The constructor checks the server and starts it.
                server = pgserver.PostgresServer(self.data_dir.resolve(), cleanup_mode=None)
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            log = self.data_dir / "log"
            tail = log.read_text()[-800:] if log.exists() else ""
            raise ServiceError(
                f"embedded PostgreSQL in {self.data_dir} failed to start: {exc}\n{tail}"
            ) from exc
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {DATABASE_NAME};")
        return self.state()

    def stop(self) -> bool:
        """Stop the server if it runs; returns whether it was running."""
        if not self.state().running:
            return False
        pgserver, _ = _pgserver()
        user = "pgserver" if _running_as_root() else None
        try:
            pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=user)
        except subprocess.CalledProcessError as exc:
            raise ServiceError(f"could not stop embedded PostgreSQL in {self.data_dir}: {exc}") from exc
        return True


def _running_as_root() -> bool:
    # pgserver runs the server under a 'pgserver' system user when started by root.
    return hasattr(os, "geteuid") and os.geteuid() == 0
