"""Catalogue verbs: tasks, experts, jobs, training runs, and garbage collection of the bucket."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TYPE_CHECKING

import click

from elmreg.cli.output import echo_json, echo_record, echo_table
from elmreg.registry.tags import parse_tags

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _echo_described(record) -> None:
    """A task or expert as 'field value' lines, its Markdown description whole at the end."""
    echo_record(dataclasses.replace(record, description=None))
    if record.description:
        click.echo(f"\ndescription\n{record.description}")


def _tag_options(command):
    for option in reversed(
        [
            click.argument("tags", nargs=-1),
            click.option("--remove", multiple=True, help="A tag key to remove (repeatable)."),
            click.option("--description", help="Markdown description ('' clears it)."),
            click.option(
                "--description-file",
                type=click.File("r", encoding="utf-8"),
                help="Read the Markdown description from a file ('-': stdin).",
            ),
            json_option,
        ]
    ):
        command = option(command)
    return command


def _description(description: str | None, description_file) -> str | None:
    if description is not None and description_file is not None:
        raise click.UsageError("give --description or --description-file, not both")
    return description_file.read() if description_file is not None else description


# -- tasks -----------------------------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
def tasks() -> None:
    """Registered tasks (a dataset + prompt template; each gets an expert)."""


@tasks.command("list")
@json_option
@click.pass_context
def tasks_list(ctx: click.Context, as_json: bool) -> None:
    """List tasks with their expert's status.

    Example: elmreg tasks list --json
    """
    registry = _registry(ctx)
    rows = registry.tasks()
    if as_json:
        return echo_json(rows)
    status = {}
    for expert in registry.experts():
        if expert.task_id is not None:
            status[expert.task_id] = expert.status
    echo_table(
        ["id", "name", "dataset", "type", "kind", "K", "expert", "created"],
        [
            (
                t.id,
                t.name,
                t.dataset + (f"/{t.subset}" if t.subset else ""),
                t.task_type,
                t.expert_kind,
                t.max_examples,
                status.get(t.id, "queued"),
                _when(t.created_at),
            )
            for t in rows
        ],
        empty="no tasks yet: register one with 'elmreg add-task'",
    )


@tasks.command("show")
@click.argument("task")
@json_option
@click.pass_context
def tasks_show(ctx: click.Context, task: str, as_json: bool) -> None:
    """Show one task (by name or id), its templates and training runs.

    Example: elmreg tasks show strategyqa
    """
    registry = _registry(ctx)
    record = registry.task(task)
    runs = registry.training_runs(record.id)
    if as_json:
        return echo_json({"task": record, "training_runs": runs})
    _echo_described(record)
    aliases = registry.aliases(record.id)
    if aliases:
        click.echo("\naliases")
        echo_table(
            ["alias", "expert", "since"], [(a.ref, a.expert_name, _when(a.updated_at)) for a in aliases]
        )
    click.echo("\ntraining runs")
    echo_table(
        ["id", "worker", "status", "started", "finished", "error"],
        [
            (r.id, r.worker, r.status, _when(r.started_at), _when(r.finished_at), (r.error or "")[:60])
            for r in runs
        ],
    )


@tasks.command("tag")
@click.argument("task")
@_tag_options
@click.pass_context
def tasks_tag(ctx: click.Context, task: str, tags, remove, description, description_file, as_json) -> None:
    """Set tags KEY=VALUE on a task, remove some (--remove KEY), or set its Markdown description.

    Example: elmreg tasks tag strategyqa owner=nlp stage=beta --description 'Yes/no questions.'
    """
    record = _registry(ctx).tag_task(
        task, parse_tags(tags), remove=remove, description=_description(description, description_file)
    )
    if as_json:
        return echo_json(record)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(record.tags.items())) or "none"
    click.echo(f"task {record.name}: tags {shown}")


# -- experts ---------------------------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
def experts() -> None:
    """Trained experts: list, inspect, retire."""


@experts.command("list")
@click.option("--status", type=click.Choice(["pending", "training", "ready", "failed", "retired"]))
@click.option(
    "--filter",
    "filter_text",
    help="e.g. \"task = 'strategyqa' and tags.owner = 'nlp' and metrics.accuracy > 0.6\" "
    "(fields: name task kind status alias backbone description id library_version created_at ready_at "
    "retired_at tags.KEY metrics.KEY; and/or/not, = != < <= > >= like in, is [not] null).",
)
@click.option("--order-by", help="FIELD [asc|desc]: id (default), name, created_at, ..., metrics.KEY.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many experts.")
@json_option
@click.pass_context
def experts_list(
    ctx: click.Context,
    status: str | None,
    filter_text: str | None,
    order_by: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List experts with kind, status, the library version that added them and their aliases.

    \b
    Examples:
      elmreg experts list --status ready
      elmreg experts list --filter "tags.owner = 'nlp' and metrics.accuracy > 0.6" --order-by 'created_at desc' --limit 5 --json
    """
    if status is not None:
        # A click.Choice: the value is one of the statuses, safe to quote into the filter text.
        filter_text = f"status = '{status}'" + (f" and ({filter_text})" if filter_text else "")
    rows = _registry(ctx).search_experts(filter_text, order_by=order_by, limit=limit)
    if as_json:
        return echo_json(rows)
    echo_table(
        ["id", "name", "kind", "status", "version", "size", "ready", "aliases"],
        [
            (
                e.id,
                e.name,
                e.kind,
                e.status,
                e.library_version or "",
                f"{e.artifact.size / 1e6:.1f} MB" if e.artifact else "",
                _when(e.ready_at),
                " ".join(e.aliases),
            )
            for e in rows
        ],
        empty="no experts yet" if not filter_text else "no expert matches the filter",
    )


