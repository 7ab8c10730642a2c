"""Using the library: route (RoE in SQL) and audit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from elmreg.cli.errors import UserFacingError
from elmreg.cli.options import TASK_SPEC_FIELDS, engine_options, task_spec_options, use_engine
from elmreg.cli.output import echo_json, echo_table
from elmreg.cli.progress import evaluation_progress, is_quiet
from elmreg.data.prompts import PromptTemplate
from elmreg.inference.routers import parse_router_options, router_class, router_names
from elmreg.registry.audit_views import AUDIT_QUERIES, AUDIT_VIEWS
from elmreg.registry.kinds import expert_row_kinds

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def q_option(help: str):
    """``--q``: how many instances a router routes on (the paper's Q)."""
    return click.option("--q", "q", type=click.IntRange(min=1), default=32, show_default=True, help=help)


def router_option(help: str):
    """``--router-option NAME=VALUE`` (repeatable), parsed by ``inference.routers.parse_router_options``."""
    return click.option("--router-option", "router_options", multiple=True, metavar="NAME=VALUE", help=help)


def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


def load_instances(
    registry: Registry,
    input_file: str | None,
    dataset: str | None,
    split: str,
    task: str | None,
    limit: int | None,
):
    """Instances from --input (JSON lines) or --dataset (a split rendered with its default template)."""
    from elmreg.inference.inputs import read_jsonl, to_instances

    if bool(input_file) == bool(dataset):
        raise click.UsageError("give exactly one of --input FILE or --dataset NAME")
    if dataset:
        return registry.instances(dataset, split=split, limit=limit)
    templates = [PromptTemplate.from_dict(t) for t in registry.task(task).templates] if task else None
    return to_instances(read_jsonl(Path(input_file)), templates)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False),
    help='JSON lines: {"input": ..., "answer_choices": [...]} or raw rows with --task.',
)
@click.option("--dataset", help="Route instances of a dataset split instead (e.g. bigbench:strategyqa).")
@click.option("--split", default="validation", show_default=True, help="Split of --dataset.")
@click.option(
    "--task", help="Registered task the instances come from: its template renders raw rows; shown in audits."
)
@q_option("Instances used (a seeded sample of the input).")
@click.option(
    "--router",
    type=click.Choice(router_names()),
    default="roe",
    show_default=True,
    help="Routing method ('elmreg routers' describes each).",
)
@router_option("An option of the router, e.g. top_k=8 (repeatable).")
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    help="Nearest library entries per instance that vote (the router's top_k; RoE: 1).",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(expert_row_kinds()),
    help="Only experts of this kind (repeatable).",
)
@click.option(
    "--library-version",
    type=click.IntRange(min=1),
    help="Route against the library as it was at this version.",
)
@click.option(
    "--prefer-alias",
    help="Of each task with this alias, route only to the expert it names, e.g. prod "
    "(default: ELMREG_ROUTING_PREFER_ALIAS; '' for none).",
)
@click.option("--label", help="Caller label stored with the decision.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def route(
    ctx: click.Context,
    input_file,
    dataset,
    split,
    task,
    q,
    router,
    router_options,
    top_k,
    kinds,
    library_version,
    prefer_alias,
    label,
    as_json,
) -> None:
    """Choose an expert for instances of a task, by Retrieval-of-Experts unless another --router is named, in
    SQL; the decision (with the router and its options) and every vote are recorded for audit.

    \b
    Examples:
      elmreg route --dataset bigbench:strategyqa --split validation
      elmreg route --input queries.jsonl --q 16 --label nightly
      elmreg route --dataset bigbench:strategyqa --router roe-knn --router-option top_k=16
      elmreg route --input queries.jsonl --router per-instance
      elmreg route --dataset bigbench:strategyqa --prefer-alias prod
    """
    registry = _registry(ctx)
    options = parse_router_options(router_options)
    instances = load_instances(registry, input_file, dataset, split, task, None)
    assignment = registry.assign(
        instances,
        task=task,
        q=q,
        router=router,
        router_options=options,
        top_k=top_k,
        kinds=kinds or None,
        library_version=library_version,
        caller_label=label or dataset,
        prefer_alias=prefer_alias,
    )
    decisions = assignment.decisions
    if len(decisions) > 1:
        if as_json:
            return echo_json(list(decisions))
        click.echo(
            f"{len(decisions)} instances routed one by one: decisions {decisions[0].decision_id}-"
            f"{decisions[-1].decision_id}, library version {decisions[0].library_version}"
        )
        echo_table(["expert", "instances"], list(assignment.experts_chosen().items()))
        return
    decision = decisions[0]
    if as_json:
        return echo_json(decision)
    click.echo(
        f"chosen expert: {decision.chosen_expert_name} (id {decision.chosen_expert_id})  "
        f"decision {decision.decision_id}, router {decision.router}"
        + (f" (embedder {decision.embedder})" if decision.router == "trained" else "")
        + f", library version {decision.library_version}, "
        f"Q={decision.q}, {decision.latency_ms:.1f} ms"
    )
    weighted = any(t.weight is not None for t in decision.tallies)
    echo_table(
        ["expert", "votes", "similarity sum", *(["weight"] if weighted else [])],
        [
            (t.expert_name, t.votes, f"{t.score_sum:.3f}", *([f"{t.strength:.3f}"] if weighted else []))
            for t in decision.tallies
        ],
    )
    click.echo(f"\naudit: SELECT * FROM audit_votes WHERE decision_id = {decision.decision_id};")


