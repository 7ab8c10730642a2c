"""The nightly benchmark: new experts x a suite of tasks, RoE vs oracle vs base, and a Markdown report.

Each run evaluates the experts that became ready since the previous run (or ``since``) on every task of the suite:
by default the registered tasks (on their ``validation`` split) plus any held-out datasets named in the suite
(e.g. BIG-bench tasks never used for training). It stores an expert x task score matrix in ``evaluations`` (tagged
with the run), adds RoE / oracle / base per suite task, and writes ``report.md`` with a heatmap PNG.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from elmreg.inference.evaluation import Evaluator
from elmreg.registry.entities import Task
from elmreg.registry.errors import UserError
from elmreg.registry.outputs import check_writable_folder
from elmreg.reports.templating import render
from elmreg.runtime.context import RegistryContext


@dataclass
class BenchmarkReport:
    """One benchmark run; ``run_id`` is None when nothing was new since ``since`` (no run was recorded).

    Attributes:
        reused_scores: Scores the oracle took from earlier runs instead of evaluating again (expert x task cells).
    """

    run_id: int | None
    experts: list[str]
    tasks: list[str]
    since: dt.datetime | None = None
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)  # expert -> task -> score
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> {roe, roe_expert, oracle, base}
    reused_scores: int = 0
    report_path: Path | None = None


def run_benchmark(
    context: RegistryContext,
    *,
    since: dt.datetime | None = None,
    limit: int = 50,
    split: str = "validation",
    out_dir: Path | None = None,
    make_evaluator: Callable[[str], Evaluator] | None = None,
) -> BenchmarkReport:
    """Evaluate experts added since ``since`` (default: the last successful run) on the suite; write a report.

    With no expert added since then, nothing is evaluated and no run is recorded (``run_id`` None): the library
    gave nothing new to measure. The oracle of each task is the best of every ready expert; experts scored on the
    same task, split and sample size by an earlier run keep that score (an expert's weights and a seeded sample
    never change), so a nightly run costs the new experts' cells, RoE and base, not the whole library again.

    Args:
        make_evaluator: Builds the evaluator of a backbone (by name), e.g. to share a loaded backbone and its
            adapter pool or to show progress; by default a new one with its own pool.

    Raises:
        UserError: No registered task to benchmark on.
    """
    if out_dir is not None:  # before anything is evaluated or recorded
        check_writable_folder(out_dir)
    since = since if since is not None else context.evaluations.last_benchmark_start()
    tasks = context.catalogue.list_tasks()
    if not tasks:
        raise UserError("no registered task to benchmark on; add one with 'elmreg add-task'")
    ready = context.catalogue.list_experts(status="ready")
    experts = [e for e in ready if since is None or (e.ready_at and e.ready_at >= since)]
    if not experts:
        return BenchmarkReport(run_id=None, experts=[], tasks=[t.name for t in tasks], since=since)
    run_id = context.evaluations.start_benchmark_run(
        since=since, suite={"tasks": [t.name for t in tasks], "split": split, "limit": limit}
    ).id
    report = BenchmarkReport(
        run_id=run_id, experts=[e.name for e in experts], tasks=[t.name for t in tasks], since=since
    )
    try:
        evaluators: dict[int, Evaluator] = {}

        def evaluator_for(task: Task) -> Evaluator:
            if task.backbone_id not in evaluators:
                name = context.catalogue.get_backbone(task.backbone_id).name
                evaluators[task.backbone_id] = (make_evaluator or partial(Evaluator, context))(name)
            return evaluators[task.backbone_id]

        for task in tasks:
            evaluator = evaluator_for(task)
            for expert in experts:
                if expert.backbone_id != task.backbone_id:
                    continue
                result = evaluator.evaluate(
                    task, f"expert:{expert.id}", split=split, limit=limit, record=False
                )
                _record(context, task, expert.id, "expert", result, run_id, split)
                report.matrix.setdefault(expert.name, {})[task.name] = result.score
            row: dict[str, Any] = {}
            for route in ("roe", "base"):
                result = evaluator.evaluate(task, route, split=split, limit=limit, record=False)
                expert_id = context.catalogue.get_expert(result.expert).id if result.expert else None
                _record(context, task, expert_id, route, result, run_id, split)
                row[route] = result.score
                if route == "roe":
                    row["roe_expert"] = result.expert
            reused = _remember_earlier_scores(context, evaluator, task, ready, split, limit)
            oracle = evaluator.evaluate(task, "oracle", split=split, limit=limit, record=False)
            oracle.details["reused"] = sorted(e.name for e in reused)
            _record(
                context, task, context.catalogue.get_expert(oracle.expert).id, "oracle", oracle, run_id, split
            )
            row["oracle"] = oracle.score
            report.routes[task.name] = row
            report.reused_scores += len(reused)
        report.report_path = write_report(context, report, out_dir)
        _finish(context, run_id, "succeeded", report)
    except BaseException:
        _finish(context, run_id, "failed", report)
        raise
    return report


def _remember_earlier_scores(
    context: RegistryContext, evaluator: Evaluator, task: Task, ready: list, split: str, limit: int
) -> list:
    """Give the evaluator each ready expert's latest score on ``task`` from a finished run with the same split and
    sample size, so that the oracle compares them without answering again; returns those experts."""
    stored = context.evaluations.benchmark_expert_scores(task.id, split=split, limit=limit)
    reused = [e for e in ready if e.id in stored and e.backbone_id == task.backbone_id]
    for expert in reused:
        evaluator.remember(task, expert, stored[expert.id], split=split, limit=limit)
    return reused


def _record(context, task, expert_id, route, result, run_id, split) -> None:
    context.evaluations.record_evaluation(
        task_id=task.id,
        expert_id=expert_id,
        route=route,
        split=split,
        metric=result.metric,
        score=result.score,
        n_examples=result.n_examples,
        library_version=context.library.library_version(),
        details=result.details,
        benchmark_run_id=run_id,
    )


def _finish(context: RegistryContext, run_id: int, status: str, report: BenchmarkReport) -> None:
    summary = {"experts": report.experts, "tasks": report.tasks, "routes": report.routes}
    context.evaluations.finish_benchmark_run(
        run_id,
        status=status,
        summary=summary,
        report_uri=str(report.report_path) if report.report_path else None,
    )


def write_report(context: RegistryContext, report: BenchmarkReport, out_dir: Path | None = None) -> Path:
    """``report.md`` (``templates/benchmark.md.j2``) plus ``heatmap.png`` (expert x task scores) in ``out_dir``
    (default: HOME/reports/benchmark-N)."""
    out_dir = out_dir or context.settings.home / "reports" / f"benchmark-{report.run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    if report.matrix:
        _draw_heatmap(report, out_dir / "heatmap.png")
    path = out_dir / "report.md"
    path.write_text(
        render(
            "elmreg.inference", "benchmark.md.j2", filters={"score": _score}, report=report, nan=float("nan")
        )
    )
    return path


def _score(value: float) -> str:
    return f"{value:.1f}"


def _draw_heatmap(report: BenchmarkReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    experts = list(report.matrix)
    tasks = report.tasks
    values = [[report.matrix[e].get(t, float("nan")) for t in tasks] for e in experts]
    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.5 * len(experts)))
    image = axis.imshow(values, cmap="viridis", aspect="auto")
    axis.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    axis.set_yticks(range(len(experts)), experts)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            axis.text(j, i, f"{value:.0f}", ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axis, label="score")
    axis.set_xlabel("task (validation split)")
    axis.set_ylabel("expert")
    axis.set_title("new experts x tasks")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