@experts.command("show")
@click.argument("expert")
@json_option
@click.pass_context
def experts_show(ctx: click.Context, expert: str, as_json: bool) -> None:
    """Show one expert (by name or id): artifact, config, training metrics, lineage.

    Example: elmreg experts show strategyqa
    """
    registry = _registry(ctx)
    record = registry.expert(expert)
    if as_json:
        return echo_json(record)
    _echo_described(record)
    if record.parents:
        click.echo(f"\nlineage: merged by {record.merge_method} from")
        parents = [registry.expert(parent_id) for parent_id, _ in record.parents]
        echo_table(
            ["position", "parent", "id", "kind", "weight", "status"],
            [
                (i, p.name, p.id, p.kind, f"{w:g}", p.status)
                for i, (p, (_, w)) in enumerate(zip(parents, record.parents, strict=True))
            ],
        )


@experts.command("retire")
@click.argument("expert")
@click.option("--force", is_flag=True, help="Remove the aliases that name the expert first (kept as moves).")
@click.pass_context
def experts_retire(ctx: click.Context, expert: str, force: bool) -> None:
    """Take an expert out of routing. It keeps its weights, entries and audit history.

    Routing pinned to an earlier library version still sees it. An aliased expert is retired only with
    --force. Example: elmreg experts retire 12
    """
    record = _registry(ctx).retire(expert, force=force)
    click.echo(f"retired {record.name} at library version {record.retired_at_version}")


@experts.command("export")
@click.argument("expert")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.pass_context
def experts_export(ctx: click.Context, expert: str, out_dir: str) -> None:
    """Write an expert to a folder: PEFT format for LoRA (PeftModel.from_pretrained loads it), safetensors
    for the other kinds, plus an elmreg_expert.json card.

    Example: elmreg experts export strategyqa --out exported/strategyqa
    """
    folder = _registry(ctx).export_expert(expert, out_dir)
    click.echo(f"wrote {folder}")


@experts.command("import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--task", required=True, help="Registered task the adapter is an expert for.")
@click.option("--name", help="Expert name (default: <task>-imported).")
@click.pass_context
def experts_import(ctx: click.Context, folder: str, task: str, name: str | None) -> None:
    """Register an existing PEFT LoRA adapter folder as an expert of TASK (checked against its backbone).

    Example: elmreg experts import ./my-lora --task strategyqa
    """
    record = _registry(ctx).import_expert(folder, task=task, name=name)
    click.echo(f"imported {record.name} (id {record.id}) at library version {record.library_version}")


@experts.command("tag")
@click.argument("expert")
@_tag_options
@click.pass_context
def experts_tag(
    ctx: click.Context, expert: str, tags, remove, description, description_file, as_json
) -> None:
    """Set tags KEY=VALUE on an expert (by name, id or task@alias), remove some, or set its description.

    Example: elmreg experts tag strategyqa@prod owner=nlp --remove stage
    """
    record = _registry(ctx).tag_expert(
        expert, parse_tags(tags), remove=remove, description=_description(description, description_file)
    )
    if as_json:
        return echo_json(record)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(record.tags.items())) or "none"
    click.echo(f"expert {record.name}: tags {shown}")


@experts.group("alias", context_settings=CONTEXT_SETTINGS)
def experts_alias() -> None:
    """Aliases: a name for one expert of a task (TASK@ALIAS) that moves, with every move kept."""


@experts_alias.command("set")
@click.argument("task")
@click.argument("alias")
@click.argument("expert")
@click.pass_context
def experts_alias_set(ctx: click.Context, task: str, alias: str, expert: str) -> None:
    """Point TASK@ALIAS at EXPERT (an expert of TASK), creating the alias or moving it atomically.

    Example: elmreg experts alias set strategyqa prod strategyqa-v2
    """
    move = _registry(ctx).set_alias(task, alias, expert)
    if move is None:
        click.echo(f"{task}@{alias} already names {expert}")
    elif move.from_expert is None:
        click.echo(f"{move.task}@{move.alias} -> {move.to_expert}")
    else:
        click.echo(f"{move.task}@{move.alias} moved from {move.from_expert} to {move.to_expert}")


