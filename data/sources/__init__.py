"""Where task data comes from: BIG-bench JSON tasks, local files and folders, Hugging Face hub datasets.

``load_dataset_rows`` is the one entry point; rows are plain dicts whose keys a prompt template reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elmreg.data.prompts import PromptTemplate
from elmreg.data.sources import bigbench, huggingface
from elmreg.registry.errors import TaskSpecError

BIGBENCH_PREFIX = "bigbench:"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as a task names it: ``bigbench:<task>[/<subtask>]``, a local path, or a hub id."""

    name: str
    subset: str | None = None
    split: str = "train"

    @property
    def is_bigbench(self) -> bool:
        return self.name.startswith(BIGBENCH_PREFIX)

    def bigbench_task(self) -> tuple[str, str | None]:
        task = self.name[len(BIGBENCH_PREFIX) :]
        if "/" in task:
            task, subtask = task.split("/", 1)
            return task, subtask
        return task, self.subset

    def label(self) -> str:
        return self.name + (f" ({self.subset})" if self.subset else "") + f" [{self.split}]"


@dataclass(frozen=True)
class LoadedRows:
    rows: list[dict[str, Any]]
    columns: list[str]
    total: int  # rows in the split before sampling


def load_dataset_rows(
    spec: DatasetSpec,
    *,
    cache_dir: Path,
    max_rows: int | None = None,
    seed: int = 0,
    bigbench_tasks: bigbench.BigBenchTasks | None = None,
) -> LoadedRows:
    """Rows of a dataset split; with ``max_rows``, a seeded random sample of that many (order kept).

    Args:
        cache_dir: elmreg's cache (BIG-bench sdist, Hugging Face datasets cache).
        bigbench_tasks: Read BIG-bench tasks from here instead of the cached sdist (tests pass a small tree).

    Raises:
        TaskSpecError: Unknown dataset, subset or split, or no rows.
    """
    if spec.is_bigbench:
        tasks = bigbench_tasks or bigbench.BigBenchTasks.from_cache(cache_dir)
        task, subtask = spec.bigbench_task()
        rows = tasks.load(task, subtask, spec.split)
    elif Path(spec.name).expanduser().exists():
        rows = huggingface.load_local(Path(spec.name).expanduser(), spec.split, cache_dir / "datasets")
    else:
        rows = huggingface.load_hub(spec.name, spec.subset, spec.split, cache_dir / "datasets")
    if not rows:
        raise TaskSpecError(f"dataset {spec.label()} is empty; pick another split or dataset")
    total = len(rows)
    if max_rows is not None and max_rows < total:
        keep = sorted(random.Random(seed).sample(range(total), max_rows))
        rows = [rows[i] for i in keep]
    return LoadedRows(rows=rows, columns=sorted(rows[0]), total=total)


def default_template(spec: DatasetSpec, rows: list[dict[str, Any]]) -> PromptTemplate:
    """The template used when a task gives none: BIG-bench rows as they are, with their answer choices.

    Raises:
        TaskSpecError: The dataset is not BIG-bench, so there is no sensible default.
    """
    if not spec.is_bigbench:
        raise TaskSpecError(
            f"dataset {spec.name} needs a prompt: give --prompt 'INPUT ||| TARGET' (Jinja over the columns "
            f"{', '.join(sorted(rows[0]))}) or --template-file/--template-name"
        )
    multiple_choice = all(row.get("choices") for row in rows)
    return PromptTemplate(
        jinja=bigbench.DEFAULT_JINJA,
        name="bigbench-default",
        answer_choices=bigbench.DEFAULT_ANSWER_CHOICES if multiple_choice else None,
    )
