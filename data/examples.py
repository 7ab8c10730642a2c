"""The one path from a dataset split to prompted examples: training, evaluation, routing queries and the
experiment harness all read data through it, so an expert is evaluated on examples rendered exactly like the
ones it was trained on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elmreg.data.prompts import PromptedExample, PromptTemplate, render_examples
from elmreg.data.sources import DatasetSpec, default_template, load_dataset_rows
from elmreg.registry.entities import Task


def render_split(
    spec: DatasetSpec,
    templates: Sequence[PromptTemplate | dict[str, Any]] | None,
    *,
    cache_dir: Path,
    limit: int | None = None,
    seed: int = 0,
) -> list[PromptedExample]:
    """Rows of a dataset split (a seeded sample of ``limit``, order kept) rendered with ``templates`` (as
    stored on tasks, or parsed), or with the dataset's default template when None (BIG-bench)."""
    loaded = load_dataset_rows(spec, cache_dir=cache_dir, max_rows=limit, seed=seed)
    if templates is None:
        parsed = [default_template(spec, loaded.rows)]
    else:
        parsed = [t if isinstance(t, PromptTemplate) else PromptTemplate.from_dict(t) for t in templates]
    return render_examples(loaded.rows, parsed, seed=seed)


def task_examples(
    task: Task, *, cache_dir: Path, split: str | None = None, limit: int | None = None, seed: int = 0
) -> list[PromptedExample]:
    """A registered task's examples of ``split`` (default: its training split). ``limit=task.max_examples``
    with the training seed gives exactly the examples its expert was trained on."""
    spec = DatasetSpec(task.dataset, task.subset, split or task.split)
    return render_split(spec, task.templates, cache_dir=cache_dir, limit=limit, seed=seed)
