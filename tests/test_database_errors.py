"""A catalogue that cannot be reached is one line and exit code 1 on every verb that reads it, never a traceback.

Every path to the database goes through the stores' managed sessions, which translate driver errors; these
verbs cover each store (catalogue, library, jobs, evaluations, audit) and the schema commands.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from elmreg.cli.main import cli

VERBS = [
    ("status",),
    ("db", "current"),
    ("db", "upgrade"),
    ("tasks", "list"),
    ("experts", "list"),
    ("jobs", "list"),
    ("audit", "--view", "decisions"),
    ("gc",),
    ("report", "--out", "{tmp}/report.html"),
    ("benchmark",),
]


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_lost_database_is_one_line_and_exit_1(verb, test_environ, tmp_path):
    unreachable = f"postgresql+psycopg://postgres@/elmreg?host={tmp_path}"  # no server listens there
    args = [a.replace("{tmp}", str(tmp_path)) for a in verb]
    result = CliRunner().invoke(cli, args, env={**test_environ, "ELMREG_DATABASE_URL": unreachable})
    assert result.exit_code == 1, result.output
    assert "cannot reach the catalogue database" in result.output
    assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output
