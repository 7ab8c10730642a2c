"""Datasets through Hugging Face ``datasets``: local json/jsonl/csv/parquet files and folders, or hub ids."""

from __future__ import annotations

import codecs
import logging
from pathlib import Path
from typing import Any

from elmreg.registry.errors import TaskSpecError, first_line

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_log = logging.getLogger(__name__)


def _data_files(path: Path) -> dict[str, list[str]]:
    """Split name -> files, from a file (split 'train') or a folder of ``<split>[-*].<ext>`` files."""
    if path.is_file():
        if path.suffix not in _BUILDERS:
            raise TaskSpecError(f"{path} is not a .json, .jsonl, .csv or .parquet file")
        return {"train": [str(path)]}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _BUILDERS)
    if not files:
        raise TaskSpecError(f"folder {path} holds no .json, .jsonl, .csv or .parquet files")
    splits: dict[str, list[str]] = {}
    for file in files:
        split = file.stem.split("-")[0].split(".")[0]
        splits.setdefault(split, []).append(str(file))
    if len(splits) > 1 or "train" in splits:
        return splits
    return {"train": [str(f) for f in files]}  # one unnamed group of files: that is the training split


def _datasets():
    import datasets

    # Its per-split progress bars would end up in elmreg's one-line error output; elmreg shows its own.
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _check_utf8(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """Refuse a text file that is not UTF-8, naming the line: ``datasets`` would fail with a message that names
    neither (or, for JSON lines, let a UnicodeDecodeError escape). Streamed: data files can be large."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            try:
                decoder.decode(chunk, final=len(chunk) < chunk_bytes)
            except UnicodeDecodeError as exc:
                line += chunk.count(b"\n", 0, max(exc.start, 0))
                raise TaskSpecError(
                    f"{path} is not UTF-8 (line {line}, byte {offset + max(exc.start, 0)}); save it as UTF-8"
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise TaskSpecError(
                f"{path} is not UTF-8 (it ends inside a character); save it as UTF-8"
            ) from None


def load_local(path: Path, split: str, cache_dir: Path) -> list[dict[str, Any]]:
    """Rows of one split of a local dataset file or folder.

    Raises:
        TaskSpecError: Unknown split, mixed formats, or an unreadable file.
    """
    datasets = _datasets()

    splits = _data_files(path)
    if split not in splits:
        raise TaskSpecError(f"dataset {path} has no split '{split}'; available: {', '.join(sorted(splits))}")
    suffixes = {Path(f).suffix for f in splits[split]}
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        raise TaskSpecError(f"split '{split}' of {path} mixes file formats ({', '.join(sorted(suffixes))})")
    if all(Path(f).stat().st_size == 0 for f in splits[split]):
        raise TaskSpecError(f"dataset {path} [{split}] is empty; pick another split or dataset")
    for file in splits[split]:
        if Path(file).suffix != ".parquet":
            _check_utf8(Path(file))
    try:
        dataset = datasets.load_dataset(
            builders.pop(), data_files={split: splits[split]}, split=split, cache_dir=str(cache_dir)
        )
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable files
        reason = first_line(exc)
        raise TaskSpecError(f"cannot read {path} ({split}): {reason}") from exc
    return [dict(row) for row in dataset]


def load_hub(name: str, subset: str | None, split: str, cache_dir: Path) -> list[dict[str, Any]]:
    """Rows of a Hugging Face hub dataset (needs the hub to be reachable, or the dataset in the cache).

    Raises:
        TaskSpecError: The dataset, subset or split cannot be found or fetched.
    """
    datasets = _datasets()

    try:
        dataset = datasets.load_dataset(name, subset, split=split, cache_dir=str(cache_dir))
    except ValueError as exc:
        message = first_line(exc)
        raise TaskSpecError(f"dataset '{name}': {message}") from exc
    except Exception as exc:  # noqa: BLE001 - offline, missing and gated datasets all surface differently
        first = first_line(exc)
        raise TaskSpecError(
            f"dataset '{name}' is not a local file or folder and could not be loaded from the Hugging Face hub "
            f"({first}); give a path to json/jsonl/csv/parquet files, or 'bigbench:<task>'"
        ) from exc
    return [dict(row) for row in dataset]
