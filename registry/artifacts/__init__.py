"""Expert weights in object storage, chosen by URI scheme, with a verified local download cache."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from elmreg.registry.artifacts.base import ArtifactRepository, StoredObject, sha256_file
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.services import Endpoints
from elmreg.registry.store.entities import StoredArtifact

if TYPE_CHECKING:
    from elmreg.registry.artifacts.s3 import S3ArtifactRepository

__all__ = [
    "ArtifactCache",
    "ArtifactRepository",
    "S3ArtifactRepository",
    "StoredObject",
    "open_artifact_repository",
    "sha256_file",
]


def open_artifact_repository(endpoints: Endpoints, *, create_bucket: bool = True) -> ArtifactRepository:
    """The repository for the configured object store (any S3 API: the ``s3://`` scheme)."""
    # boto3 takes a noticeable share of start-up and verbs that only read the catalogue never touch S3.
    from elmreg.registry.artifacts.s3 import S3ArtifactRepository

    repository = S3ArtifactRepository(
        bucket=endpoints.s3_bucket,
        prefix=endpoints.s3_prefix,
        endpoint_url=endpoints.s3_endpoint_url or None,
        access_key_id=endpoints.s3_access_key_id or None,
        secret_access_key=endpoints.s3_secret_access_key or None,
        region=endpoints.s3_region,
    )
    if create_bucket:
        repository.ensure_bucket()
    return repository


def __getattr__(name: str):
    # The public re-export of S3ArtifactRepository, loaded (with boto3) on first use.
    if name == "S3ArtifactRepository":
        from elmreg.registry.artifacts.s3 import S3ArtifactRepository

        return S3ArtifactRepository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ArtifactCache:
    """A local cache of downloaded weights, keyed by sha256.

    Every download is verified against the catalogue's sha256 and size. A cached file is trusted only while a
    sidecar record of that verification still matches its size and modification time; anything else (a file
    edited or truncated on disk) is fetched and verified again.
    """

    def __init__(self, root: Path, repository: ArtifactRepository):
        self.root = root
        self.repository = repository

    def _paths(self, artifact: StoredArtifact) -> tuple[Path, Path]:
        base = self.root / "sha256" / artifact.sha256[:2] / artifact.sha256
        return base, base.with_name(base.name + ".verified.json")

    def fetch(self, artifact: StoredArtifact) -> Path:
        """A verified local copy of the artifact, downloading it if needed."""
        scheme = artifact.uri.split("://", 1)[0]
        if scheme != self.repository.scheme:
            raise ConfigurationError(
                f"{artifact.uri} is a '{scheme}' artifact but the configured store serves '{self.repository.scheme}'"
            )
        path, record = self._paths(artifact)
        if path.exists() and record.exists():
            stat = path.stat()
            try:
                seen = json.loads(record.read_text())
            except ValueError:
                seen = {}
            if seen == {"sha256": artifact.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns} and (
                stat.st_size == artifact.size
            ):
                return path
        self.repository.download(artifact, path)
        stat = path.stat()
        tmp = record.with_name(record.name + f".{os.getpid()}")
        tmp.write_text(
            json.dumps({"sha256": artifact.sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        )
        os.replace(tmp, record)
        return path
