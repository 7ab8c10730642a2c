"""``elmreg report``: one self-contained HTML page about the library, its routing decisions and benchmarks.

Every figure is a matplotlib PNG embedded as a data URI, so the file can be mailed or attached to a CI run and
opens anywhere without the registry. The page reads the catalogue only through SQL that an auditor could run too
(the audit views for routing), so what it shows is what ``psql`` shows.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmreg.registry.context import RegistryContext

# Figure ids, in page order; a test checks that the page holds every one of them.
FIGURES = ("library-growth", "benchmark-heatmap", "routing-margins", "training-loss")


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


# -- the figures: each returns (png as base64 or None, an HTML table or note) ---------------------------------
def _library_growth(context: RegistryContext) -> tuple[str | None, str]:
    changes = context.library.history()
    if not changes:
        return None, "<p class=note>The library is empty: no expert has been published yet.</p>"
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
    table = _table(
        ["version", "change", "expert", "kind", "entries", "when"],
        [
            [r.version, r.change, r.expert_name, r.expert_kind, r.entries, _when(r.created_at)]
            for r in changes
        ],
    )
    return _png(figure), table


def _benchmark_heatmap(context: RegistryContext) -> tuple[str | None, str]:
    latest = context.evaluations.latest_benchmark_scores()
    if latest is None:
        return (
            None,
            "<p class=note>No benchmark has run yet: <code>elmreg benchmark</code> fills this in.</p>",
        )
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
    route_table = _table(
        ["task", "RoE", "RoE expert", "oracle", "base"],
        [
            [t, _score(r.get("roe")), r.get("roe_expert", ""), _score(r.get("oracle")), _score(r.get("base"))]
            for t, r in routes.items()
        ],
    )
    caption = f"<p>Benchmark run {run.id} ({_when(run.started_at)}).</p>"
    if not matrix:
        return None, caption + "<p class=note>That run had no new expert to score.</p>" + route_table
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
    return _png(figure), caption + route_table


def _routing_margins(context: RegistryContext) -> tuple[str | None, str]:
    decisions = context.audit.audit_rows(
        "audit_decisions", order_by="decision_id", filters={}, limit=None, descending=False
    )
    for d in decisions:
        d["task"] = d["task"] or d["caller_label"] or "(unlabelled)"
    if not decisions:
        return None, "<p class=note>No routing decision yet: <code>elmreg route</code> records one.</p>"
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
    recent = decisions[-30:]
    table = _table(
        ["decision", "when", "task", "chosen", "votes", "runner-up", "margin", "version", "ms"],
        [
            [
                d["decision_id"],
                _when(d["created_at"]),
                d["task"],
                d["chosen_expert"],
                f"{d['winner_votes']}/{d['q']}",
                f"{d['runner_up_expert'] or '-'} ({d['runner_up_votes']})",
                d["vote_margin"],
                d["library_version"],
                d["latency_ms"],
            ]
            for d in reversed(recent)
        ],
    )
    note = f"<p>The {len(recent)} most recent of {len(decisions)} decisions (view <code>audit_decisions</code>).</p>"
    return _png(figure), note + table


def _training_loss(context: RegistryContext) -> tuple[str | None, str]:
    runs = context.jobs.list_training_runs(status="succeeded")
    curves = [r for r in runs if r.metrics.get("loss_per_step")]
    if not curves:
        return None, "<p class=note>No finished training run with a loss curve yet.</p>"
    task_names = {t.id: t.name for t in context.catalogue.list_tasks()}
    expert_names = {e.id: e.name for e in context.catalogue.list_experts()}
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 3.4))
    for run in curves:
        losses = run.metrics["loss_per_step"]
        label = expert_names.get(run.expert_id) or task_names[run.task_id]
        axis.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1.2)
    axis.set_xlabel("optimiser step")
    axis.set_ylabel("target-token loss")
    axis.set_title("Training loss")
    if len(curves) <= 12:
        axis.legend(fontsize=7, ncol=2)
    table = _table(
        ["run", "expert", "task", "steps", "final loss", "seconds", "finished"],
        [
            [
                r.id,
                expert_names.get(r.expert_id),
                task_names[r.task_id],
                r.metrics.get("steps"),
                r.metrics.get("final_loss"),
                r.metrics.get("seconds"),
                _when(r.finished_at),
            ]
            for r in curves
        ],
    )
    return _png(figure), table


SECTIONS = {
    "library-growth": ("Library growth", _library_growth),
    "benchmark-heatmap": ("Latest benchmark: expert x task, RoE vs oracle vs base", _benchmark_heatmap),
    "routing-margins": ("Routing decisions and vote margins", _routing_margins),
    "training-loss": ("Training loss curves", _training_loss),
}


# -- HTML ------------------------------------------------------------------------------------------------------
def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _score(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f4f4f4; } img { max-width: 100%; } .note { color: #777; font-style: italic; }
.summary span { display: inline-block; margin-right: 1.5em; }
"""


def write_report(context: RegistryContext, out: Path) -> Report:
    """Write the HTML report to ``out`` and return which figures it holds."""
    summary = context.audit.summary()
    report = Report(path=out, counts=dict(summary.row_counts))
    sections = []
    for figure_id, (title, build) in SECTIONS.items():
        png, body = build(context)
        if png is not None:
            report.figures.append(figure_id)
            image = f'<img id="{figure_id}" alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
        else:
            image = ""
        sections.append(f"<section><h2>{html.escape(title)}</h2>{image}{body}</section>")
    counts = "".join(
        f"<span><b>{html.escape(name)}</b> {value}</span>" for name, value in summary.row_counts.items()
    )
    page = (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        "<title>elmreg report</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>elmreg report</h1>"
        f"<p>Library version {summary.library_version}, schema {html.escape(str(summary.schema_revision))},"
        f" written {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}.</p>"
        f"<p class=summary>{counts}</p>" + "".join(sections) + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(out)  # a reader never sees half a page
    return report
