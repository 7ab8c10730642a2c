"""Only the signed S3 gateway of the embedded SeaweedFS is reachable: every other port it opens refuses unsigned
reads and writes of objects, it listens on loopback only, and its files are the owner's only."""

from __future__ import annotations

import http.client
import os
import socket
import stat
from pathlib import Path

import pytest

from elmreg.runtime.context import RegistryContext
from elmreg.services import embedded_s3_credentials
from faults.conftest import embedded_s3

SECRET_BYTES = b"expert weights nobody may read without the key " * 64


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc (no extra tools)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            if len(address) == 8:
                ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
            else:
                raw = bytes.fromhex(address)
                ip = socket.inet_ntop(
                    socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                )
            found.append((ip, int(port, 16)))
    return sorted(set(found))


def _http(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int | None, bytes]:
    """An unsigned HTTP/1.1 request; (None, b"") when the port does not speak plain HTTP at all."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"})
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        connection.close()


def _speaks_plaintext_http2(port: int) -> bool:
    """Whether the port answers an HTTP/2 connection preface in clear text, as an unsecured gRPC server does."""
    preface = (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    )  # + empty SETTINGS
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(preface)
        try:
            answer = s.recv(9)
        except OSError:
            return False
    return len(answer) == 9 and answer[3] == 0x04  # a SETTINGS frame back: gRPC without TLS


@pytest.fixture
def stored(own_context: RegistryContext, tmp_path: Path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(SECRET_BYTES)
    return own_context.artifacts.put_file(path)


def test_only_the_signed_gateway_serves_objects(own_context, stored):
    settings, endpoints = own_context.settings, own_context.endpoints
    pid = embedded_s3(settings).state().pid
    ports = _listening(pid)
    assert ports, "the embedded S3 server listens on no TCP port"
    gateway = int(endpoints.s3_endpoint_url.rsplit(":", 1)[1])
    assert gateway in {port for _, port in ports}
    bucket, key = stored.uri.removeprefix("s3://").split("/", 1)
    reads = [f"/{bucket}/{key}", f"/buckets/{bucket}/{key}", f"/buckets/{bucket}/", "/1,01637037d6"]
    writes = [f"/{bucket}/planted.bin", f"/buckets/{bucket}/planted.bin", "/1,01637037d6", "/submit"]
    let_through = []
    for _, port in ports:
        for path in reads:
            status, body = _http(port, "GET", path)
            if SECRET_BYTES[:32] in body or (status is not None and 200 <= status < 300 and path != reads[2]):
                let_through.append(f"GET {port}{path} -> {status}")
        for path in writes:
            for method in ("PUT", "POST"):
                status, _ = _http(port, method, path, body=b"planted without credentials")
                if status is not None and 200 <= status < 300:
                    let_through.append(f"{method} {port}{path} -> {status}")
        if port != gateway and _speaks_plaintext_http2(port):
            let_through.append(f"plaintext gRPC on {port}")
    assert let_through == []
    # Nothing planted shows through the signed gateway either.
    client = own_context.artifacts.client
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert not [k for k in listed if "planted" in k]


def test_embedded_s3_listens_on_loopback_only(own_context, stored):
    pid = embedded_s3(own_context.settings).state().pid
    assert {address for address, _ in _listening(pid)} == {"127.0.0.1"}


def test_service_files_are_the_owners_only(own_context, stored):
    services = own_context.settings.services_dir
    embedded_s3_credentials(own_context.settings)
    tls = services / "seaweedfs-tls"
    private_files = [
        services / "s3-credentials.json",
        services / "s3-identities.json",
        services / "seaweedfs.json",
        services / "seaweedfs-ports.json",
        services / "seaweedfs.log",
        *(sorted(tls.iterdir()) if tls.is_dir() else []),
    ]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in private_files if p.exists()}
    assert modes == {name: oct(0o600) for name in modes} and len(modes) == len(private_files) >= 8
    for folder in (services / "seaweedfs", tls):
        assert oct(stat.S_IMODE(folder.stat().st_mode)) == oct(0o700), folder