@click.command(context_settings=CONTEXT_SETTINGS)
def routers() -> None:
    """List the routing methods, what each does and its options (--router / --route NAME, --router-option).

    Example: elmreg routers
    """
    for name in router_names():
        method = router_class(name)
        click.echo(f"{name}: {method.summary}")
        for param in method.params:
            allowed = f" ({' | '.join(param.choices)})" if param.choices else ""
            click.echo(f"    {param.name}={param.default}{allowed}  {param.help}")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--input",
    "input_file",
    type=click.Path(dir_okay=False),
    help="JSON lines to answer (see 'elmreg route -h').",
)
@click.option("--dataset", help="Answer instances of a dataset split instead.")
@click.option("--split", default="validation", show_default=True, help="Split of --dataset.")
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    help="Answer at most this many instances of --dataset (seeded sample).",
)
@click.option("--task", help="Registered task: renders raw rows with its template; picks its backbone.")
@click.option("--expert", help="Use this expert (id or name).")
@click.option(
    "--route",
    type=click.Choice(router_names()),
    help="Let a router choose the expert: roe (the paper's), ..., per-instance (one expert per instance).",
)
@router_option("An option of the --route router, e.g. top_k=8 (repeatable).")
@q_option("Instances the router uses to choose.")
@click.option(
    "--compose",
    type=click.IntRange(min=1),
    metavar="K",
    help="Merge RoE's K most voted experts (cached) and answer with the merged expert.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Write JSON lines here (default: standard output)."
)
@engine_options
@click.pass_context
def predict(
    ctx: click.Context,
    input_file,
    dataset,
    split,
    limit,
    task,
    expert,
    route,
    router_options,
    q,
    compose,
    out,
    engine,
    vllm_url,
) -> None:
    """Answer instances with an expert (or the base backbone when neither --expert nor --route is given).

    Instances with answer choices are rank-classified (highest log-likelihood), the others get greedy
    generations. Output: one JSON object per line with input, prediction, expert and decision_id.

    
    Examples:
      elmreg predict --input questions.jsonl --route roe --out answers.jsonl
      elmreg predict --dataset bigbench:strategyqa --limit 20 --expert strategyqa
      elmreg predict --input mixed.jsonl --compose 2
      elmreg predict --dataset bigbench:strategyqa --limit 20 --expert strategyqa --engine vllm
    """
    import json

    from elmreg.registry.outputs import check_writable_file

    if out:
        # Before routing: a decision recorded for answers that cannot be written would be a lie in the audit.
        check_writable_file(out)
    registry = _registry(ctx)
    use_engine(registry, engine, vllm_url)
    instances = load_instances(registry, input_file, dataset, split, task, limit)
    rows = registry.predict(
        instances,
        expert=expert,
        route=route,
        task=task,
        q=q,
        compose=compose,
        router_options=parse_router_options(router_options),
    )
    lines = "\n".join(json.dumps(r) for r in rows) + "\n"
    if out:
        try:
            Path(out).write_text(lines, encoding="utf-8")
        except OSError as exc:  # the disk filled up while predicting
            raise click.ClickException(f"cannot write {out}: {exc.strerror}") from exc
        click.echo(f"wrote {len(rows)} predictions to {out}", err=True)
    else:
        click.echo(lines, nl=False)


