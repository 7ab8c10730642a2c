"""``elmreg merge``: a new expert from the weights of several experts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import click

from elmreg.cli.output import echo_json, echo_table
from elmreg.cli.progress import is_quiet, line_progress

if TYPE_CHECKING:
    # Only for annotations: the API's imports are loaded when the root command builds the Registry.
    from elmreg.api import Registry

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class _LazyChoice(click.Choice):
    """A ``click.Choice`` whose choices are read on first use: the merge methods live beside the merge code,
    which imports torch and PEFT, and building the command tree must not (``elmreg --help`` starts instantly).
    """

    def __init__(self, load: Callable[[], Sequence[str]]):
        self._load = load
        self._choices: tuple[str, ...] | None = None
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices


def _merge_methods() -> Sequence[str]:
    from elmreg.merging.methods import ALL_METHODS

    return ALL_METHODS


def _numbers(value: str | None, option: str) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        from elmreg.merging.methods import MergeError

        # A UserError, not click's BadParameter: one line and exit code 2, like every other refused merge.
        raise MergeError(f"{option}: expected numbers separated by commas, got '{value}'") from None


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("experts", nargs=-1, required=True)
@click.option("--weights", help="λ per expert, comma-separated, in the order given (default 1/N each).")
@click.option(
    "--method",
    type=_LazyChoice(_merge_methods),
    default="task_arithmetic",
    show_default=True,
    help="PEFT merge: task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune; LoRA also linear, cat, svd.",
)
@click.option(
    "--density",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Fraction kept by ties / dare / magnitude_prune (default 0.5).",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seeds DARE's random pruning."
)
@click.option("--name", help="Name of the merged expert (default: the parents' names joined by '+').")
@click.option(
    "--library",
    type=click.Choice(["union", "none"]),
    default="union",
    show_default=True,
    help="Library entries: the parents' samples (union) or none (RoE never picks it; use it by name).",
)
@click.option("--tune-on", help="TASK[,TASK]: choose the weights by grid search on their validation data.")
@click.option("--grid", help="Weights tried per expert with --tune-on (default 0.25,0.5,0.75,1).")
@click.option(
    "--tune-limit",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Validation examples per task when tuning.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def merge(
    ctx: click.Context,
    experts,
    weights,
    method,
    density,
    seed,
    name,
    library,
    tune_on,
    grid,
    tune_limit,
    as_json,
) -> None:
    """Merge EXPERT... (ids or names; all lora, all ffn_adapter or all full, on one backbone) into a new expert
    of kind 'merged': θ = θ_pre + Σ λ_i τ_i for task arithmetic. Its lineage, method and parameters are
    recorded in the catalogue; the same merge asked for again returns the existing expert.

    \b
    Examples:
      elmreg merge colours moods
      elmreg merge colours moods --weights 0.7,0.3 --name colours-moods
      elmreg merge colours moods --method ties --density 0.3
      elmreg merge colours moods --tune-on colours,moods --grid 0.25,0.5,0.75,1
    """
    registry: Registry = ctx.obj["registry"]
    quiet = is_quiet(ctx) or as_json
    with line_progress(quiet) as reporter:
        result = registry.merge(
            list(experts),
            weights=_numbers(weights, "--weights"),
            method=method,
            density=density,
            seed=seed,
            name=name,
            library=library,
            tune_on=[t.strip() for t in tune_on.split(",") if t.strip()] if tune_on else (),
            grid=_numbers(grid, "--grid"),
            tune_limit=tune_limit,
            reporter=reporter,
        )
    if as_json:
        return echo_json(result)
    expert = result.expert
    if result.tuning:
        tuning = result.tuning
        echo_table(
            ["weights", *tuning["tasks"], "mean"],
            [
                (",".join(f"{w:g}" for w in row["weights"]), *row["scores"].values(), f"{row['mean']:.2f}")
                for row in tuning["table"]
            ],
        )
        click.echo(f"chosen weights: {','.join(f'{w:g}' for w in tuning['chosen'])}\n")
    state = "exists already" if result.reused else f"ready at library version {expert.library_version}"
    click.echo(
        f"merged expert {expert.name} (id {expert.id}, {expert.config.get('base_kind')} weights, "
        f"{expert.merge_method}) {state}; {result.seconds:.1f} s"
    )
    click.echo(f"evaluate it: elmreg eval --task TASK --route expert:{expert.id}")
