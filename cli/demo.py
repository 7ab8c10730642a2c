"""``elmreg demo`` (what ``make demo`` runs): the seed paper's idea, end to end, on the embedded defaults.

Stages: services and schema, register BIG-bench tasks, train their experts, route a seen and an unseen task in
SQL, evaluate RoE against the base backbone, merge two experts and score the merge next to its parents, benchmark
every new expert (the merge included) on every task, print audit SQL, write the HTML report. Every stage is
resumable: tasks already registered are not registered again, trained experts and the merged expert are reused,
and the benchmark skips a library with nothing new, so a second run costs routing, evaluation and the report.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from elmreg.cli.output import echo_table
from elmreg.cli.progress import evaluation_progress, is_quiet, training_progress
from elmreg.registry.errors import UserError

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

# Six BIG-bench multiple-choice tasks of clearly different skills, each small enough to train on 2 CPU cores in
# well under a minute at K=64, and a seventh, held out, that the library has never seen.
DEMO_TASKS = (
    "bigbench:strategyqa",
    "bigbench:sports_understanding",
    "bigbench:hyperbaton",
    "bigbench:navigate",
    "bigbench:date_understanding",
    "bigbench:logical_fallacy_detection",
)
DEMO_UNSEEN = "bigbench:causal_judgment"


@dataclass
class DemoPlan:
    tasks: tuple[str, ...] = DEMO_TASKS
    unseen: str | None = DEMO_UNSEEN
    max_examples: int = 64
    # K=64 x 5 epochs with prompts cut to 128 tokens: ~30 s per LoRA expert on gemma-3-270m, 2 CPU cores.
    training: dict[str, Any] = field(default_factory=lambda: {"epochs": 5, "max_source_length": 128})
    backbone: str | None = None
    q: int = 32
    eval_limit: int = 40
    benchmark_limit: int = 20
    report: Path | None = None


@dataclass
class DemoOutcome:
    seen_choice: str | None = None
    unseen_choice: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # route -> score on the seen task
    merged: str | None = None
    # (task, expert name) -> score, for the merged expert and its parents on the parents' tasks
    merge_scores: dict[tuple[str, str], float] = field(default_factory=dict)
    report: Path | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)


class _Stages:
    def __init__(self, total: int):
        self.total, self.number = total, 0
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.number += 1
        click.secho(f"\n[{self.number}/{self.total}] {title}", bold=True)
        started = time.perf_counter()
        yield
        self.seconds[title] = round(time.perf_counter() - started, 1)
        click.secho(f"    ({self.seconds[title]:.1f} s)", dim=True)


def run_demo(registry: Registry, plan: DemoPlan, *, quiet: bool = False) -> DemoOutcome:
    """Run the demo's stages against ``registry``; returns what a test (or a curious user) wants to check."""
    from elmreg.runtime.tasks import TaskRequest, default_task_name
    from elmreg.services import services_up

    outcome = DemoOutcome()
    stages = _Stages(total=9 if len(plan.tasks) >= 2 else 8)
    settings = registry.settings

    with stages.stage("Services and catalogue schema"):
        for service in services_up(settings):
            click.echo(f"    {service.name:<9} {service.url}")
        registry.upgrade_schema()
        click.echo(f"    schema at revision {registry.schema_revision()}")

    names = [default_task_name(TaskRequest(dataset=d)) for d in plan.tasks]
    with stages.stage(f"Register {len(plan.tasks)} tasks (one expert each, K={plan.max_examples})"):
        registered = {t.name for t in registry.tasks()}
        for dataset, name in zip(plan.tasks, names, strict=True):
            if name in registered:
                click.echo(f"    {name}: already registered")
                continue
            task = registry.add_task(
                dataset,
                name=name,
                max_examples=plan.max_examples,
                backbone=plan.backbone,
                training=dict(plan.training),
            )
            click.echo(
                f"    {task.name}: registered ({task.task_type}, metric {task.metric}), training queued"
            )

    with stages.stage("Train the queued experts on the backbone"):
        with training_progress(quiet) as reporter:
            finished = registry.train(reporter=reporter)
        failed = [job for job in finished if job.status != "succeeded"]
        ready = {e.task_id for e in registry.experts(status="ready")}
        missing = [n for n in names if registry.task(n).id not in ready]
        click.echo(f"    {len(finished)} trained now, {len(names) - len(missing) - len(finished)} reused")
        if failed or missing:
            errors = "; ".join(f"job {j.id}: {j.last_error}" for j in failed)
            raise UserError(f"training did not finish for {', '.join(missing) or 'some task'}: {errors}")

    seen = plan.tasks[0]
    seen_name = names[0]
    with stages.stage(f"Route Q={plan.q} instances in SQL: a seen task, then an unseen one"):
        routed = [(seen, seen_name)] + ([(plan.unseen, None)] if plan.unseen else [])
        for dataset, task in routed:
            instances = registry.instances(dataset, split="validation", limit=plan.q)
            # A held-out split smaller than Q routes on what there is.
            q = min(plan.q, len(instances))
            decision = registry.route(instances, task=task, q=q, caller_label=f"demo:{dataset}")
            where = "seen" if task else "not in the library"
            click.echo(
                f"    {dataset} ({where}) -> {decision.chosen_expert_name}  "
                f"({decision.tallies[0].votes}/{decision.q} votes, margin {decision.margin}, "
                f"{decision.latency_ms:.0f} ms, decision {decision.decision_id})"
            )
            for tally in decision.tallies[:3]:
                click.echo(f"        {tally.expert_name:<28} {tally.votes:>3} votes")
            if task:
                outcome.seen_choice = decision.chosen_expert_name
            else:
                outcome.unseen_choice = decision.chosen_expert_name

    with stages.stage(f"Evaluate RoE against the base backbone on {seen_name} ({plan.eval_limit} examples)"):
        with evaluation_progress(quiet) as reporter:
            for route in ("roe", "base"):
                result = registry.evaluate(
                    seen_name, route, limit=plan.eval_limit, q=plan.q, reporter=reporter
                )
                outcome.scores[route] = result.score
        click.echo(
            f"    accuracy: RoE {outcome.scores['roe']:.1f}  base {outcome.scores['base']:.1f}"
            f"  (stored in the evaluations table)"
        )

    if len(names) >= 2:
        _merge_stage(registry, plan, names[:2], stages, outcome, quiet)

    with stages.stage(f"Benchmark new experts on every task ({plan.benchmark_limit} examples each)"):
        with evaluation_progress(quiet) as reporter:
            bench = registry.benchmark(limit=plan.benchmark_limit, reporter=reporter)
        if bench.run_id is None:
            click.echo(
                f"    no expert became ready since the last benchmark ({_since(bench)}): nothing to do"
            )
        else:
            echo_table(
                ["task", "RoE", "RoE expert", "oracle", "base"],
                [
                    (t, f"{r['roe']:.1f}", r["roe_expert"], f"{r['oracle']:.1f}", f"{r['base']:.1f}")
                    for t, r in bench.routes.items()
                ],
            )

    with stages.stage("Audit the decisions with plain SQL"):
        from elmreg.services import services_status

        url = services_status(settings)[0].url.replace("postgresql+psycopg://", "postgresql://", 1)
        click.echo(f"    psql '{url}' -c 'SELECT * FROM audit_decisions ORDER BY decision_id DESC LIMIT 5;'")
        click.echo("    (elmreg audit prints more ready-to-run queries)")

    with stages.stage("Write the HTML report"):
        report = registry.report(plan.report)
        outcome.report = report.path
        click.echo(f"    figures: {', '.join(report.figures)}")

    outcome.stage_seconds = stages.seconds
    total = sum(stages.seconds.values())
    click.secho(f"\nDone in {total / 60:.1f} min. Report: {outcome.report}", bold=True)
    return outcome


