"""Trained retrievers in the artifact store: one sentence-transformers folder per embedder, loaded by name.

A retriever that elmreg fine-tuned (``elmreg library train-retriever``) is an embedder like any other in the
catalogue, with one difference: its weights exist nowhere but in the artifact store, so every machine of a
deployment (workers, servers, notebooks) loads it by its catalogue name. The folder travels as one uncompressed
tar with a fixed member order and zeroed metadata, so the same weights always give the same sha256; the
artifact store verifies it on upload and on every download, and the archive is unpacked once per machine.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from elmreg.models.embedder import Embedder, load_embedder
from elmreg.registry.entities import Embedder as EmbedderRecord
from elmreg.registry.errors import NotFoundError
from elmreg.registry.gc import publishing_artifacts
from elmreg.runtime.context import RegistryContext

ARCHIVE_SUFFIX = ".tar"
# Written last into an unpacked folder, naming the archive it came from: a folder without it is an unpacking
# that was interrupted, and is unpacked again.
_COMPLETE = ".elmreg-unpacked"


def pack_folder(folder: Path, archive: Path) -> Path:
    """Write ``folder`` as a reproducible tar: sorted members, no owners, times or modes of this machine."""

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            if path.name == _COMPLETE:
                continue
            tar.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=normalise)
    return archive


def unpacked_folder(context: RegistryContext, record: EmbedderRecord) -> Path:
    """The trained embedder's folder on this machine: unpacked from the verified archive on first use."""
    assert record.artifact is not None
    target = context.settings.cache_path / "embedders" / record.artifact.sha256
    if (target / _COMPLETE).is_file():
        return target
    # The artifact cache downloads the archive and checks its sha256 and size against the catalogue.
    archive = context.artifact_cache.fetch(record.artifact)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".unpacking-"))
    try:
        with tarfile.open(archive) as tar:
            # The 'data' filter refuses absolute paths, links out of the folder and special files.
            tar.extractall(staging, filter="data")
        (staging / _COMPLETE).write_text(record.artifact.sha256 + "\n")
        shutil.rmtree(target, ignore_errors=True)  # an interrupted unpacking
        os.replace(staging, target)  # atomic: a reader never sees a half-unpacked folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    # The folder is what is used from now on; keeping the archive too would hold the weights twice on disk.
    archive.unlink(missing_ok=True)
    return target


def adopt_folder(context: RegistryContext, record: EmbedderRecord, folder: Path) -> Path:
    """Move the folder a retriever was just saved to where :func:`unpacked_folder` finds it, so the machine
    that trained it does not download what it has just uploaded."""
    assert record.artifact is not None
    target = context.settings.cache_path / "embedders" / record.artifact.sha256
    if not (target / _COMPLETE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        (folder / _COMPLETE).write_text(record.artifact.sha256 + "\n")
        os.replace(folder, target)
    return target


def publish_retriever(
    context: RegistryContext,
    folder: Path,
    *,
    name: str,
    dimension: int,
    trained_from_id: int,
    training: dict[str, Any],
) -> EmbedderRecord:
    """Upload a saved sentence-transformers folder and register it as the embedder ``name``.

    Raises:
        AlreadyExistsError: An embedder called ``name`` exists (the upload stays unreferenced; gc removes it).
        ArtifactError: The upload failed or could not be verified.
    """
    with tempfile.TemporaryDirectory(dir=context.settings.cache_path) as scratch:
        archive = pack_folder(folder, Path(scratch) / f"{name}{ARCHIVE_SUFFIX}")
        # From the upload until the embedder references the object, garbage collection must not delete it.
        with publishing_artifacts(context.jobs):
            artifact = context.artifacts.put_file(archive, suffix=ARCHIVE_SUFFIX)
            return context.catalogue.register_trained_embedder(
                name, dimension, artifact, trained_from_id=trained_from_id, training=training
            )


def load_catalogued_embedder(context: RegistryContext, name: str, device: str = "cpu") -> Embedder:
    """The embedder ``name``: a trained retriever from the artifact store (fetched, verified and unpacked once
    per machine), or a hub id / local folder as :func:`~elmreg.models.embedder.load_embedder` loads it."""
    try:
        record = context.catalogue.get_embedder(name)
    except NotFoundError:
        record = None  # not registered yet: the configured embedder before its first expert
    if record is None or record.artifact is None:
        return load_embedder(name, device)
    return load_embedder(name, device, path=str(unpacked_folder(context, record)))
