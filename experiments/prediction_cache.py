"""Predictions kept on disk between experiment runs.

Predicting is most of an experiment's time (the oracle alone answers every unseen instance with every routable
expert), and a run that adds one router, or that was stopped halfway, would otherwise pay it all again. A
prediction is a function of the expert's verified weights (their sha256), the backbone and the rendered
instances, so that is the key; an expert published again gets a new id and hash, and so a new key. What the key
cannot see is a change of elmreg's own scoring code: ``elmreg experiment run --fresh`` recomputes everything.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from elmreg.data.prompts import PromptedExample
from elmreg.registry.entities import Expert

FORMAT = 1


def answering(expert: Expert | None, base_task: str) -> dict[str, Any]:
    """What answers: ``expert``'s verified weights, or (None) the base backbone of ``base_task``."""
    if expert is None:
        return {"base_of_task": base_task}
    return {"expert": expert.id, "sha256": expert.artifact.sha256 if expert.artifact else None}


def mixture_answering(experts: list[Expert], options: dict[str, Any]) -> dict[str, Any]:
    """What answers for an in-model router: its experts' weights, mixed with ``options``."""
    return {"mixture": [answering(e, "") for e in experts], "options": options}


def prediction_key(answering: dict[str, Any], instances: list[PromptedExample]) -> str:
    """The cache key of the predictions of ``answering`` (see :func:`answering`) on ``instances``."""
    payload = {
        "format": FORMAT,
        "answering": answering,
        "instances": [[i.input, i.target, list(i.answer_choices or ())] for i in instances],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class PredictionCache:
    """One small JSON file per (answering model, instances) under ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str, expected: int) -> list[str] | None:
        """The stored predictions, or None when absent, unreadable or of the wrong length."""
        try:
            stored: Any = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if (
            not isinstance(stored, list)
            or len(stored) != expected
            or not all(isinstance(p, str) for p in stored)
        ):
            return None
        return stored

    def put(self, key: str, predictions: list[str]) -> None:
        """Store atomically (a reader never sees half a file, two runs may write the same key)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(predictions))
        partial.replace(path)
