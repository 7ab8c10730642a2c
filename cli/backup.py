"""``elmreg backup`` and ``elmreg restore``: the catalogue and every object it references, in one folder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from elmreg.cli.output import echo_json

if TYPE_CHECKING:
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _registry(ctx: click.Context) -> Registry:
    return ctx.obj["registry"]


def _summary(verb: str, report) -> str:
    return (
        f"{verb} {report.folder}: catalogue at revision {report.schema_revision} "
        f"({report.catalogue_bytes} bytes), {report.objects} object(s), {report.object_bytes} bytes"
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(file_okay=False))
@json_option
@click.pass_context
def backup(ctx: click.Context, folder: str, as_json: bool) -> None:
    """Write a consistent snapshot of the catalogue (pg_dump) and every object it references (with sha256s in
    FOLDER/manifest.json) into FOLDER, which must not exist or be empty.

    Publishing waits while the catalogue is dumped, so the snapshot and the objects agree.

    Example: elmreg backup /backups/elmreg-2024-06-01
    """
    report = _registry(ctx).backup(folder)
    if as_json:
        return echo_json(report)
    click.echo(_summary("backed up to", report))


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("folder", type=click.Path(file_okay=False))
@json_option
@click.pass_context
def restore(ctx: click.Context, folder: str, as_json: bool) -> None:
    """Restore the backup in FOLDER into this home's catalogue and bucket prefix, which must be empty.

    Every file is checked against the manifest first: a damaged backup restores nothing. Then run
    'elmreg db upgrade' if the backup came from an older elmreg, and 'elmreg status' to compare.

    Example: ELMREG_HOME=/srv/elmreg-new elmreg restore /backups/elmreg-2024-06-01
    """
    report = _registry(ctx).restore(folder)
    if as_json:
        return echo_json(report)
    click.echo(_summary("restored from", report))
