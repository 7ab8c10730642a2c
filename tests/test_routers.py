"""Routers as plug-ins: each method's decision equals the same rule computed exactly in numpy over the visible
experts, and the audit tables say which router decided, with which options and votes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text
from test_filtered_routing import Library, Q, _FixedEmbedder, _unit

from elmreg.cli.main import cli
from elmreg.inference.router import Router
from elmreg.inference.routers import make_router, parse_router_options, router_names
from elmreg.registry.errors import UserError
from elmreg.registry.store import schema

FAST = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}


@pytest.fixture
def library(fresh_registry):
    """Four experts around a target (one retired); queries near the target, so they split their votes."""
    lib = Library(fresh_registry, np.random.default_rng(11))
    lib.visible = [lib.publish(f"e-{i}", count=40).id for i in range(3)]
    retired = lib.publish("retired", crowd=True, count=40)
    fresh_registry.catalogue.retire_expert(retired.id)
    lib.vectors = lib.queries()
    lib.router = Router(fresh_registry, _FixedEmbedder(lib.vectors))
    return lib


def _entries(lib, expert_ids):
    vectors, owners = [], []
    for expert_id in expert_ids:
        for entry in lib.context.library.entries(expert_id, lib.embedder.id):
            vectors.append(np.asarray(entry.embedding, dtype=np.float32))
            owners.append(expert_id)
    return np.stack(vectors), np.asarray(owners)


def _winner(weights: dict[int, float], scores: dict[int, float]) -> int:
    return min(weights, key=lambda e: (-weights[e], -scores[e], e))


def _queries():
    return [f"q{i}" for i in range(Q)]


def test_registry_lists_the_routers_and_refuses_unknown_names_and_options():
    assert {"roe", "roe-knn", "centroid", "per-instance"} <= set(router_names())
    assert make_router("roe-knn", {"top_k": "4"}).options == {"top_k": 4, "weighting": "similarity"}
    for name, options, phrase in [
        ("nope", {}, "unknown router 'nope'"),
        ("roe", {"k": "3"}, "has no option k"),
        ("roe-knn", {"top_k": "0"}, "at least 1"),
        ("roe-knn", {"top_k": "many"}, "must be int"),
        ("roe-knn", {"weighting": "softmax"}, "must be one of similarity, uniform"),
        ("per-instance", {"base": "per-instance"}, "must be one of"),
    ]:
        with pytest.raises(UserError, match=phrase):
            make_router(name, options)
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_router_options(["top_k"])


def test_centroids_are_normalised_means_kept_with_the_entries(library):
    with library.context.engine.begin() as c:
        rows = c.execute(text("SELECT expert_id, embedding::text, entries FROM expert_centroids")).all()
    assert len(rows) == 4
    for expert_id, embedding, entries in rows:
        vectors, _ = _entries(library, [expert_id])
        assert entries == len(vectors)
        np.testing.assert_allclose(json.loads(embedding), _unit(vectors.mean(axis=0)), atol=1e-5)


def test_centroid_router_equals_exact_nearest_centroid_vote(library):
    centroids = {e: _unit(_entries(library, [e])[0].mean(axis=0)) for e in library.visible}
    ids = list(centroids)
    similarities = library.vectors @ np.stack([centroids[e] for e in ids]).T
    best = [ids[i] for i in similarities.argmax(axis=1)]
    counts = {e: float(best.count(e)) for e in set(best)}
    scores = {e: float(similarities[np.asarray(best) == e, ids.index(e)].sum()) for e in counts}
    decision = library.router.route(_queries(), q=None, router="centroid")
    assert [v.expert_id for v in decision.votes] == best
    assert all(v.entry_id is None for v in decision.votes)
    assert decision.chosen_expert_id == _winner(counts, scores)
    [row] = library.context.audit.audit_rows(
        "audit_decisions", order_by=None, filters={"decision_id": decision.decision_id}, limit=1
    )
    assert row["router"] == "centroid" and row["router_params"] == {"top_k": 1}
    votes = library.context.audit.audit_rows(
        "audit_votes", order_by=None, filters={"decision_id": decision.decision_id}, limit=100
    )
    assert len(votes) == Q and all(v["sample_text"] is None and v["weight"] == 1.0 for v in votes)


@pytest.mark.parametrize("weighting", ["similarity", "uniform"])
def test_knn_router_equals_exact_weighted_k_nearest_vote(library, weighting):
    k = 5
    vectors, owners = _entries(library, library.visible)
    similarities = library.vectors @ vectors.T
    nearest = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    weights: dict[int, float] = {}
    scores: dict[int, float] = {}
    for q, row in enumerate(nearest):
        for i in row:
            s = float(similarities[q, i])
            weights[owners[i]] = weights.get(owners[i], 0.0) + (
                max(s, 0.0) if weighting == "similarity" else 1.0
            )
            scores[owners[i]] = scores.get(owners[i], 0.0) + s
    decision = library.router.route(
        _queries(), q=None, router="roe-knn", router_options={"top_k": k, "weighting": weighting}
    )
    assert len(decision.votes) == Q * k
    assert decision.chosen_expert_id == _winner(weights, scores)
    # The audit trail reproduces the router's tally in plain SQL: sum the vote weights per expert.
    with library.context.engine.begin() as c:
        summed = dict(
            c.execute(
                text(
                    "SELECT e.id, sum(v.weight) FROM audit_votes v JOIN experts e ON e.name = v.expert "
                    "WHERE v.decision_id = :d GROUP BY e.id"
                ),
                {"d": decision.decision_id},
            ).all()
        )
        router, params, top_k = c.execute(
            text("SELECT router, router_params, top_k FROM routing_decisions WHERE id = :d"),
            {"d": decision.decision_id},
        ).one()
    assert summed == pytest.approx(weights, abs=1e-4)
    assert (router, params, top_k) == ("roe-knn", {"top_k": k, "weighting": weighting}, k)


def test_per_instance_routes_each_instance_alone(library):
    vectors, owners = _entries(library, library.visible)
    best = owners[(library.vectors @ vectors.T).argmax(axis=1)].tolist()
    assignment = library.router.assign(_queries(), router="per-instance", caller_label="each")
    decisions = assignment.decisions
    assert [a.expert.id for a in assignment.answerers] == best
    assert [a.decision_id for a in assignment.answerers] == [d.decision_id for d in decisions]
    assert [d.chosen_expert_id for d in decisions] == best
    assert all(d.q == 1 and len(d.votes) == 1 and d.router == "per-instance" for d in decisions)
    rows = library.context.audit.audit_rows(
        "audit_decisions", order_by=None, filters={"caller_label": "each"}, limit=100
    )
    assert len(rows) == Q and {r["router"] for r in rows} == {"per-instance"}
    with pytest.raises(UserError, match="per instance"):
        library.router.route(_queries(), router="per-instance")


def test_roe_is_unchanged_and_recorded_as_roe(library):
    vectors, owners = _entries(library, library.visible)
    similarities = library.vectors @ vectors.T
    best = owners[similarities.argmax(axis=1)].tolist()
    counts = {e: float(best.count(e)) for e in set(best)}
    scores = {e: float(similarities.max(axis=1)[np.asarray(best) == e].sum()) for e in counts}
    decision = library.router.route(_queries(), q=None)
    assert decision.chosen_expert_id == _winner(counts, scores)
    assert decision.router == "roe" and all(t.weight is None for t in decision.tallies)


def test_migration_backfills_centroids_and_keeps_decisions(library):
    decision = library.router.route(_queries(), q=None, router="centroid")
    library.router.route(_queries(), q=None)
    with library.context.engine.begin() as c:
        before = c.execute(text("SELECT expert_id, embedding::text FROM expert_centroids ORDER BY 1")).all()
    schema.downgrade(library.context.engine, "0005_audit_scale")
    with library.context.engine.begin() as c:
        # Centroid votes have no library entry under the previous schema: they go, their decision stays.
        assert (
            c.scalar(
                text("SELECT count(*) FROM routing_votes WHERE decision_id = :d"), {"d": decision.decision_id}
            )
            == 0
        )
        assert c.scalar(text("SELECT count(*) FROM routing_decisions")) == 2
    schema.upgrade(library.context.engine)
    with library.context.engine.begin() as c:
        after = c.execute(text("SELECT expert_id, embedding::text FROM expert_centroids ORDER BY 1")).all()
        routers = c.execute(text("SELECT router FROM routing_decisions")).scalars().all()
    assert [e for e, _ in after] == [e for e, _ in before]
    for (_, a), (_, b) in zip(before, after, strict=True):
        np.testing.assert_allclose(json.loads(a), json.loads(b), atol=1e-6)
    assert routers == ["roe", "roe"]  # decisions from before the revision read as RoE's


@pytest.fixture
def trained(lab):
    lab.add_task("bigbench:colours", max_examples=48, training=FAST)
    lab.add_task("bigbench:moods", max_examples=48, training=FAST)
    assert all(j.status == "succeeded" for j in lab.train())
    return lab


def test_eval_on_a_dataset_that_is_not_a_task_registers_nothing(trained, tmp_path):
    counts = {table: _count(trained, table) for table in ("tasks", "jobs", "experts", "evaluations")}
    runner = CliRunner()
    args = ["eval", "--dataset", "bigbench:sizes/small_things", "--split", "all", "--limit", "12", "--json"]
    for route in ("roe", "centroid", "per-instance", "oracle", "base"):
        args += ["--route", route]
    result = runner.invoke(cli, args, env=lab_environ(trained), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = {r["route"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"roe", "centroid", "per-instance", "oracle", "base"}
    assert all(r["n_examples"] == 12 and r["evaluation_id"] is None for r in rows.values())
    assert rows["oracle"]["score"] >= max(rows["roe"]["score"], rows["centroid"]["score"])
    assert sum(rows["per-instance"]["details"]["experts"].values()) == 12
    assert {table: _count(trained, table) for table in counts} == counts
    labels = trained.audit("decisions", limit=50, caller_label=f"eval:{rows['roe']['task']}")
    assert {r["router"] for r in labels} == {"roe", "centroid", "per-instance"}
    _route_and_predict_cli_take_a_router(trained, tmp_path)


def _route_and_predict_cli_take_a_router(trained, tmp_path):
    """Part of the test above: it shares its two trained experts (training them is most of the time)."""
    env, runner = lab_environ(trained), CliRunner()
    listed = runner.invoke(cli, ["routers"], env=env)
    assert listed.exit_code == 0 and "roe-knn:" in listed.output and "weighting=similarity" in listed.output
    routed = runner.invoke(
        cli,
        [
            "route",
            "--dataset",
            "bigbench:colours",
            "--split",
            "all",
            "--router",
            "roe-knn",
            "--router-option",
            "top_k=4",
        ],
        env=env,
    )
    assert routed.exit_code == 0, routed.output
    assert "chosen expert: colours" in routed.output and "router roe-knn" in routed.output
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        "\n".join(
            json.dumps({"input": text, "answer_choices": choices})
            for text, choices in [
                ("what colour is the sky ?", ["blue", "green"]),
                ("i really love this movie .", ["positive", "negative"]),
            ]
        )
    )
    predicted = runner.invoke(cli, ["predict", "--input", str(queries), "--route", "per-instance"], env=env)
    assert predicted.exit_code == 0, predicted.output
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [r["expert"] for r in rows] == ["colours", "moods"]
    assert rows[0]["decision_id"] != rows[1]["decision_id"]
    bad = runner.invoke(
        cli, ["route", "--dataset", "bigbench:colours", "--split", "all", "--router-option", "k=2"], env=env
    )
    assert bad.exit_code == 2 and "has no option k" in bad.output and "Traceback" not in bad.output


def _count(registry, table: str) -> int:
    with registry.context.engine.begin() as c:
        return c.scalar(text(f"SELECT count(*) FROM {table}"))
