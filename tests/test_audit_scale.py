"""The audit trail at scale: margins kept with each decision (migration 0003 backfills old ones), and pruning."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from test_filtered_routing import Q, Library, _FixedEmbedder

from elmreg.cli.main import cli
from elmreg.inference.router import Router
from elmreg.registry.store import schema


@pytest.fixture
def decided(fresh_registry):
    library = Library(fresh_registry, np.random.default_rng(3))
    for i in range(3):
        library.publish(f"e-{i}", crowd=i == 0, count=30)
    router = Router(fresh_registry, _FixedEmbedder(library.queries()))
    decisions = [router.route([f"q{i}" for i in range(Q)], q=None, caller_label="audit-test") for _ in range(3)]
    return fresh_registry, decisions


def _settings_environ(context):
    return {
        "ELMREG_HOME": str(context.settings.home),
        "ELMREG_DATABASE_URL": context.settings.database_url,
        "PATH": "/usr/bin:/bin",
    }


def test_audit_decisions_margin_is_stored_and_equals_the_votes(decided):
    context, decisions = decided
    for decision in decisions:
        [row] = context.audit.audit_rows(
            "audit_decisions", order_by=None, filters={"decision_id": decision.decision_id}, limit=1
        )
        assert row["winner_votes"] == decision.tallies[0].votes
        assert row["vote_margin"] == decision.margin


def test_migration_0003_backfills_margins_of_earlier_decisions(decided):
    context, decisions = decided
    with context.engine.begin() as c:
        before = c.execute(text("SELECT * FROM audit_decisions ORDER BY decision_id")).mappings().all()
    schema.downgrade(context.engine, "0002")
    schema.upgrade(context.engine)
    with context.engine.begin() as c:
        after = c.execute(text("SELECT * FROM audit_decisions ORDER BY decision_id")).mappings().all()
    assert [dict(r) for r in after] == [dict(r) for r in before]


def test_audit_prune_is_a_dry_run_unless_yes(decided):
    context, decisions = decided
    environ = _settings_environ(context)
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    runner = CliRunner()
    dry = runner.invoke(cli, ["audit", "prune", "--before", "2000-01-01"], env=environ)
    assert dry.exit_code == 0 and "would remove 0 decision(s) and 0 vote(s)" in dry.output
    dry = runner.invoke(cli, ["audit", "prune", "--before", tomorrow], env=environ)
    assert dry.exit_code == 0, dry.output
    assert f"would remove 3 decision(s) and {3 * Q} vote(s)" in dry.output and "--yes" in dry.output
    assert context.audit.audit_rows("audit_decisions", order_by=None, filters={}, limit=10)
    done = runner.invoke(cli, ["audit", "prune", "--before", tomorrow, "--yes"], env=environ)
    assert done.exit_code == 0 and f"removed 3 decision(s) and {3 * Q} vote(s)" in done.output
    with context.engine.begin() as c:
        assert c.execute(text("SELECT count(*) FROM routing_votes")).scalar_one() == 0
    bad = runner.invoke(cli, ["audit", "prune", "--before", "last tuesday"], env=environ)
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    # The views still answer as before.
    assert runner.invoke(cli, ["audit", "--view", "decisions"], env=environ).exit_code == 0
