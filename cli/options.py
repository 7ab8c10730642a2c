"""Options more than one command declares, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import click

Command = TypeVar("Command", bound=Callable)

# The keyword arguments task_spec_options adds, as TaskRequest names them.
TASK_SPEC_FIELDS = (
    "subset",
    "prompt",
    "answer_choices",
    "template_file",
    "template_name",
    "name",
    "backbone",
)


def task_spec_options(*, scope: str = "", name_help: str, backbone_help: str) -> Callable[[Command], Command]:
    """The options that say which data a task reads and how it is prompted (``add-task``, ``eval --dataset``);
    the command receives them as the keyword arguments of ``TASK_SPEC_FIELDS``.

    Args:
        scope: Put before each help text, e.g. ``"With --dataset: "`` where they go with one other option.
        name_help, backbone_help: What ``--name`` and ``--backbone`` mean for this command.
    """
    options = [
        click.option("--subset", help=f"{scope}Dataset configuration (hub) or BIG-bench subtask."),
        click.option(
            "--prompt", help=f"{scope}Inline Jinja template 'INPUT ||| TARGET' over the dataset's columns."
        ),
        click.option(
            "--answer-choices", help=f"{scope}Jinja for the choices, separated by '|||' (e.g. 'no ||| yes')."
        ),
        click.option(
            "--template-file",
            type=click.Path(exists=True, dir_okay=False),
            help=f"{scope}A promptsource templates.yaml.",
        ),
        click.option("--template-name", help=f"{scope}Template of --template-file to use (prompt level)."),
        click.option("--name", help=name_help),
        click.option("--backbone", help=backbone_help),
    ]

    def declare(command: Command) -> Command:
        for option in reversed(options):
            command = option(command)
        return command

    return declare
