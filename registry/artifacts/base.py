"""The artifact store interface: content-addressed weight files, verified by sha256 and size."""

from __future__ import annotations

import datetime as dt
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from elmreg.registry.entities import StoredArtifact

_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class StoredObject:
    """An object as the store lists it (for garbage collection)."""

    uri: str
    size: int
    last_modified: dt.datetime


@dataclass(frozen=True)
class IncompleteUpload:
    """A multipart upload that was started and never completed or aborted: its parts take room but no object
    shows them (an uploader killed mid-way leaves one)."""

    uri: str
    upload_id: str
    initiated: dt.datetime


def sha256_file(path: Path) -> tuple[str, int]:
    """Return the hex sha256 and the size of a file, read in chunks (task vectors can be gigabytes)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ArtifactRepository(ABC):
    """Puts and gets immutable weight files. The catalogue keeps ``StoredArtifact`` (URI, sha256, size)."""

    scheme: str

    @abstractmethod
    def put_file(self, path: Path, *, suffix: str = ".safetensors") -> StoredArtifact:
        """Upload a file under a key derived from its sha256 and verify the stored object.

        Uploading the same content twice stores it once. When this returns, the object exists with the
        recorded size and checksum, so the catalogue may point at it.

        Raises:
            CredentialsError: The server rejected the credentials.
            ArtifactError: The upload failed or could not be verified.
        """

    @abstractmethod
    def download(self, artifact: StoredArtifact, destination: Path) -> Path:
        """Download to ``destination``, verifying sha256 and size; a mismatch deletes the file and raises.

        Raises:
            ArtifactNotFoundError: The object is missing.
            ArtifactIntegrityError: The bytes do not match the catalogue.
        """

    @abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether an object exists at ``uri``."""

    @abstractmethod
    def stat(self, uri: str) -> StoredObject | None:
        """The object at ``uri`` as the store describes it now (None when it is missing)."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Delete the object at ``uri`` (no error if it is already gone)."""

    @abstractmethod
    def list_objects(self) -> Iterator[StoredObject]:
        """Every object under this repository's prefix."""

    @abstractmethod
    def list_incomplete_uploads(self) -> Iterator[IncompleteUpload]:
        """Every multipart upload under this repository's prefix that is neither completed nor aborted.

        Raises:
            ArtifactError: The store cannot list them (the message says whether it does not support it).
        """

    @abstractmethod
    def abort_upload(self, upload: IncompleteUpload) -> None:
        """Abort a multipart upload and free its parts (no error if it is already gone)."""
