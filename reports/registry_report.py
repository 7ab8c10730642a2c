"""``elmreg report``: one self-contained HTML page about the library, its routing decisions and benchmarks.

Every figure is a matplotlib PNG embedded as a data URI, so the file can be mailed or attached to a CI run and
opens anywhere without the registry. The page reads the catalogue through its stores, routing decisions through the
audit views, so what it shows is what an auditor sees in ``psql``.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from elmreg.registry.outputs import check_writable_file
from elmreg.reports.templating import render
from elmreg.runtime.context import RegistryContext


class Figure(NamedTuple):
    """One section of the page: its PNG (base64; None when there is nothing to draw) and what its tables show."""

    png: str | None
    data: dict[str, Any]


@dataclass
class Report:
    path: Path
    figures: list[str] = field(default_factory=list)  # ids of figures drawn (the others say why not)
    counts: dict[str, int] = field(default_factory=dict)


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


# -- the figures: each returns its Figure; templates/report.html.j2 lays out its tables or says why it is empty --
def _library_growth(context: RegistryContext) -> Figure:
    changes = context.library.history()
    if not changes:
        return Figure(None, {"changes": []})
    versions, experts, entries = [0], [0], [0]
    for row in changes:
        sign = 1 if row.change == "added" else -1
        versions.append(row.version)
        experts.append(experts[-1] + sign)
        entries.append(entries[-1] + sign * row.entries)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, left = plt.subplots(figsize=(7, 3.2))
    left.step(versions, experts, where="post", color="tab:blue", label="routable experts")
    left.set_xlabel("library version")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("routable experts", color="tab:blue")
    right = left.twinx()
    right.step(versions, entries, where="post", color="tab:orange", linestyle="--", label="library entries")
    right.set_ylabel("library entries", color="tab:orange")
    left.set_title("Library growth")
    return Figure(_png(figure), {"changes": changes})


def _benchmark_heatmap(context: RegistryContext) -> Figure:
    latest = context.evaluations.latest_benchmark_scores()
    if latest is None:
        return Figure(None, {"run": None})
    run, cells = latest
    tasks = sorted({c.task for c in cells})
    matrix: dict[str, dict[str, float]] = {}
    routes: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    for c in cells:
        if c.route == "expert":
            matrix.setdefault(c.expert, {})[c.task] = c.score
        else:
            routes[c.task][c.route] = c.score
            if c.route == "roe":
                routes[c.task]["roe_expert"] = c.expert
    data = {"run": run, "routes": routes}
    if not matrix:
        return Figure(None, data)
    experts = sorted(matrix)
    values = [[matrix[e].get(t, float("nan")) for t in tasks] for e in experts]
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(max(5.0, 2.0 + 0.9 * len(tasks)), 1.8 + 0.45 * len(experts)))
    image = axis.imshow(values, cmap="viridis", aspect="auto", vmin=0, vmax=100)
    axis.set_xticks(range(len(tasks)), tasks, rotation=40, ha="right")
    axis.set_yticks(range(len(experts)), experts)
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                axis.text(j, i, f"{value:.0f}", ha="center", va="center", color="white", fontsize=8)
    figure.colorbar(image, ax=axis, label="score")
    axis.set_xlabel("task")
    axis.set_ylabel("expert")
    axis.set_title("Expert x task scores (latest benchmark)")
    return Figure(_png(figure), data)


def _routing_margins(context: RegistryContext) -> Figure:
    decisions = context.audit.audit_rows(
        "audit_decisions", order_by="decision_id", filters={}, limit=None, descending=False
    )
    for d in decisions:
        d["task"] = d["task"] or d["caller_label"] or "(unlabelled)"
    if not decisions:
        return Figure(None, {"decisions": []})
    tasks = sorted({d["task"] for d in decisions})
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 1.4 + 0.45 * len(tasks)))
    for y, task in enumerate(tasks):
        shares = [d["vote_margin"] / d["q"] for d in decisions if d["task"] == task]
        axis.scatter(shares, [y] * len(shares), alpha=0.7, color="tab:green")
    axis.set_yticks(range(len(tasks)), tasks)
    axis.set_xlim(0, 1.02)
    axis.set_xlabel("vote margin (winner - runner-up) / Q")
    axis.set_title("Routing decisions per task")
    return Figure(_png(figure), {"decisions": decisions, "recent": list(reversed(decisions[-30:]))})


def _training_loss(context: RegistryContext) -> Figure:
    task_names = {t.id: t.name for t in context.catalogue.list_tasks()}
    expert_names = {e.id: e.name for e in context.catalogue.list_experts()}
    curves = [
        {
            "id": r.id,
            "task": task_names[r.task_id],
            "expert": expert_names.get(r.expert_id),
            "metrics": r.metrics,
            "finished_at": r.finished_at,
        }
        for r in context.jobs.list_training_runs(status="succeeded")
        if r.metrics.get("loss_per_step")
    ]
    if not curves:
        return Figure(None, {"curves": []})
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.4))
    for run in curves:
        losses = run["metrics"]["loss_per_step"]
        axis.plot(range(1, len(losses) + 1), losses, label=run["expert"] or run["task"], linewidth=1.2)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("target-token loss")
    axis.set_title("Training loss")
    if len(curves) <= 12:
        axis.legend(fontsize=7, ncol=2)
    return Figure(_png(figure), {"curves": curves})


# Figure id -> its builder, in page order (the template gives each section its title and tables).
BUILDERS = {
    "library-growth": _library_growth,
    "benchmark-heatmap": _benchmark_heatmap,
    "routing-margins": _routing_margins,
    "training-loss": _training_loss,
}
# A test checks that the page holds every one of them.
FIGURES = tuple(BUILDERS)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def write_report(context: RegistryContext, out: Path) -> Report:
    """Write the HTML report (``templates/report.html.j2``) to ``out`` and return which figures it holds.

    Raises:
        UserError: ``out`` cannot be written (checked before the figures are drawn).
    """
    check_writable_file(out, create_parents=True)
    summary = context.audit.summary()
    figures = {figure_id: build(context) for figure_id, build in BUILDERS.items()}
    page = render(
        "elmreg.reports",
        "report.html.j2",
        filters={"when": _when, "score": _score},
        summary=summary,
        figures=figures,
        written=dt.datetime.now(dt.UTC),
    )
    report = Report(
        path=out,
        figures=[figure_id for figure_id, figure in figures.items() if figure.png is not None],
        counts=dict(summary.row_counts),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(out)  # a reader never sees half a page
    return report
