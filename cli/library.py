"""Growing the library: add-task, worker, scheduler, manifest ingestion, re-embedding, BIG-bench listing."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import click

from elmreg.cli.options import task_spec_options
from elmreg.cli.output import echo_json, echo_table
from elmreg.cli.progress import is_quiet, training_progress
from elmreg.registry.kinds import trainable_kinds
from elmreg.registry.tags import parse_tags

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


@click.command("add-task", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--dataset",
    required=True,
    help="bigbench:<task>[/<subtask>], a local json/jsonl/csv/parquet file or folder, or a hub id.",
)
@click.option(
    "--split", default="train", show_default=True, help="Split to train on (BIG-bench: train/validation/all)."
)
@task_spec_options(
    name_help="Task name (default: derived from the dataset).",
    backbone_help="Backbone hub id or path (default: ELMREG_BACKBONE).",
)
@click.option(
    "--level",
    type=click.Choice(["prompt", "dataset"]),
    default="prompt",
    show_default=True,
    help="prompt: one Prompt Expert per template; dataset: one Dataset Expert over all templates.",
)
@click.option(
    "--max-examples",
    "-k",
    type=click.IntRange(min=1),
    help="K examples sampled for training (default 50,000 classification / 10,000 generative).",
)
@click.option("--kind", type=click.Choice(trainable_kinds()), default="lora", show_default=True)
@click.option(
    "--task-type", type=click.Choice(["classification", "generative"]), help="Override the inferred type."
)
@click.option(
    "--metric", type=click.Choice(["accuracy", "rouge_l", "bleu"]), help="Override the default metric."
)
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (default 5).")
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    help="Constant learning rate (default 1e-4).",
)
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size (default 8).")
@click.option("--seed", type=click.IntRange(min=0), help="Seed for sampling and training (default 0).")
@click.option("--tag", "tags", multiple=True, help="A tag KEY=VALUE (repeatable), e.g. --tag owner=nlp.")
@click.option("--description", help="Markdown that says what the task is for (shown by 'tasks show').")
@click.option(
    "--now", is_flag=True, help="Train the expert here and now, with a progress bar, instead of queueing it."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
@click.pass_context
def add_task_command(
    ctx: click.Context,
    dataset,
    split,
    level,
    max_examples,
    kind,
    task_type,
    metric,
    epochs,
    learning_rate,
    batch_size,
    seed,
    tags,
    description,
    now,
    quiet,
    as_json,
    **spec,
) -> None:
    """Register a task and queue the training of its expert (validated first: bad input writes nothing).

    \b
    Examples:
      elmreg add-task --dataset bigbench:strategyqa --max-examples 64
      elmreg add-task --dataset data/reviews.jsonl --prompt '{{text}} Positive? ||| {{answer_choices[label]}}' \\
                      --answer-choices 'no ||| yes' --name reviews --now
      elmreg add-task --dataset bigbench:strategyqa --tag owner=nlp --description 'Yes/no questions.'
    """
    training = {
        k: v
        for k, v in {
            "epochs": epochs,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "seed": seed,
        }.items()
        if v is not None
    }
    with training_progress(is_quiet(ctx, quiet) or not now) as reporter:
        task = _registry(ctx).add_task(
            dataset,
            now=now,
            reporter=reporter,
            split=split,
            level=level,
            max_examples=max_examples,
            kind=kind,
            task_type=task_type,
            metric=metric,
            training=training,
            tags=parse_tags(tags),
            description=description,
            **spec,
        )
    if as_json:
        return echo_json(task)
    state = "trained" if now else "queued for training (run 'elmreg worker' to train it)"
    click.echo(
        f"task {task.name} (id {task.id}): {task.task_type}, metric {task.metric}, K={task.max_examples}, "
        f"{task.expert_kind} expert {state}"
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--once", is_flag=True, help="Run at most one job, then exit.")
@click.option("--drain", is_flag=True, help="Run jobs until the queue is empty, then exit.")
@click.option(
    "--poll",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between queue checks when idle.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Lease seconds (renewed every third).",
)
@click.option("--name", help="Worker name in the catalogue (default host:pid).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def worker(
    ctx: click.Context, once: bool, drain: bool, poll: float, lease: float, name: str | None, quiet: bool
) -> None:
    """Train queued experts. Run several, on several machines, against the same catalogue and bucket.

    SIGTERM or Ctrl-C stops it gracefully: it claims nothing more, hands a job it is training back to the queue at
    the next training step (another worker takes it at once; the attempt does not count), and exits 0.

    Example: elmreg worker --once
    """
    with training_progress(is_quiet(ctx, quiet)) as reporter:
        runner = _registry(ctx).worker(reporter=reporter, name=name, lease_seconds=lease)
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, lambda *_: runner.stop())
        if once:
            jobs = [job] if (job := runner.run_once()) else []
        elif drain:
            jobs = runner.drain()
        else:
            click.echo(f"worker {runner.name} waiting for jobs (Ctrl-C or SIGTERM to stop)", err=True)
            runner.run_forever(poll_seconds=poll)
            click.echo(f"worker {runner.name} stopped", err=True)
            return
    if not jobs:
        click.echo("no queued jobs")
    for job in jobs:
        error = (
            f": {job.last_error.strip().splitlines()[-1]}"
            if job.last_error and job.status != "succeeded"
            else ""
        )
        click.echo(f"job {job.id} ({job.kind} {job.payload}) {job.status}{error}")


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--standby-poll",
    type=click.FloatRange(min=0.1, max=3600),
    default=15.0,
    show_default=True,
    help="Seconds a standby waits between tries to become the active scheduler.",
)
@click.pass_context
def scheduler(ctx: click.Context, standby_poll) -> None:
    """Run the scheduler: training for new tasks, nightly manifest ingestion, nightly benchmarks.

    Only one is active at a time (a PostgreSQL advisory lock); others wait as standbys and one takes over within
    --standby-poll seconds of the active one's end. SIGTERM or Ctrl-C stops it cleanly: a run in progress
    finishes, the lock is released, the exit code is 0. Example: elmreg scheduler
    """
    active = _registry(ctx).scheduler()
    stop = threading.Event()
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: stop.set())
    click.echo("scheduler starting (Ctrl-C or SIGTERM to stop)", err=True)
    active.run(stop=stop, standby_poll_seconds=standby_poll)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--dir", "folder", type=click.Path(file_okay=False), help="Manifest folder (default ELMREG_MANIFEST_DIR)."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def ingest(ctx: click.Context, folder: str | None, as_json: bool) -> None:
    """Register the tasks listed in manifest files (YAML lists of add-task options); known ones are skipped.

    The scheduler runs this nightly. Example: elmreg ingest --dir manifests/
    """
    report = _registry(ctx).ingest(folder)
    if as_json:
        return echo_json(report)
    click.echo(f"added {len(report.added)}, skipped {len(report.skipped)}, failed {len(report.failed)}")
    for where, error in report.failed:
        click.echo(f"  {where}: {error}")


@click.group(context_settings=CONTEXT_SETTINGS)
def library() -> None:
    """The Expert Library: embedded samples that routing searches."""


@library.command("reembed")
@click.option("--embedder", required=True, help="Sentence-transformers model (name or path) to embed with.")
@click.option("--from", "source", help="Embedder whose texts to re-embed (default: ELMREG_EMBEDDER).")
@click.pass_context
def library_reembed(ctx: click.Context, embedder: str, source: str | None) -> None:
    """Build library entries for another embedder, next to the existing ones (resumable).

    Example: elmreg library reembed --embedder /models/all-mpnet-base-v2
    """
    report = _registry(ctx).reembed(embedder, source=source)
    click.echo(
        f"{report.embedder}: {report.entries} entries for {report.experts} expert(s); {report.skipped} already done"
    )


@library.command("reindex")
@click.option("--embedder", help="Whose index to rebuild (default: ELMREG_EMBEDDER).")
@click.pass_context
def library_reindex(ctx: click.Context, embedder: str | None) -> None:
    """Rebuild the library's HNSW index with the current settings (ELMREG_LIBRARY_INDEX_TYPE, _HNSW_M,
    _HNSW_EF_CONSTRUCTION, _BUILD_MEMORY, _BUILD_WORKERS); they apply only to indexes built after they changed.

    Example: ELMREG_LIBRARY_HNSW_M=32 ELMREG_LIBRARY_HNSW_EF_CONSTRUCTION=128 elmreg library reindex
    """
    before, after, seconds = _registry(ctx).reindex(embedder)
    click.echo(
        f"rebuilt the index of {after.entries} entries in {seconds:.1f} s: {after.index_type}, "
        f"{before.index_bytes / 2**20:.1f} MiB -> {after.index_bytes / 2**20:.1f} MiB"
    )


@library.command("train-retriever")
@click.option("--name", help="Name of the new embedder (default: retriever-v<library version>-<UTC time>).")
@click.option("--epochs", type=int, default=2, show_default=True, help="Passes over the library's pairs.")
@click.option(
    "--batch-size",
    type=int,
    default=16,
    show_default=True,
    help="Pairs per step, at most one per expert (the other pairs are each pair's negatives).",
)
@click.option("--learning-rate", type=float, default=5e-5, show_default=True, help="AdamW learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds pairs, batches and dropout.")
@click.option(
    "--library-version", type=int, help="Train on the experts routable at this version (default: now)."
)
@click.option("--from", "source", help="Embedder to fine-tune, on its entries (default: ELMREG_EMBEDDER).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
@click.pass_context
def library_train_retriever(
    ctx: click.Context,
    name: str | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    library_version: int | None,
    source: str | None,
    quiet: bool,
) -> None:
    """Fine-tune the embedder on the library (samples labelled by expert), publish it as a new embedder and
    re-embed the library with it; then route with it: elmreg route --router trained.

    Example: elmreg library train-retriever --name retriever-1 --epochs 2
    """
    with training_progress(is_quiet(ctx, quiet)) as reporter:
        report = _registry(ctx).train_retriever(
            name=name,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            library_version=library_version,
            source=source,
            reporter=reporter,
        )
    click.echo(
        f"retriever {report.embedder} (embedder id {report.embedder_id}): {report.pairs} pairs of {report.experts} "
        f"experts at library version {report.library_version}, {report.epochs} epoch(s), {report.steps} steps, "
        f"final loss {report.final_loss:.4f}, {report.seconds:.1f} s; {report.entries} entries re-embedded. "
        "Route with it: elmreg route --router trained"
    )


@click.group(context_settings=CONTEXT_SETTINGS)
def bigbench() -> None:
    """BIG-bench tasks available as --dataset bigbench:<task>."""


@bigbench.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def bigbench_list(ctx: click.Context, as_json: bool) -> None:
    """List BIG-bench JSON tasks and their subtasks (downloads the task files once, 358 MB).

    Example: elmreg bigbench list
    """
    from elmreg.data.sources.bigbench import BigBenchTasks

    index = BigBenchTasks.from_cache(_registry(ctx).settings.cache_path).index()
    if as_json:
        return echo_json(index)
    echo_table(
        ["task", "subtasks"],
        [(task, ", ".join(s for s in subs if s)) for task, subs in sorted(index.items())],
    )


def register(cli: click.Group) -> None:
    for command in (add_task_command, worker, scheduler, ingest, library, bigbench):
        cli.add_command(command)
