"""The command line: help everywhere, one-line errors with exit code 2, and a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from elmreg.cli.main import cli
from elmreg.registry.store import schema


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        path = (*prefix, name)
        yield path, command
        if isinstance(command, click.Group):
            yield from _commands(command, path)


@pytest.fixture
def run(test_environ):
    runner = CliRunner()

    def invoke(*args, env=None):
        return runner.invoke(cli, list(args), env={**test_environ, **(env or {})}, catch_exceptions=False)

    return invoke


def test_every_command_has_help_and_an_example(run):
    assert run("-h").exit_code == 0
    for path, command in _commands(cli):
        result = run(*path, "-h")
        assert result.exit_code == 0, path
        assert command.help, f"'elmreg {' '.join(path)}' has no help"
        if not isinstance(command, click.Group):
            assert "Example" in command.help or "elmreg " in command.help, f"no example for {path}"


def test_status_shows_services_schema_and_counts(run, registry):
    result = run("status", "--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert {s["name"] for s in status["services"]} == {"postgres", "s3"}
    assert all(s["running"] for s in status["services"])
    assert status["catalogue"]["schema_revision"] == status["catalogue"]["head_revision"]
    assert "library_entries" in status["catalogue"]["row_counts"]
    text_out = run("status").output
    assert "psql 'postgresql://" in text_out and "catalogue rows" in text_out


def test_db_current_and_upgrade_are_idempotent(run, registry):
    assert "up to date" in run("db", "current").output
    result = run("db", "upgrade")
    assert result.exit_code == 0 and f"-> {schema.head_revision()}" in result.output


def test_user_errors_are_one_line_with_exit_code_2(run, tmp_path):
    result = run("db", "downgrade", "base")
    assert result.exit_code == 2 and "--yes" in result.output

    (tmp_path / "bad.toml").write_text("s3_bukket = 1\n")
    result = run("status", env={"ELMREG_CONFIG": str(tmp_path / "bad.toml")})
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "unknown setting 's3_bukket'" in result.output
    assert "Traceback" not in result.output


def test_unreachable_database_is_one_line(run, tmp_path):
    result = run("status", env={"ELMREG_DATABASE_URL": f"postgresql+psycopg://postgres@/x?host={tmp_path}"})
    assert result.exit_code == 1
    assert "cannot reach the catalogue database" in result.output
    assert "Traceback" not in result.output


def test_real_subprocess(test_environ, registry):
    elmreg = Path(sys.executable).parent / "elmreg"
    done = subprocess.run(
        [str(elmreg), "status", "--json"],
        env=test_environ | {"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["catalogue"]["schema_revision"] == schema.head_revision()


def test_config_lists_every_setting(run):
    out = run("config").output
    assert "ELMREG_DATABASE_URL" in out and "ELMREG_S3_ENDPOINT_URL" in out and "ELMREG_HOME" in out