@click.command("eval", context_settings=CONTEXT_SETTINGS)
@click.option("--task", help="Registered task to evaluate on (results stored in the evaluations table).")
@click.option(
    "--dataset",
    help="Or data that is not a registered task (an unseen task): evaluated, never registered or queued.",
)
@task_spec_options(
    scope="With --dataset: ",
    name_help="With --dataset: the name shown and recorded as 'eval:NAME' in routing decisions.",
    backbone_help="With --dataset: backbone whose experts answer (default: ELMREG_BACKBONE).",
)
@click.option(
    "--route",
    "routes",
    multiple=True,
    default=["roe"],
    show_default=True,
    help=f"base, oracle, expert:<id or name>, or a router: {', '.join(router_names())} (repeatable).",
)
@router_option("An option of the router routes, e.g. top_k=8 (repeatable; each router route must accept it).")
@click.option("--split", default="validation", show_default=True, help="Labelled split to evaluate on.")
@click.option(
    "--limit", type=click.IntRange(min=1), help="Evaluate on at most this many examples (seeded sample)."
)
@q_option("Instances a router uses to choose.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@engine_options
@click.pass_context
def evaluate(
    ctx: click.Context,
    task,
    dataset,
    routes,
    router_options,
    split,
    limit,
    q,
    as_json,
    engine,
    vllm_url,
    **spec,
) -> None:
    """Evaluate routes on a task's labelled data (accuracy, or ROUGE-L for generation); results on registered
    tasks are stored in the evaluations table, results on --dataset only printed.

    \b
    Examples:
      elmreg eval --task strategyqa --route roe --route base --route oracle --limit 100
      elmreg eval --dataset bigbench:causal_judgment --route roe --route centroid --route oracle --limit 100
      elmreg eval --task strategyqa --route roe-knn --router-option top_k=16
    """
    if bool(task) == bool(dataset):
        raise click.UsageError("give exactly one of --task NAME or --dataset SPEC")
    given = ["--" + field.replace("_", "-") for field in TASK_SPEC_FIELDS if spec[field] is not None]
    if task and given:
        raise click.UsageError(f"{', '.join(given)} go with --dataset, not --task")
    registry = _registry(ctx)
    use_engine(registry, engine, vllm_url)
    options = parse_router_options(router_options)
    with evaluation_progress(is_quiet(ctx)) as reporter:
        if task:
            results = [
                registry.evaluate(
                    task, route, split=split, limit=limit, q=q, reporter=reporter, router_options=options
                )
                for route in routes
            ]
        else:
            plan = registry.plan_task(dataset, to_register=False, split=split, **spec)
            results = [
                registry.evaluate_dataset(
                    plan, route, split=split, limit=limit, q=q, reporter=reporter, router_options=options
                )
                for route in routes
            ]
    if as_json:
        return echo_json(results)
    echo_table(
        ["task", "route", "expert", "metric", "score", "n"],
        [(r.task, r.route, _chosen(r), r.metric, f"{r.score:.2f}", r.n_examples) for r in results],
    )
    if dataset:
        click.echo(
            "(not a registered task: results printed, not stored; routing decisions are in the audit views)"
        )


def _chosen(result) -> str:
    """The expert that answered, or for per-instance routing how many answered."""
    if result.expert:
        return result.expert
    experts = result.details.get("experts")
    return f"{len(experts)} experts" if experts else "-"


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--since", type=click.DateTime(), help="Experts ready since then (default: since the last run)."
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="Examples per task (seeded sample).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    help="Report folder (default HOME/reports/benchmark-N).",
)
@click.pass_context
def benchmark(ctx: click.Context, since, limit, out_dir) -> None:
    """Benchmark newly added experts on every registered task (validation split) next to RoE, oracle and base,
    store the expert x task matrix, and write report.md with a heatmap. The scheduler queues this nightly.

    Example: elmreg benchmark --limit 40
    """
    with evaluation_progress(is_quiet(ctx)) as reporter:
        report = _registry(ctx).benchmark(since=since, limit=limit, out_dir=out_dir, reporter=reporter)
    if report.run_id is None:
        click.echo(
            f"no expert became ready since {report.since:%Y-%m-%d %H:%M}: nothing to benchmark "
            "(--since DATE benchmarks the experts added since then)"
            if report.since
            else "no ready expert to benchmark: train one first (elmreg worker --once)"
        )
        return
    echo_table(
        ["task", "RoE", "RoE expert", "oracle", "base"],
        [
            (t, f"{r['roe']:.1f}", r["roe_expert"], f"{r['oracle']:.1f}", f"{r['base']:.1f}")
            for t, r in report.routes.items()
        ],
    )
    reused = f", {report.reused_scores} oracle score(s) from earlier runs" if report.reused_scores else ""
    click.echo(
        f"\nbenchmark run {report.run_id}: {len(report.experts)} new expert(s){reused}; "
        f"report: {report.report_path}"
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="HTML file to write (default HOME/reports/report.html).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def report(ctx: click.Context, out, as_json) -> None:
    """Write a self-contained HTML report: library growth, the latest benchmark's expert x task heatmap with
    RoE vs oracle vs base, routing decisions with vote margins, and training loss curves.

    Example: elmreg report --out report.html
    """
    from elmreg.reports.registry_report import (
        FIGURES,  # the report module reaches the catalogue: loaded only here
    )

    written = _registry(ctx).report(out)
    if as_json:
        return echo_json(written)
    missing = [f for f in FIGURES if f not in written.figures]
    click.echo(f"report: {written.path}")
    if missing:
        click.echo(f"(no data yet for: {', '.join(missing)})")


@click.group(context_settings=CONTEXT_SETTINGS, invoke_without_command=True)
@click.option(
    "--view",
    type=click.Choice(list(AUDIT_VIEWS)),
    help="Print this view's rows (newest first) instead of the SQL.",
)
@click.option("--task", help="With --view: only rows of this task.")
@click.option(
    "--decision",
    "decision_id",
    type=click.IntRange(min=1),
    help="With --view decisions|votes: only this decision.",
)
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="With --view: rows.")
@click.option("--json", "as_json", is_flag=True, help="With --view: print JSON.")
@click.pass_context
def audit(ctx: click.Context, view, task, decision_id, limit, as_json) -> None:
    """Print ready-to-run SQL over the audit views, and how to connect (psql) and grant read-only access; or,
    with --view, the rows of one view.

    \b
    Examples:
      elmreg audit
      elmreg audit --view decisions --limit 5
      elmreg audit --view votes --decision 3 --json
      elmreg audit prune --before 2026-01-01
    """
    from elmreg.services import services_status

    if ctx.invoked_subcommand is not None:
        return
    if view is None:
        if task or decision_id is not None or as_json:
            raise click.UsageError("--task, --decision and --json go with --view")
        url = services_status(_registry(ctx).settings)[0].url.replace(
            "postgresql+psycopg://", "postgresql://", 1
        )
        click.echo(f"-- connect:  psql '{url}'")
        click.echo("-- read-only access for a person:  GRANT elmreg_auditor TO alice;\n")
        for title, sql in AUDIT_QUERIES.items():
            click.echo(f"-- {title}\n{sql}\n")
        return
    filters = {"task": task} if task else {}
    if decision_id is not None:
        filters["decision_id"] = decision_id
    rows = _registry(ctx).audit(view, limit=limit, **filters)
    if as_json:
        return echo_json(rows)
    # Sample texts are long; a table shows their start, --json the whole text.
    shown = [{k: _short(v) for k, v in row.items()} for row in rows]
    echo_table(list(rows[0]) if rows else [], [list(r.values()) for r in shown], empty="(no rows)")


