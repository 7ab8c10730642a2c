"""Merged experts next to their parents on the parents' tasks: the paper's Table 4 in miniature.

For each merged expert (all ready ones, or those named), every parent that was trained for a task contributes that
task; the merged expert and each of its parents are evaluated on it (``--split``, a seeded sample of ``--limit``
examples) through ``Registry.evaluate``, so every score is also stored in the ``evaluations`` table. Printed per
(merged expert, task): the parent trained on the task ("own"), the merged expert, the difference, and the other
parents (what an expert of another task scores there).

    .venv/bin/python benchmarks/merge_table.py                       # every merged expert
    .venv/bin/python benchmarks/merge_table.py --experts colours+moods --limit 100
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from elmreg.api import Registry


@dataclass
class MergeRow:
    merged: str
    task: str
    metric: str
    own: str
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def delta(self) -> float:
        """Merged minus the task's own expert: what merging costs (or gains) on that task."""
        return self.scores[self.merged] - self.scores[self.own]


def merge_table(
    registry: Registry,
    experts: Sequence[str] | None = None,
    *,
    limit: int | None = 50,
    split: str = "validation",
) -> list[MergeRow]:
    """Evaluate merged experts and their parents on the parents' tasks; one row per (merged expert, task)."""
    merged = (
        [registry.expert(e) for e in experts]
        if experts
        else [e for e in registry.experts(status="ready") if e.kind == "merged"]
    )
    rows = []
    for expert in merged:
        if not expert.parents:
            raise SystemExit(f"expert {expert.name} is not a merged expert")
        parents = [registry.expert(parent_id) for parent_id, _ in expert.parents]
        for own in parents:
            if own.task_id is None:
                continue  # a merged parent has no task of its own
            task = registry.task(own.task_id)
            row = MergeRow(expert.name, task.name, task.metric, own.name)
            for candidate in (expert, *parents):
                result = registry.evaluate(task.id, f"expert:{candidate.id}", split=split, limit=limit)
                row.scores[candidate.name] = result.score
            rows.append(row)
    return rows


def format_table(rows: Sequence[MergeRow]) -> str:
    width = max([len("merged expert"), *(len(r.merged) for r in rows)])
    task_width = max([len("task"), *(len(r.task) for r in rows)])
    header = f"{'merged expert':<{width}} {'task':<{task_width}} {'metric':<9} {'own expert':>10} {'merged':>7} {'Δ':>6}  others"
    lines = [header, "-" * len(header)]
    for row in rows:
        others = ", ".join(
            f"{name} {score:.1f}" for name, score in row.scores.items() if name not in (row.merged, row.own)
        )
        lines.append(
            f"{row.merged:<{width}} {row.task:<{task_width}} {row.metric:<9} {row.scores[row.own]:>10.1f} "
            f"{row.scores[row.merged]:>7.1f} {row.delta:>+6.1f}  {others}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--experts", help="Merged experts (names or ids, comma-separated); default: all ready ones."
    )
    parser.add_argument("--limit", type=int, default=50, help="Examples per task (seeded sample).")
    parser.add_argument("--split", default="validation", help="Split to evaluate on.")
    args = parser.parse_args()
    started = time.perf_counter()
    with Registry() as registry:
        rows = merge_table(
            registry, args.experts.split(",") if args.experts else None, limit=args.limit, split=args.split
        )
    if not rows:
        print("no merged experts with task-trained parents: make one with 'elmreg merge A B'")
        return
    print(format_table(rows))
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
