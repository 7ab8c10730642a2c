"""The experiment harness end to end at tiny scale: tiny backbone, synthetic BIG-bench-like tasks, real services."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from safetensors.torch import load_file

from elmreg.cli.main import cli
from elmreg.data.prompts import PromptedExample
from elmreg.experiments import compare_predictions, list_presets, load_config
from elmreg.experiments.config import config_from_mapping
from elmreg.experiments.harness import ExperimentResult, run_experiment
from elmreg.experiments.prediction_cache import (
    PredictionCache,
    answering,
    mixture_answering,
    prediction_key,
)
from elmreg.experiments.report import SECTION_TITLES, markdown
from elmreg.inference.engine import PeftEngine
from elmreg.registry.entities import Expert, StoredArtifact
from elmreg.registry.errors import ConfigurationError, UserError

FAST = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}


def tiny_config(**overrides):
    return config_from_mapping(
        {
            "name": "tiny",
            "max_examples": 24,
            "training": FAST,
            "q": 8,
            "eval_limit": 8,
            "matrix_limit": 4,
            "rehearsal": 8,
            "seen": ["bigbench:colours", "bigbench:moods"],
            "new": ["bigbench:sizes/small_things"],
            "unseen": ["bigbench:sizes/big_things", "bigbench:echo"],
            "routers": [
                "roe",
                {"router": "roe-knn", "options": {"top_k": 2}},
                "centroid",
                "per-instance",
                "trained",
                {"router": "arrow", "options": {"top_k": 2}},
            ],
            **overrides,
        },
        source="test",
    )


def test_harness_runs_every_section_and_the_library_keeps_old_predictions(lab, tmp_path, monkeypatch):
    engines: list[PeftEngine] = []
    make_engine = PeftEngine.__init__

    def recorded(self, *args, **kwargs):
        engines.append(self)
        make_engine(self, *args, **kwargs)

    monkeypatch.setattr(PeftEngine, "__init__", recorded)
    result = run_experiment(lab, tiny_config(), out_dir=tmp_path / "out")
    # Every answer of the experiment came from the registry's one engine of its backbone.
    assert all(e is lab.engine(e.backbone.name) for e in engines) and lab.engine().runs > 0
    assert set(result.sections) == {"routing", "multitask", "continual", "unseen", "ablation", "routers"}
    assert result.passed and result.check.identical and result.check.compared > 0

    routing = result.sections["routing"]
    assert routing["tasks"] == 2 and {r["task"] for r in routing["rows"]} == {"colours", "moods"}
    multitask = result.sections["multitask"]
    for row in multitask["rows"]:
        assert row["oracle"] >= row["own_expert"] and {"base", "mt", "roe", "mt_equal_steps"} <= set(row)
    # Claim 2 at equal steps: a second MT adapter stopped after as many optimiser steps as one expert took.
    steps = multitask["steps"]
    assert steps["expert"] == lab.expert("colours").metrics["steps"] and steps["mt"] > steps["expert"]
    equal = lab.expert(f"tiny.mt-steps{steps['expert']}-{tiny_config().fingerprint()}")
    assert equal.metrics["steps"] == steps["expert"] and equal.status == "retired"
    continual = result.sections["continual"]
    assert set(continual["variants"]) == {"mt_sequential", "mt_rehearsal"}
    assert (
        continual["trained_in_this_run"]
        and continual["library_version_after"] > continual["pinned_library_version"]
    )
    assert {r["task"] for r in continual["new"]} == {"sizes.small_things"}
    unseen = result.sections["unseen"]
    assert {r["task"] for r in unseen["rows"]} == {"sizes.big_things", "echo"}
    assert unseen["best_single_expert"] in {"colours", "moods"}
    formats = {(r["embedder"], r["format"]) for r in result.sections["ablation"]["rows"]}
    assert {f for _, f in formats} == {"both", "instance", "choices"}
    routers = result.sections["routers"]
    by_router = {r["router"]: r for r in routers["routers"]}
    assert set(by_router) == {
        "roe",
        "roe-knn(top_k=2)",
        "centroid",
        "per-instance",
        "trained",
        "arrow(top_k=2)",
    }
    oracle = routers["oracle"]["rows"]
    for label, r in by_router.items():
        assert [row["task"] for row in r["rows"]] == ["sizes.big_things", "echo"]
        assert 0 <= r["seen_routing_accuracy"] <= 100 and r["latency_ms"] > 0
        assert r["unseen_se"] is None  # echo is scored by ROUGE-L: no binomial standard error
        if label.startswith("arrow"):  # a mixture of both experts: each one's share of the routing mass
            assert all(set(row["experts"]) <= {"colours", "moods"} for row in r["rows"])
            assert all(0.99 <= sum(row["experts"].values()) <= 1.01 for row in r["rows"]), r["rows"]
            continue
        assert [sum(row["experts"].values()) for row in r["rows"]] == [row["n"] for row in r["rows"]], r[
            "rows"
        ]
        if label != "per-instance":  # one seen expert per task: never above the best seen expert
            assert all(row["score"] <= oracle[row["task"]] for row in r["rows"])
            assert all(len(row["experts"]) == 1 for row in r["rows"])
    assert by_router["roe"]["seen_routing_accuracy"] == roe_seen_accuracy(result)

    # Baselines are retired at once: they never take part in routing, and unseen tasks stay unregistered.
    names = {t.name for t in lab.tasks()}
    assert "sizes.big_things" not in names and "echo" not in names
    ready = {e.name for e in lab.experts(status="ready")}
    assert ready == {"colours", "moods", "sizes.small_things"}
    mt = lab.expert(result.provenance["mt_expert"])
    assert mt.status == "retired"
    # Same total number of examples as the experts together (K=24 each).
    assert mt.config["examples"] == 48

    # The continual fine-tuning started from the MT adapter's weights.
    sequential = lab.expert(continual["variants"]["mt_sequential"])
    assert sequential.config["training"]["init_from"]

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["checks"]["continual_identical"] is True
    provenance = data["provenance"]
    assert provenance["preset"] == "tiny" and provenance["elmreg_commit"] and provenance["K"] == 24
    assert provenance["seen"] == ["colours", "moods"] and provenance["backbone"] == lab.settings.backbone
    markdown = (tmp_path / "out" / "results.md").read_text()
    for title in SECTION_TITLES.values():
        assert title in markdown
    assert "Check PASSED" in markdown and "_Produced by: preset `tiny`" in markdown

    # The check catches a single changed old prediction.
    before = continual["predictions_before"]
    assert compare_predictions(before, continual["predictions_after_pinned"]).identical
    altered = {task: list(p) for task, p in before.items()}
    altered["colours"][0] = altered["colours"][0] + " (changed)"
    check = compare_predictions(before, altered)
    assert not check.identical and check.changed["colours"] == 1 and "colours: 1 changed" in check.summary()
    assert not compare_predictions(before, {"colours": before["colours"]}).identical  # a task went missing
    assert not ExperimentResult(provenance={}, check=check).passed

    # A rerun reuses every task and expert: nothing new is trained, and the numbers are the same.
    experts_before = len(lab.experts())
    again = run_experiment(lab, tiny_config(sections=["routing", "continual"]), out_dir=tmp_path / "again")
    assert len(lab.experts()) == experts_before
    assert again.sections["continual"]["trained_in_this_run"] is False and again.passed
    assert again.sections["routing"]["rows"] == [
        {**r, "decision_id": a["decision_id"]}
        for r, a in zip(routing["rows"], again.sections["routing"]["rows"], strict=True)
    ]


def roe_seen_accuracy(result) -> float:
    """RoE's seen-task routing accuracy as the routing section measured it (same routes, same library)."""
    rows = result.sections["routing"]["rows"]
    return round(100.0 * sum(r["chosen"] == r["task"] for r in rows) / len(rows), 1)


