"""Retrieval-of-Experts in SQL and its audit trail, on a library of tiny experts of clearly different tasks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text

from elmreg.cli.main import cli
from elmreg.data.examples import render_split
from elmreg.data.sources import DatasetSpec
from elmreg.registry.errors import UserError

FAST = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}


@pytest.fixture
def library(lab):
    for name in ("colours", "moods", "echo"):
        lab.add_task(f"bigbench:{name}", max_examples=24, training=FAST)
    assert all(job.status == "succeeded" for job in lab.train())
    return lab


def _instances(lab, task, split="all", limit=None):
    return render_split(
        DatasetSpec(f"bigbench:{task}", split=split), None, cache_dir=lab.settings.cache_path, limit=limit
    )


@pytest.mark.parametrize("task", ["colours", "moods", "echo"])
def test_route_picks_the_expert_of_the_task_and_votes_add_up(library, task):
    decision = library.route(_instances(library, task), q=16, task=task, caller_label="test")
    assert decision.chosen_expert_name == task
    assert sum(t.votes for t in decision.tallies) == decision.q == 16
    with library.context.engine.connect() as c:
        votes = c.execute(
            text("SELECT count(*), count(DISTINCT query_index) FROM routing_votes WHERE decision_id = :d"),
            {"d": decision.decision_id},
        ).one()
        audit = c.execute(
            text("SELECT * FROM audit_decisions WHERE decision_id = :d"), {"d": decision.decision_id}
        ).one()
    assert tuple(votes) == (16, 16)
    assert (
        audit.chosen_expert == task
        and audit.task == task
        and audit.winner_votes + audit.runner_up_votes <= 16
    )
    assert audit.vote_margin == decision.margin
    # The same rows through the Python API.
    [row] = library.audit("decisions", decision_id=decision.decision_id)
    assert (row["chosen_expert"], row["vote_margin"]) == (task, decision.margin)
    votes = library.audit("votes", decision_id=decision.decision_id, limit=100)
    assert len(votes) == 16 and {v["query_index"] for v in votes} == set(range(16))
    assert library.audit("decisions", task=task, limit=1)[0]["decision_id"] == decision.decision_id


def test_audit_api_refuses_unknown_views_and_columns(library):
    from elmreg.registry.errors import UserError

    with pytest.raises(UserError, match="unknown audit view 'nope'; choose one of decisions"):
        library.audit("nope")
    with pytest.raises(UserError, match="has no column colour"):
        library.audit("decisions", colour="red")


def test_sql_vote_equals_exact_search(library):
    """The HNSW path gives each query the same nearest entry as an exact scan of all entries."""
    router = library.router()
    instances = _instances(library, "moods", limit=8)
    decision = library.route(instances, q=None, record=False)
    vectors = router.embed_queries(instances)
    with library.context.engine.connect() as c:
        for vote, vector in zip(decision.votes, vectors, strict=True):
            exact = c.execute(
                text(
                    "SELECT id FROM library_entries ORDER BY embedding::vector(384) <#> CAST(:q AS vector(384)), id LIMIT 1"
                ),
                {"q": "[" + ",".join(str(float(x)) for x in vector) + "]"},
            ).scalar_one()
            assert vote.entry_id == exact


def test_pinned_library_version_ignores_later_experts(library):
    pinned = library.status().library_version
    before = library.route(_instances(library, "sizes"), q=16, record=False)
    library.add_task("bigbench:sizes", max_examples=16, training=FAST)
    library.train()
    now = library.route(_instances(library, "sizes"), q=16, record=False)
    again = library.route(_instances(library, "sizes"), q=16, library_version=pinned, record=False)
    assert now.chosen_expert_name == "sizes" and before.chosen_expert_name != "sizes"
    assert (again.chosen_expert_name, again.votes) == (before.chosen_expert_name, before.votes)


def test_retired_expert_is_not_routed(library):
    library.retire("moods")
    decision = library.route(_instances(library, "moods"), q=8, record=False)
    assert decision.chosen_expert_name != "moods"


def test_kind_filter(library):
    with pytest.raises(UserError, match="no routable expert"):
        library.route(_instances(library, "moods"), q=4, kinds=["full"], record=False)


def test_auditor_role_reads_views_and_writes_nothing(library):
    library.route(_instances(library, "colours"), q=4, caller_label="audited")
    with library.context.engine.connect() as c:
        c.execute(text("SET ROLE elmreg_auditor"))
        assert c.execute(text("SELECT count(*) FROM audit_decisions")).scalar_one() >= 1
        assert c.execute(text("SELECT count(*) FROM audit_choices_by_task")).scalar_one() >= 1
        c.execute(text("SELECT * FROM audit_experts_never_chosen")).all()
        for statement in (
            "DELETE FROM routing_votes",
            "UPDATE experts SET name = 'x'",
            "SELECT * FROM experts",
        ):
            with pytest.raises(Exception, match="permission denied"), c.begin_nested():
                c.execute(text(statement))
        c.rollback()


def test_route_cli_bad_inputs_and_output(library, tmp_path):
    env = lab_environ(library)
    runner = CliRunner()
    empty, broken, good = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl", tmp_path / "good.jsonl"
    empty.write_text("\n")
    broken.write_text('{"input": "ok"}\n{"input": \n')
    good.write_text(
        "\n".join(json.dumps({"input": f"i really {w} this movie ."}) for w in ("love", "hate", "good"))
    )
    cases = [
        (["--input", str(empty)], "holds no instances"),
        (["--input", str(broken)], "line 2 is not valid JSON"),
        (["--input", str(good), "--q", "5"], "Q=5 is larger than the 3 instance(s)"),
        (["--input", str(good), "--dataset", "bigbench:moods"], "exactly one of --input FILE or --dataset"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["route", *args], env=env, catch_exceptions=False)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
    result = runner.invoke(
        cli, ["route", "--input", str(good), "--q", "3", "--json"], env=env, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    decision = json.loads(result.output)
    assert decision["chosen_expert_name"] == "moods" and len(decision["votes"]) == 3
    assert "audit_decisions" in runner.invoke(cli, ["audit"], env=env).output

    # The decision just made, through `elmreg audit --view`.
    shown = runner.invoke(
        cli, ["audit", "--view", "votes", "--decision", str(decision["decision_id"]), "--json"], env=env
    )
    assert shown.exit_code == 0, shown.output
    assert sorted(v["query_index"] for v in json.loads(shown.output)) == [0, 1, 2]
    table = runner.invoke(cli, ["audit", "--view", "decisions", "--limit", "1"], env=env)
    assert table.exit_code == 0 and table.output.splitlines()[1].startswith(str(decision["decision_id"]))
    refused = runner.invoke(cli, ["audit", "--json"], env=env)
    assert refused.exit_code == 2 and "go with --view" in refused.output
