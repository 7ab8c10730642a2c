"""``elmreg experiment``: reproduce the seed paper's claims on this registry (presets in benchmarks/paper/)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from elmreg.cli.output import echo_json, echo_table
from elmreg.cli.progress import is_quiet, training_progress

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


@click.group(context_settings=CONTEXT_SETTINGS)
def experiment() -> None:
    """Experiments that check the seed paper's claims (routing accuracy, experts vs multitask, continual
    learning, unseen tasks, retriever ablation) and write a Markdown + JSON results table.

    \b
    Example:
      elmreg experiment list
      elmreg experiment run cpu-small --out benchmarks/paper/results/cpu-small
    """


@experiment.command("list", context_settings=CONTEXT_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(as_json: bool) -> None:
    """List the presets (benchmarks/paper/*.yaml).

    Example: elmreg experiment list
    """
    from elmreg.experiments.config import PRESET_DIR, list_presets

    presets = list_presets()
    if as_json:
        echo_json(presets)
        return
    if not presets:
        click.echo(f"no presets found in {PRESET_DIR}")
        return
    echo_table(
        ["preset", "description"],
        [[name, text.splitlines()[0] if text else ""] for name, text in presets.items()],
    )


@experiment.command("run", context_settings=CONTEXT_SETTINGS)
@click.argument("preset")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for results.md and results.json (default: HOME/experiments/<preset>).",
)
@click.option(
    "--eval-limit", type=click.IntRange(min=1), help="Override the preset's validation examples per task."
)
@click.option("--q", type=click.IntRange(min=1), help="Override the preset's Q (instances routed per task).")
@click.option("--seed", type=click.IntRange(min=0), help="Override the preset's seed.")
@click.option(
    "--fresh",
    is_flag=True,
    help="Recompute every prediction instead of reusing earlier runs' (e.g. after changing elmreg's scoring).",
)
@click.pass_context
def run_command(
    ctx: click.Context,
    preset: str,
    out: Path | None,
    eval_limit: int | None,
    q: int | None,
    seed: int | None,
    fresh: bool,
) -> None:
    """Run PRESET (a name from 'elmreg experiment list') or CONFIG.yaml through the public API.

    Registers and trains the seen and new tasks (reusing those already registered with the same
    specification, and the predictions of earlier runs unless --fresh), trains the multitask baseline, and
    writes results.md and results.json. Exits with code 1
    if an old task's prediction changed after new experts joined the library.

    \b
    Example:
      elmreg experiment run cpu-small --out benchmarks/paper/results/cpu-small
      elmreg experiment run my-tasks.yaml --eval-limit 16
    """
    from elmreg.experiments.config import load_config
    from elmreg.experiments.harness import run_experiment
    from elmreg.services import services_up

    registry: Registry = ctx.find_root().obj["registry"]
    config = load_config(preset, eval_limit=eval_limit, q=q, seed=seed)
    services_up(registry.settings)
    registry.upgrade_schema()
    quiet = is_quiet(ctx)
    # The harness's own lines are indented and headed already: printed as they are, without bullets.
    with training_progress(quiet, bullets=False) as reporter:
        result = run_experiment(registry, config, out_dir=out, reporter=reporter, fresh=fresh)
    for path in result.files:
        click.echo(f"wrote {path}")
    if not result.passed:
        raise click.ClickException(f"continual-learning check failed: {result.check.summary()}")