@experts_alias.command("unset")
@click.argument("task")
@click.argument("alias")
@click.pass_context
def experts_alias_unset(ctx: click.Context, task: str, alias: str) -> None:
    """Remove TASK@ALIAS (the removal is kept in its history).

    Example: elmreg experts alias unset strategyqa prod
    """
    move = _registry(ctx).unset_alias(task, alias)
    click.echo(f"removed {move.task}@{move.alias} (was {move.from_expert})")


@experts_alias.command("list")
@click.argument("task", required=False)
@click.option(
    "--history", is_flag=True, help="Every move (who, when, from, to) instead of where they are now."
)
@json_option
@click.pass_context
def experts_alias_list(ctx: click.Context, task: str | None, history: bool, as_json: bool) -> None:
    """List aliases (of TASK, or all) and the experts they name, or with --history every move.

    Example: elmreg experts alias list strategyqa --history
    """
    registry = _registry(ctx)
    if history:
        moves = registry.alias_history(task)
        if as_json:
            return echo_json(moves)
        return echo_table(
            ["when", "alias", "from", "to", "by"],
            [
                (_when(m.moved_at), f"{m.task}@{m.alias}", m.from_expert or "", m.to_expert or "", m.moved_by)
                for m in moves
            ],
            empty="no alias has moved yet",
        )
    aliases = registry.aliases(task)
    if as_json:
        return echo_json([{**dataclasses.asdict(a), "ref": a.ref} for a in aliases])
    echo_table(
        ["alias", "expert", "id", "since"],
        [(a.ref, a.expert_name, a.expert_id, _when(a.updated_at)) for a in aliases],
        empty="no aliases yet: set one with 'elmreg experts alias set TASK ALIAS EXPERT'",
    )


# -- jobs ------------------------------------------------------------------------------------------------------
@click.group(context_settings=CONTEXT_SETTINGS)
def jobs() -> None:
    """The work queue that workers drain."""


@jobs.command("list")
@click.option("--status", type=click.Choice(["queued", "running", "succeeded", "failed", "cancelled"]))
@json_option
@click.pass_context
def jobs_list(ctx: click.Context, status: str | None, as_json: bool) -> None:
    """List jobs with attempts, lease holder and last error.

    Example: elmreg jobs list --status failed
    """
    rows = _registry(ctx).jobs(status=status)
    if as_json:
        return echo_json(rows)
    echo_table(
        ["id", "kind", "payload", "status", "attempts", "worker", "created", "error"],
        [
            (
                j.id,
                j.kind,
                j.payload,
                j.status,
                f"{j.attempts}/{j.max_attempts}",
                j.lease_owner or "",
                _when(j.created_at),
                (j.last_error or "").strip().splitlines()[-1][:60] if j.last_error else "",
            )
            for j in rows
        ],
        empty="no jobs",
    )


# -- gc --------------------------------------------------------------------------------------------------------
@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--delete", is_flag=True, help="Delete the objects (default: only list them).")
@click.option(
    "--min-age-hours",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Leave younger objects alone: an upload may be about to be published.",
)
@json_option
@click.pass_context
def gc(ctx: click.Context, delete: bool, min_age_hours: float, as_json: bool) -> None:
    """List (dry run) or delete bucket objects that no expert references, and abort multipart uploads that were
    never completed (an uploader killed mid-way leaves their parts behind).

    Example: elmreg gc            then: elmreg gc --delete
    """
    report = _registry(ctx).gc(delete=delete, min_age=dt.timedelta(hours=min_age_hours))
    if as_json:
        return echo_json(report)
    deleted = set(report.deleted)
    for obj in report.unreferenced:
        # An object published or reused while GC ran is kept: GC checks again under the publishers' lock.
        state = "deleted" if obj.uri in deleted else "kept (in use now)" if delete else "unreferenced"
        click.echo(f"{state}  {obj.uri}  {obj.size} bytes")
    for upload in report.incomplete_uploads:
        state = "aborted" if delete else "incomplete upload"
        click.echo(
            f"{state}  {upload.uri}  started {upload.initiated:%Y-%m-%d %H:%M}  (upload {upload.upload_id})"
        )
    click.echo(
        f"{len(report.unreferenced)} unreferenced object(s), {report.reclaimable_bytes} bytes"
        + (f", {len(report.deleted)} deleted" if delete else " (dry run: add --delete to remove them)")
        + (
            f"; {len(report.too_young)} younger than {min_age_hours:g} h left alone"
            if report.too_young
            else ""
        )
    )
    if report.incomplete_uploads or report.young_uploads:
        click.echo(
            f"{len(report.incomplete_uploads)} incomplete multipart upload(s)"
            + (f", {len(report.aborted)} aborted" if delete else "")
            + (
                f"; {len(report.young_uploads)} started less than {min_age_hours:g} h ago left alone"
                if report.young_uploads
                else ""
            )
        )
