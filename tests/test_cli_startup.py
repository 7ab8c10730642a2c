"""The CLI starts instantly: the verbs that only read the catalogue never import the ML stack.

Checked in a fresh interpreter, because this test process has long imported torch for the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# What costs seconds to import: only the verbs that train, score, embed, load data or draw may pull these in.
HEAVY = ("torch", "transformers", "peft", "sentence_transformers", "datasets", "matplotlib")

LIGHT_VERBS = (
    ("--help",),
    ("status",),
    ("config",),
    ("tasks", "list"),
    ("experts", "list"),
    ("jobs", "list"),
    ("audit",),
    ("audit", "--view", "decisions"),
)

PROBE = textwrap.dedent(
    """
    import json, sys
    from click.testing import CliRunner

    from elmreg.cli.main import cli

    verbs, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    runner = CliRunner()
    report = {"verbs": {}}
    for verb in verbs:
        result = runner.invoke(cli, verb)
        report["verbs"][" ".join(verb)] = [result.exit_code, result.output[-500:]]
        if verb == ["--help"]:
            # Help needs no catalogue at all: not even SQLAlchemy.
            report["after_help"] = sorted(m for m in ("sqlalchemy", "alembic", "boto3", *heavy) if m in sys.modules)
    report["loaded"] = sorted(m for m in heavy if m in sys.modules)
    print(json.dumps(report))
    """
)


def test_catalogue_verbs_import_no_ml_stack(test_environ, registry):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(LIGHT_VERBS), json.dumps(HEAVY)],
        env=test_environ | {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for verb, (exit_code, output) in report["verbs"].items():
        assert exit_code == 0, f"elmreg {verb}: {output}"
    assert report["after_help"] == []
    assert report["loaded"] == []
