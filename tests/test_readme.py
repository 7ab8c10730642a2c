"""The README's commands are real: every ``elmreg`` line names an existing command and options, and the cheap ones
run as written against a registry."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import lab_environ

from elmreg.cli.main import cli

README = Path(__file__).resolve().parents[1] / "README.md"

# Commands that take seconds and need nothing but a migrated catalogue: the test runs them exactly as written.
CHEAP = {
    ("config",),
    ("status",),
    ("audit",),
    ("report",),
    ("tasks", "list"),
    ("experts", "list"),
    ("jobs", "list"),
    ("gc",),
    ("services", "status"),
    ("db", "current"),
    ("experiment", "list"),
}


def readme_commands() -> list[str]:
    """``elmreg ...`` lines of the README's bash blocks, comments stripped, ``a | b`` alternatives expanded."""
    text = README.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("elmreg "):
                continue
            # "elmreg services up | down | status" documents three commands.
            first, *others = line.split(" | ")
            head, alternative = first.rsplit(" ", 1)
            commands += [f"{head} {tail}" for tail in [alternative, *others]]
    return commands


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    command, path, rest = cli, [], list(words)
    takes_value = {opt for param in cli.params if not getattr(param, "is_flag", False) for opt in param.opts}
    while rest and rest[0].startswith("-"):  # global options before the command
        rest = rest[2:] if rest[0] in takes_value else rest[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        if sub is None:
            break
        command, path, rest = sub, [*path, rest.pop(0)], rest
    return command, path, rest


def test_the_readme_documents_commands_that_exist():
    commands = readme_commands()
    assert len(commands) >= 10
    for line in commands:
        words = shlex.split(line)[1:]
        command, path, rest = _resolve(words)
        assert path, f"README: '{line}' names no elmreg command"
        known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        for word in rest:
            if word.startswith("--"):
                assert word.split("=")[0] in known, f"README: '{line}': {' '.join(path)} has no option {word}"


def cheap_commands() -> list[str]:
    return [c for c in readme_commands() if tuple(_resolve(shlex.split(c)[1:])[1]) in CHEAP]


def test_the_readme_has_cheap_commands_to_run():
    assert len(cheap_commands()) >= 5


@pytest.mark.parametrize("line", cheap_commands())
def test_cheap_readme_commands_run_as_written(line, lab, tmp_path, monkeypatch):
    words = shlex.split(line)[1:]
    monkeypatch.chdir(tmp_path)  # commands that write files (report) write here
    result = CliRunner().invoke(cli, words, env=lab_environ(lab), catch_exceptions=False)
    assert result.exit_code == 0, f"{line}\n{result.output}"
