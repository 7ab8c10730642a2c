"""Checks that an output path can be written, made before the work whose result it will hold.

A verb that routes, evaluates or benchmarks records its work in the catalogue; finding only at the end that its
``--out`` cannot be written would leave a decision or a benchmark run behind with no output, and a traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from elmreg.registry.errors import UserError


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_file(path: Path | str, *, create_parents: bool = False) -> Path:
    """Return ``path`` if a file can be written there (probed by opening it; a file that did not exist is
    removed again).

    Args:
        create_parents: The writer creates missing parent folders; otherwise the parent must exist.

    Raises:
        UserError: What stands in the way (a folder at ``path``, a file where a folder must be, a missing folder,
            no permission, a read-only file system), in one line.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name, e.g. {path / 'out.jsonl'}")
    parent = path.parent
    if not parent.is_dir():
        if not create_parents:
            what = "is not a folder" if parent.exists() else "does not exist"
            raise UserError(f"cannot write {path}: {parent} {what}")
        _check_folder_can_be_made(path, parent)
        return path
    existed = path.exists()
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from exc
    if not existed:
        path.unlink(missing_ok=True)
    return path


def check_writable_folder(path: Path | str) -> Path:
    """Return ``path`` if files can be written into it (it exists, or can be created: nothing is created here).

    Raises:
        UserError: A file at ``path`` or above it, no permission, a read-only file system, in one line.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write to {path}: it is a file, not a folder")
    if not path.exists():
        _check_folder_can_be_made(path, path)
        return path
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to {path}: {exc.strerror}") from exc
    return path


def _check_folder_can_be_made(path: Path, folder: Path) -> None:
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"cannot write {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: no permission to create folders in {existing}")
