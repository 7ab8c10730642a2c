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


def engine_options(command: Command) -> Command:
    """``--engine`` and ``--vllm-url``: which engine answers (the command passes them to :func:`use_engine`)."""
    options = [
        click.option(
            "--engine",
            type=click.Choice(["peft", "vllm"]),
            default=None,
            help="Engine that answers: peft (built in, every expert kind) or vllm (LoRA experts and base, by a "
            "vLLM server). Default: ELMREG_ENGINE, peft.",
        ),
        click.option(
            "--vllm-url",
            metavar="URL",
            default=None,
            help="A running vLLM OpenAI server on this machine (default: ELMREG_VLLM_URL; none: elmreg starts "
            "one from .venv-vllm).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def use_engine(registry, engine: str | None, vllm_url: str | None) -> None:
    """Apply ``--engine`` / ``--vllm-url`` to the registry (a URL alone implies the vLLM engine)."""
    if engine is None and vllm_url is None:
        return
    if vllm_url is not None and not vllm_url.startswith(("http://", "https://")):
        raise click.BadParameter(f"use an http:// or https:// URL, not {vllm_url}", param_hint="--vllm-url")
    if engine == "peft" and vllm_url:
        raise click.UsageError("--vllm-url goes with --engine vllm")
    registry.use_engine(engine or "vllm", vllm_url=vllm_url)
