"""The audit trail at scale: margins kept with each decision (migration 0005 backfills old ones), and pruning."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text
from test_filtered_routing import Library, Q, _FixedEmbedder

from elmreg.cli.main import cli
from elmreg.inference.router import Router
from elmreg.registry.entities import PendingDecision
from elmreg.registry.store import schema


@pytest.fixture
def decided(fresh_registry):
    library = Library(fresh_registry, np.random.default_rng(3))
    for i in range(3):
        library.publish(f"e-{i}", crowd=i == 0, count=30)
    router = Router(fresh_registry, _FixedEmbedder(library.queries()))
    decisions = [
        router.route([f"q{i}" for i in range(Q)], q=None, caller_label="audit-test") for _ in range(3)
    ]
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


VIEWS = {
    "audit_decisions": "decision_id",
    "audit_choices_by_task": "task, day, chosen_expert",
    "audit_experts_never_chosen": "expert_id",
}


def _views(context):
    with context.engine.begin() as c:
        return {
            view: [dict(r) for r in c.execute(text(f"SELECT * FROM {view} ORDER BY {order}")).mappings()]
            for view, order in VIEWS.items()
        }


def _columns_of(views, reference):
    return {
        view: [{k: row[k] for k in reference[view][0]} for row in rows] if reference[view] else rows
        for view, rows in views.items()
    }


def test_migration_0005_views_answer_as_0004s(decided):
    """0004's views counted from every vote and decision; 0005's read kept counts: same rows, before and after
    the upgrade backfills them."""
    context, decisions = decided
    now = _views(context)
    schema.downgrade(context.engine, "0004_api_keys")
    counted = _views(context)
    schema.upgrade(context.engine)
    # Later revisions append columns (0006: the router); the columns 0004 had must read the same.
    assert _columns_of(_views(context), counted) == _columns_of(now, counted) == counted
    assert counted["audit_choices_by_task"][0]["decisions"] == 3


def test_decisions_written_in_a_batch_are_counted_as_one_by_one(decided):
    """The server's audit writer reserves ids and writes decisions in batches: the kept per-day counts and margins
    must come out as if each decision had been recorded alone (a recount from the decisions changes nothing)."""
    context, _ = decided
    library = context.library
    pending: list[PendingDecision] = []

    def collect(record, votes):
        [decision_id] = library.reserve_decision_ids(1)
        pending.append(PendingDecision(decision_id, record, tuple(votes)))
        return decision_id

    router = Router(context, _FixedEmbedder(Library(context, np.random.default_rng(3)).queries()))
    batched = [
        router.route([f"q{i}" for i in range(Q)], q=None, caller_label=label, recorder=collect)
        for label in ("server", "server", "other")
    ]
    library.record_decisions(pending)
    kept = _views(context)
    library.recount_audit_summary()
    assert _views(context) == kept
    by_label = {
        (row["task"], row["decisions"])
        for row in kept["audit_choices_by_task"]
        if row["task"] in ("server", "other")
    }
    assert by_label == {("server", 2), ("other", 1)}
    for decision in batched:
        [row] = context.audit.audit_rows(
            "audit_decisions", order_by=None, filters={"decision_id": decision.decision_id}, limit=1
        )
        assert row["vote_margin"] == decision.margin


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
    # The views still answer as before, and the kept daily counts went with the decisions.
    assert runner.invoke(cli, ["audit", "--view", "decisions"], env=environ).exit_code == 0
    assert _views(context)["audit_choices_by_task"] == []