def test_routers_section_is_opt_in_and_checked_before_running():
    assert "routers" not in tiny_config(routers=None).sections
    for routers, phrase in [
        (["nope"], "unknown router 'nope'"),
        ([{"router": "roe-knn", "options": {"top_k": 0}}], "at least 1"),
        ([{"options": {}}], "a router is a name"),
        (["roe", "roe"], "listed twice"),
    ]:
        with pytest.raises(UserError, match=phrase):
            tiny_config(routers=routers)


def test_a_registered_task_with_another_spec_is_not_reused(lab, tmp_path):
    lab.add_task("bigbench:colours", max_examples=16, training=FAST)
    lab.train()
    with pytest.raises(UserError, match="another specification"):
        run_experiment(lab, tiny_config(new=[], unseen=[], sections=["routing"]), out_dir=tmp_path)


def test_init_from_starts_training_from_an_experts_weights(lab):
    parent = lab.add_task("bigbench:colours", max_examples=16, training=FAST, now=True)
    parent_expert = lab.experts(task=parent.name)[0]
    # A learning rate this small leaves the weights where training started: at the parent's.
    tiny_step = {**FAST, "learning_rate": 1e-9}
    child = lab.add_task(
        "bigbench:moods", max_examples=16, training={**tiny_step, "init_from": parent_expert.name}, now=True
    )
    fresh = lab.add_task("bigbench:moods", name="moods-fresh", max_examples=16, training=tiny_step, now=True)

    def weights(task):
        expert = lab.experts(task=task)[0]
        return load_file(str(lab.context.artifact_cache.fetch(expert.artifact)))

    start, warm, cold = weights(parent.name), weights(child.name), weights(fresh.name)
    lora_b = [k for k in start if "lora_B" in k]
    assert lora_b and all((warm[k] - start[k]).abs().max() < 1e-6 for k in start)
    assert all(float(cold[k].abs().max()) < 1e-6 for k in lora_b)  # fresh LoRA B starts at zero

    with pytest.raises(ConfigurationError, match="init_from"):
        lab.add_task("bigbench:echo", kind="ffn_adapter", training={"init_from": parent_expert.name})
    lab.add_task(
        "bigbench:sizes", max_examples=8, training={**FAST, "rank": 4, "init_from": parent_expert.name}
    )
    failed = [j for j in lab.train() if j.status != "succeeded"]
    assert failed and "do not fit" in failed[0].last_error


