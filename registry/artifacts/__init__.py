"""Expert weights in object storage, chosen by URI scheme, with a verified local download cache."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from elmreg.registry.artifacts.base import ArtifactRepository, StoredObject, sha256_file
from elmreg.registry.endpoints import Endpoints
from elmreg.registry.entities import StoredArtifact
from elmreg.registry.errors import ConfigurationError

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


def open_artifact_repository(endpoints: Endpoints) -> ArtifactRepository:
    """The repository for the configured object store (any S3 API: the ``s3://`` scheme).

    Opening it touches nothing; the first upload creates the configured bucket if it is missing, reads never do
    (a mistyped bucket name must be an error, not a new bucket).
    """
    # boto3 takes a noticeable share of start-up and verbs that only read the catalogue never touch S3.
    from elmreg.registry.artifacts.s3 import S3ArtifactRepository

    return S3ArtifactRepository(
        bucket=endpoints.s3_bucket,
        prefix=endpoints.s3_prefix,
        endpoint_url=endpoints.s3_endpoint_url or None,
        access_key_id=endpoints.s3_access_key_id or None,
        secret_access_key=endpoints.s3_secret_access_key or None,
        region=endpoints.s3_region,
    )


def __getattr__(name: str):
    # The public re-export of S3ArtifactRepository, loaded (with boto3) on first use.
    if name == "S3ArtifactRepository":
        from elmreg.registry.artifacts.s3 import S3ArtifactRepository

        return S3ArtifactRepository
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ArtifactCache:
    """A local cache of downloaded weights, keyed by sha256.

    Every download is verified against the catalogue's sha256 and size, and so is every cached copy each time it
    is handed out: a file damaged on disk, or left short by a full disk, is never used; it is fetched again.
    Hashing costs about a second per gigabyte, small next to loading the weights it guards.
    """

    def __init__(self, root: Path, repository: ArtifactRepository):
        self.root = root
        self.repository = repository

    def _path(self, artifact: StoredArtifact) -> Path:
        return self.root / "sha256" / artifact.sha256[:2] / artifact.sha256

    def fetch(self, artifact: StoredArtifact) -> Path:
        """A verified local copy of the artifact, downloading it if needed.

        Raises:
            ArtifactError: The download failed (the store is unreachable, or no room in the cache directory).
            ArtifactIntegrityError: The stored bytes do not match the catalogue.
        """
        scheme = artifact.uri.split("://", 1)[0]
        if scheme != self.repository.scheme:
            raise ConfigurationError(
                f"{artifact.uri} is a '{scheme}' artifact but the configured store serves '{self.repository.scheme}'"
            )
        path = self._path(artifact)
        try:
            cached = sha256_file(path) if path.is_file() else None
        except OSError:
            cached = None
        if cached == (artifact.sha256, artifact.size):
            return path
        # The download writes a temporary file and renames it only once verified, so no reader ever sees a
        # partial or unverified copy under this name.
        return self.repository.download(artifact, path)
