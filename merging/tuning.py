"""Choosing merge weights on held-out data: a small grid search, as in the paper and Ilharco et al. (2023).

Every candidate weight vector (the grid's values for each parent) is merged into a temporary file, loaded onto
the backbone, and scored on the validation split of each tuning task with the task's own metric, exactly as
``elmreg eval`` scores experts (rank classification or generation). The candidate with the best mean score wins;
ties go to the candidate closest to equal weights (the paper's default), then to the earlier one. Candidates are
never uploaded or registered; the whole table is stored with the merged expert.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from elmreg.data.examples import task_examples
from elmreg.experts import load_expert, unload_expert
from elmreg.inference.assignment import Assignment
from elmreg.inference.engine import LoadedModelEngine, answer_texts
from elmreg.inference.evaluation import metric_score
from elmreg.merging.methods import MergeError, MergeSpec
from elmreg.merging.weights import scratch_dir, write_merged_weights
from elmreg.registry.entities import Expert, Task
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext

DEFAULT_GRID = (0.25, 0.5, 0.75, 1.0)
# Each candidate is a merge plus an evaluation on every tuning task: beyond this, ask for a coarser grid.
MAX_CANDIDATES = 64


def candidate_weights(parents: int, grid: Sequence[float]) -> list[tuple[float, ...]]:
    """Every combination of grid values, one per parent, except all zeros.

    Raises:
        MergeError: An empty grid, or more than :data:`MAX_CANDIDATES` candidates.
    """
    values = sorted({float(v) for v in grid})
    if not values:
        raise MergeError("the weight grid is empty; give values such as --grid 0.25,0.5,0.75,1")
    candidates = [c for c in itertools.product(values, repeat=parents) if any(c)]
    if len(candidates) > MAX_CANDIDATES:
        raise MergeError(
            f"{len(values)} grid values for {parents} experts make {len(candidates)} candidates (at most "
            f"{MAX_CANDIDATES}); give fewer values with --grid"
        )
    return candidates


def tune_weights(
    context: RegistryContext,
    parents: Sequence[Expert],
    base_kind: str,
    spec: MergeSpec,
    tasks: Sequence[Task],
    *,
    grid: Sequence[float] | None = None,
    limit: int | None = 32,
    split: str = "validation",
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Grid-search the merge weights on ``tasks``' held-out ``split``.

    Returns:
        JSON-ready: ``tasks``, ``split``, ``limit``, ``grid``, ``table`` (one row per candidate: ``weights``,
        ``scores`` per task, ``mean``), ``chosen`` weights, ``chosen_score``, ``seconds``.

    Raises:
        MergeError: No tasks, a task on another backbone or without examples in ``split``, or too big a grid.
    """
    started = time.perf_counter()
    if not tasks:
        raise MergeError("--tune-on needs at least one task")
    backbone_id = parents[0].backbone_id
    for task in tasks:
        if task.backbone_id != backbone_id:
            raise MergeError(
                f"task {task.name} is on another backbone than the experts; tune on tasks of theirs"
            )
    grid = tuple(grid) if grid else DEFAULT_GRID
    candidates = candidate_weights(len(parents), grid)
    examples = {}
    for task in tasks:
        examples[task.name] = task_examples(
            task, cache_dir=context.settings.cache_path, split=split, limit=limit
        )
        if not examples[task.name]:
            raise MergeError(f"task {task.name} has no examples in split '{split}' to tune on")
    backbone = context.backbones.get(context.catalogue.get_backbone(backbone_id).name)
    uniform = 1.0 / len(parents)
    table = []
    for number, weights in enumerate(candidates, 1):
        reporter.stage(f"candidate {number}/{len(candidates)}: weights {list(weights)}")
        with tempfile.TemporaryDirectory(prefix="tune-", dir=scratch_dir(context)) as scratch:
            path, config = write_merged_weights(
                context, parents, base_kind, replace(spec, weights=weights), Path(scratch)
            )
            model = load_expert(backbone, path, config, kind=base_kind)
            engine = LoadedModelEngine(model, backbone)
            try:
                scores = {
                    task.name: metric_score(
                        task.metric,
                        answer_texts(
                            engine,
                            examples[task.name],
                            Assignment.fixed(None, len(examples[task.name])),
                            task_type=task.task_type,
                        ),
                        [e.target for e in examples[task.name]],
                    )
                    for task in tasks
                }
            finally:
                unload_expert(backbone, model)
        mean = sum(scores.values()) / len(scores)
        table.append(
            {
                "weights": list(weights),
                "scores": {k: round(v, 4) for k, v in scores.items()},
                "mean": round(mean, 4),
            }
        )
    best = max(
        range(len(table)),
        key=lambda i: (table[i]["mean"], -sum(abs(w - uniform) for w in table[i]["weights"]), -i),
    )
    return {
        "tasks": [t.name for t in tasks],
        "split": split,
        "limit": limit,
        "grid": list(grid),
        "metric": {t.name: t.metric for t in tasks},
        "table": table,
        "chosen": table[best]["weights"],
        "chosen_score": table[best]["mean"],
        "seconds": round(time.perf_counter() - started, 3),
    }
