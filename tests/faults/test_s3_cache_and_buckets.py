"""Downloads into a full cache disk, cached copies damaged on disk, and reads of a mistyped bucket.

- Disk full while downloading weights: a clear one-line error, nothing partial left in the cache, and
  the next read downloads again and verifies; a cached copy is checked by sha256 every time it is used.
- Reads never create buckets: ``experts export`` and ``gc`` with a mistyped
  ``ELMREG_S3_BUCKET`` fail without creating that bucket; only an upload creates the configured bucket.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
from click.testing import CliRunner

from elmreg.cli.main import cli
from elmreg.registry.artifacts import ArtifactCache
from elmreg.registry.entities import LibraryEntry

_FETCH_UNDER_A_FILE_SIZE_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from elmreg.runtime.context import RegistryContext
    from elmreg.registry.errors import ElmregError
    from elmreg.registry.settings import load_settings
    from elmreg.registry.entities import StoredArtifact

    context = RegistryContext(load_settings())
    cache = context.artifact_cache
    artifact = StoredArtifact(uri=sys.argv[1], sha256=sys.argv[2], size=int(sys.argv[3]))
    # A real file system limit: any write past it fails (EFBIG), as a full disk fails with ENOSPC.
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[4]), int(sys.argv[4])))
    try:
        cache.fetch(artifact)
    except ElmregError as exc:
        print(exc)
        sys.exit(3)
    """
)


def _environ(context) -> dict[str, str]:
    s = context.settings
    return {
        "ELMREG_HOME": str(s.home),
        "ELMREG_DATABASE_URL": s.database_url,
        "ELMREG_S3_PREFIX": s.s3_prefix,
        "ELMREG_CACHE_DIR": str(s.cache_path),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }


def test_disk_full_while_downloading_leaves_nothing_and_the_next_read_verifies(own_context, tmp_path):
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "w").write_bytes(data)
    stored = own_context.artifacts.put_file(tmp_path / "w")
    cache_root = own_context.settings.cache_path / "artifacts"

    full = subprocess.run(
        [sys.executable, "-c", _FETCH_UNDER_A_FILE_SIZE_LIMIT, stored.uri, stored.sha256, str(stored.size),
         str(1024 * 1024)],
        env=_environ(own_context), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == 3, full.stderr[-2000:]
    message = full.stdout.strip()
    assert "\n" not in message and "no room" in message and str(cache_root) in message
    leftovers = [p for p in cache_root.rglob("*") if p.is_file()] if cache_root.exists() else []
    assert leftovers == []

    cache = ArtifactCache(cache_root, own_context.artifacts)
    path = cache.fetch(stored)
    assert path.read_bytes() == data

    # Damage the cached copy in place, keeping its size and modification time: it is still not used.
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(1000)
        handle.write(bytes([data[1000] ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.fetch(stored).read_bytes() == data


def _buckets(context) -> set[str]:
    return {b["Name"] for b in context.artifacts.client.list_buckets().get("Buckets", [])}


def test_reads_never_create_a_bucket(own_context, tmp_path):
    catalogue = own_context.catalogue
    (tmp_path / "w").write_bytes(b"weights of an expert in the configured bucket")
    stored = own_context.artifacts.put_file(tmp_path / "w")
    backbone = catalogue.get_or_create_backbone("bucket-backbone", "causal")
    embedder = catalogue.get_or_create_embedder("bucket-embedder", 4)
    expert = catalogue.create_expert(name="in-the-right-bucket", backbone_id=backbone.id, kind="full")
    catalogue.publish_expert(
        expert.id, artifact=stored, embedder_id=embedder.id, entries=[LibraryEntry(0, "x", np.ones(4))]
    )
    before = _buckets(own_context)
    mistyped = "elmreg-mistyped"
    env = {**_environ(own_context), "ELMREG_S3_BUCKET": mistyped}
    runner = CliRunner()
    for args in (["experts", "export", expert.name, "--out", str(tmp_path / "out")], ["gc"]):
        result = runner.invoke(cli, args, env=env)
        assert result.exit_code in (1, 2), (args, result.output)
        assert "Traceback" not in result.output and mistyped in result.output, (args, result.output)
    assert mistyped not in _buckets(own_context)
    assert _buckets(own_context) == before