@audit.command("prune")
@click.option(
    "--before",
    required=True,
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="Remove decisions made before this date (UTC), e.g. 2026-01-01.",
)
@click.option("--yes", is_flag=True, help="Delete; without it, only count what would go (a dry run).")
@click.pass_context
def audit_prune(ctx: click.Context, before, yes) -> None:
    """Remove routing decisions made before a date, with their votes. A dry run unless --yes.

    \b
    Examples:
      elmreg audit prune --before 2026-01-01
      elmreg audit prune --before 2026-01-01 --yes
    """
    import datetime as dt

    cutoff = before.replace(tzinfo=dt.UTC)
    decisions, votes = _registry(ctx).prune_decisions(cutoff, dry_run=not yes)
    verb = "removed" if yes else "would remove"
    click.echo(
        f"{verb} {decisions} decision(s) and {votes} vote(s) made before {cutoff:%Y-%m-%d %H:%M:%S} UTC"
    )
    if not yes and decisions:
        click.echo("run again with --yes to delete them")


@audit.command("replay")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Only count what would be written; write and remove nothing.")
@click.pass_context
def audit_replay(ctx: click.Context, files, dry_run) -> None:
    """Write the routing decisions 'elmreg serve' spilled while the catalogue was away (HOME/serve's
    unwritten-decisions-*.jsonl, or FILES) under their reserved ids; a file replayed twice adds nothing.

    A replayed file is removed. A file with a line that does not parse is kept and nothing of it is written:
    each such line is printed as FILE:LINE and the exit code is 2. 'elmreg serve' replays on start too.

    \b
    Examples:
      elmreg audit replay --dry-run
      elmreg audit replay
    """
    results = _registry(ctx).replay_decisions(list(files), dry_run=dry_run)
    if not results:
        click.echo("no spilled decisions to replay")
        return
    problems = []
    for result in results:
        if result.problems:
            problems += result.problems
            continue
        verb = "would write" if dry_run else "wrote"
        already = result.decisions - result.written
        click.echo(
            f"{result.path}: {verb} {result.written} of {result.decisions} decision(s) "
            f"({already} already in the catalogue)" + ("; removed the file" if result.removed else "")
        )
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UserFacingError(
            "; ".join(problems[:5])
            + more
            + " (kept, nothing of it written: mend or delete it, then replay again)"
        )


def _short(value, width: int = 60):
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value) if value is not None else ""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def register(cli: click.Group) -> None:
    for command in (route, routers, predict, evaluate, benchmark, report, audit):
        cli.add_command(command)
