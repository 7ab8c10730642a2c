"""``elmreg``: the command line. Commands are thin: they parse, call the library, and print."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from elmreg.cli import backup, catalogue, demo, experiment, inference, library, merge, serve
from elmreg.cli.errors import ElmregGroup

if TYPE_CHECKING:
    from elmreg.api import Registry

# The registry's modules (settings and pydantic, SQLAlchemy, Alembic, the service launchers) are imported inside
# the commands that use them, so that `elmreg --help` answers at once.

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


def _print_json(value) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(cls=ElmregGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(package_name="elmreg", prog_name="elmreg")
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    help="elmreg home directory (default: $ELMREG_HOME or ~/.elmreg).",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    help="Torch device for training and inference (default: ELMREG_DEVICE, auto).",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option(
    "--quiet", "-q", is_flag=True, help="No progress bars or stage lines (for cron); results still print."
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, device: str | None, debug: bool, quiet: bool) -> None:
    """elmreg: a registry of expert language models, chosen per task by Retrieval-of-Experts in SQL.

    \b
    Start here:
      elmreg services up      start the embedded PostgreSQL + S3 (or use ELMREG_DATABASE_URL / ELMREG_S3_ENDPOINT_URL)
      elmreg db upgrade       create or migrate the catalogue schema
      elmreg status           services, URLs, schema revision and catalogue counts
    """
    from elmreg.api import Registry
    from elmreg.registry.settings import load_settings

    settings = load_settings(home=home, device=device)
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.WARNING))
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["quiet"] = quiet
    ctx.obj["registry"] = Registry(settings)
    ctx.call_on_close(ctx.obj["registry"].close)


# -- services ------------------------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT_SETTINGS)
def services() -> None:
    """Start, stop and inspect the embedded PostgreSQL+pgvector and S3 servers.

    Configured servers (ELMREG_DATABASE_URL, ELMREG_S3_ENDPOINT_URL) are never started or stopped by elmreg.
    """


def _echo_services(rows) -> None:
    for row in rows:
        where = "embedded" if row.embedded else "configured"
        state = "running" if row.running else "stopped"
        click.echo(f"{row.name:<9} {where:<10} {state:<8} {row.url}  {row.detail}".rstrip())


@services.command("up")
@click.pass_context
def services_up_command(ctx: click.Context) -> None:
    """Start the embedded servers (a no-op for those already running).

    Example: elmreg services up
    """
    from elmreg.services import services_up

    _echo_services(services_up(_registry(ctx).settings))


@services.command("down")
@click.pass_context
def services_down_command(ctx: click.Context) -> None:
    """Stop the embedded servers. Data stays in the elmreg home directory.

    Example: elmreg services down
    """
    from elmreg.services import services_down

    stopped = services_down(_registry(ctx).settings)
    click.echo("stopped: " + ", ".join(stopped) if stopped else "nothing was running")


@services.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def services_status_command(ctx: click.Context, as_json: bool) -> None:
    """Show whether each server runs and where, without starting anything.

    Example: elmreg services status --json
    """
    from elmreg.services import services_status

    rows = services_status(_registry(ctx).settings)
    if as_json:
        _print_json([asdict(r) for r in rows])
    else:
        _echo_services(rows)


# -- database ------------------------------------------------------------------------------------------------
@cli.group(context_settings=CONTEXT_SETTINGS)
def db() -> None:
    """Create and migrate the catalogue schema (Alembic revisions shipped with elmreg)."""


@db.command("upgrade")
@click.argument("revision", default="head")
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the catalogue up to REVISION (default: head).

    Example: elmreg db upgrade
    """
    registry = _registry(ctx)
    before = registry.schema_revision()
    registry.upgrade_schema(revision)
    after = registry.schema_revision()
    click.echo(f"catalogue schema: {before or 'empty'} -> {after}")
    note = registry.check_pgvector(update=True)
    if note:
        click.echo(f"warning: {note}", err=True)


@db.command("downgrade")
@click.argument("revision")
@click.option(
    "--yes", is_flag=True, help="Confirm; downgrading to 'base' drops every elmreg table and its data."
)
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str, yes: bool) -> None:
    """Migrate the catalogue down to REVISION ('base' removes the schema).

    Example: elmreg db downgrade base --yes
    """
    if not yes:
        raise click.UsageError("downgrading can drop data: add --yes to confirm")
    registry = _registry(ctx)
    registry.downgrade_schema(revision)
    after = registry.schema_revision()
    click.echo(f"catalogue schema: {after or 'empty'}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the catalogue's schema revision and the newest one this elmreg ships.

    Example: elmreg db current
    """
    registry = _registry(ctx)
    current = registry.schema_revision()
    head = registry.head_schema_revision()
    note = "up to date" if current == head else "run 'elmreg db upgrade'"
    click.echo(f"{current or 'empty'} (head {head}: {note})")


# -- status --------------------------------------------------------------------------------------------------
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Services and their URLs, schema revision, library version and the row count of every table.

    Starts the embedded servers if they are down. Example: elmreg status
    """
    from elmreg.services import services_status

    registry = _registry(ctx)
    endpoints = registry.endpoints()
    rows = services_status(registry.settings)
    summary = registry.status()
    if as_json:
        _print_json(
            {
                "services": [asdict(r) for r in rows],
                "database_url": rows[0].url,
                "s3_endpoint_url": endpoints.s3_endpoint_url,
                "s3_bucket": endpoints.s3_bucket,
                "catalogue": asdict(summary),
            }
        )
        return
    click.echo("services")
    _echo_services(rows)
    click.echo(
        f"\ns3 bucket      {endpoints.s3_bucket}{('/' + endpoints.s3_prefix) if endpoints.s3_prefix else ''}"
    )
    click.echo(f"psql           psql '{_psql_url(rows[0].url)}'")
    click.echo(
        f"PostgreSQL     {summary.server_version}, pgvector {summary.pgvector_version or 'not installed'}"
    )
    pgvector_note = registry.check_pgvector()
    if pgvector_note:
        click.echo(f"               {pgvector_note}")
    current = summary.schema_revision or "empty"
    note = "up to date" if summary.schema_revision == summary.head_revision else "run 'elmreg db upgrade'"
    click.echo(f"schema         {current} (head {summary.head_revision}: {note})")
    click.echo(f"library        version {summary.library_version}")
    if summary.row_counts:
        click.echo("\ncatalogue rows")
        for table, count in summary.row_counts.items():
            click.echo(f"  {table:<20} {count}")


def _psql_url(url: str) -> str:
    """The libpq form of a SQLAlchemy URL, which psql accepts."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@cli.command("config")
def config_command() -> None:
    """List every ELMREG_* setting with its default and meaning.

    Example: elmreg config
    """
    from elmreg.registry.settings import setting_docs

    docs = setting_docs()
    width = max(len(name) for name, _, _ in docs)
    for name, default, help_text in docs:
        click.echo(f"{name:<{width}} {default or '(empty)':<40} {help_text}")


for command in (catalogue.tasks, catalogue.experts, catalogue.jobs, catalogue.gc):
    cli.add_command(command)
library.register(cli)
inference.register(cli)
cli.add_command(demo.demo)
cli.add_command(merge.merge)
cli.add_command(experiment.experiment)
cli.add_command(serve.serve)
for command in (backup.backup, backup.restore):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="elmreg")