def test_presets_and_cli(lab, tmp_path):
    presets = list_presets()
    assert {"cpu-small", "paper"} <= set(presets)
    cpu_small = load_config("cpu-small")
    demo = {
        "strategyqa",
        "sports_understanding",
        "hyperbaton",
        "navigate",
        "date_understanding",
        "logical_fallacy_detection",
    }
    assert demo <= {t.name for t in cpu_small.seen}
    for spec in cpu_small.seen:
        if spec.name in demo:
            # The demo's options exactly, so that a registry that ran the demo reuses its experts.
            assert spec.options["max_examples"] == 64
            assert spec.options["training"] == {"epochs": 5, "max_source_length": 128}
    with pytest.raises(UserError, match="neither a YAML file nor a preset"):
        load_config("no-such-preset")

    runner = CliRunner()
    listed = runner.invoke(cli, ["experiment", "list"], env=lab_environ(lab))
    assert listed.exit_code == 0 and "cpu-small" in listed.output
    config = tmp_path / "tiny.yaml"
    config.write_text(
        json.dumps(
            {
                "name": "cli-tiny",
                "max_examples": 16,
                "training": FAST,
                "q": 4,
                "seen": ["bigbench:colours", "bigbench:moods"],
                "sections": ["routing", "ablation"],
            }
        )
    )
    result = runner.invoke(
        cli,
        ["--quiet", "experiment", "run", str(config), "--eval-limit", "4", "--out", str(tmp_path / "r")],
        env=lab_environ(lab),
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "results.md").is_file() and "wrote" in result.output


def test_committed_results_md_is_the_template_rendering_of_results_json():
    # Any change to templates/results.md.j2 that alters the committed report shows here, byte for byte.
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "paper" / "results" / "cpu-small"
    assert (
        markdown(json.loads((results / "results.json").read_text())) == (results / "results.md").read_text()
    )


def test_prediction_cache_keys_on_weights_and_instances(tmp_path):
    expert = Expert(
        id=3, name="e", task_id=1, backbone_id=1, kind="lora", status="ready",
        artifact=StoredArtifact("s3://b/e", "a" * 64, 10), config={}, metrics={}, library_version=1,
        retired_at_version=None, merge_method=None, merge_params=None, created_at=None, ready_at=None,
        retired_at=None,
    )  # fmt: skip
    instances = [PromptedExample("2 + 2 =", "4", ("4", "5")), PromptedExample("1 + 1 =", "2", ("2", "3"))]
    key = prediction_key(answering(expert, "t"), instances)
    cache = PredictionCache(tmp_path)
    assert cache.get(key, 2) is None
    cache.put(key, ["4", "3"])
    assert cache.get(key, 2) == ["4", "3"]
    assert cache.get(key, 3) is None  # a different number of instances is not these predictions
    # Other weights, other instances, the base backbone or a mixture: other keys.
    republished = replace(expert, artifact=StoredArtifact("s3://b/e2", "b" * 64, 10))
    others = {
        prediction_key(answering(republished, "t"), instances),
        prediction_key(answering(expert, "t"), instances[:1]),
        prediction_key(answering(None, "t"), instances),
        prediction_key(mixture_answering([expert], {"top_k": 3}), instances),
    }
    assert key not in others and len(others) == 4
    # A damaged file reads as absent (recomputed), never as predictions.
    next(tmp_path.rglob(f"{key}.json")).write_text("{not json")
    assert cache.get(key, 2) is None


def test_paired_difference_to_roe_is_per_example_on_the_same_examples():
    from elmreg.experiments.harness import _paired_difference

    roe = [np.array([1, 0, 1, 0], float), np.array([1, 1], float)]
    same = _paired_difference([a.copy() for a in roe], roe)
    assert same == (0.0, 0.0)  # identical answers: no difference and no uncertainty
    better = [np.array([1, 1, 1, 0], float), np.array([1, 1], float)]
    delta, se = _paired_difference(better, roe)
    # Task 1: +25 points (one of four examples), task 2: 0; per-example differences [0, 1, 0, 0] have variance 1/4.
    assert delta == 12.5 and se == pytest.approx(100 * np.sqrt(0.25 / 4) / 2, abs=0.01)