def _since(bench) -> str:
    return f"{bench.since:%Y-%m-%d %H:%M}" if bench.since else "ever"


def _merge_stage(registry, plan: DemoPlan, parents: list[str], stages: _Stages, outcome: DemoOutcome, quiet):
    """Merge the first two experts by task arithmetic (λ = 1/2 each) and score it next to them on their tasks."""
    with stages.stage(f"Merge {' + '.join(parents)} (task arithmetic) and score it on both tasks"):
        # library="none": the merge is compared here, not offered to RoE, so routing in a rerun stays the same.
        merged = registry.merge(parents, library="none")
        outcome.merged = merged.expert.name
        click.echo(
            f"    {merged.expert.name}: expert {merged.expert.id}, "
            + ("reused" if merged.reused else f"merged in {merged.merge_seconds:.1f} s")
        )
        with evaluation_progress(quiet) as reporter:
            for task in parents:
                for expert in (registry.expert(task), merged.expert):
                    result = registry.evaluate(
                        task, f"expert:{expert.id}", limit=plan.benchmark_limit, reporter=reporter
                    )
                    outcome.merge_scores[(task, expert.name)] = result.score
        echo_table(
            ["task", "own expert", "merged"],
            [
                (
                    task,
                    f"{outcome.merge_scores[(task, task)]:.1f}",
                    f"{outcome.merge_scores[(task, merged.expert.name)]:.1f}",
                )
                for task in parents
            ],
        )
        click.echo(f"    lineage: SELECT * FROM expert_parents WHERE expert_id = {merged.expert.id};")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option(
    "--task",
    "tasks",
    multiple=True,
    help=f"Dataset to register (repeatable; default: {len(DEMO_TASKS)} BIG-bench tasks).",
)
@click.option(
    "--unseen", default=DEMO_UNSEEN, show_default=True, help="A dataset not in the library, to route."
)
@click.option(
    "--max-examples",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="K: training examples per task.",
)
@click.option(
    "--epochs", type=click.IntRange(min=1), default=5, show_default=True, help="Training epochs per expert."
)
@click.option("--backbone", help="Backbone to train on (default: ELMREG_BACKBONE, gemma-3-270m).")
@click.option(
    "--eval-limit",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Examples for RoE vs base.",
)
@click.option(
    "--benchmark-limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Examples per benchmark cell.",
)
@click.option("--report", type=click.Path(dir_okay=False), help="HTML report path (default HOME/reports).")
@click.pass_context
def demo(ctx, tasks, unseen, max_examples, epochs, backbone, eval_limit, benchmark_limit, report) -> None:
    """Show the whole idea on this machine: register BIG-bench tasks, train one expert each, route in SQL,
    evaluate RoE against the base backbone, merge two experts, benchmark, audit, report. Resumable: a second run
    reuses the experts.

    About 15 minutes on 2 CPU cores the first time (plus one-time downloads); `make demo` runs it.

    Example: elmreg demo --max-examples 32 --epochs 3
    """
    plan = DemoPlan(
        tasks=tuple(tasks) or DEMO_TASKS,
        unseen=unseen or None,
        max_examples=max_examples,
        training={"epochs": epochs, "max_source_length": 128},
        backbone=backbone,
        eval_limit=eval_limit,
        benchmark_limit=benchmark_limit,
        report=Path(report) if report else None,
    )
    run_demo(ctx.obj["registry"], plan, quiet=is_quiet(ctx))
