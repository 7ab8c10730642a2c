"""Inference on tiny experts: rank classification, the adapter pool, predict and eval."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import lab_environ
from fixtures.tiny_models import build_tiny_gemma3

from elmreg.cli.main import cli
from elmreg.data.examples import render_split
from elmreg.data.prompts import PromptedExample
from elmreg.data.sources import DatasetSpec
from elmreg.inference import scoring
from elmreg.inference.pool import AdapterPool
from elmreg.inference.scoring import choice_log_likelihoods
from elmreg.models.backbones import load_backbone
from elmreg.registry.artifacts import s3 as s3_module
from elmreg.registry.errors import ArtifactIntegrityError, UserError

FAST = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}
EXAMPLE = PromptedExample("what colour is the sky ?", "blue", ("blue", "green", "white"))


def _naive_log_likelihood(backbone, source: str, choice: str) -> float:
    """Full-vocabulary logits for the whole sequence, then the choice tokens' log-probabilities summed."""
    tokenizer, model = backbone.tokenizer, backbone.model
    with torch.no_grad():
        if backbone.family == "seq2seq":
            inputs = tokenizer(source, return_tensors="pt")
            labels = tokenizer(choice, return_tensors="pt")["input_ids"]
            logits = model(**inputs, labels=labels).logits[0]
            return float(torch.log_softmax(logits, -1).gather(1, labels[0][:, None]).sum())
        source_ids = tokenizer(source)["input_ids"]
        target_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([source_ids + target_ids])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        positions = range(len(source_ids) - 1, ids.shape[1] - 1)
        return float(sum(log_probs[p, ids[0, p + 1]] for p in positions))


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return str(build_tiny_gemma3(tmp_path_factory.mktemp("gemma3")))


@pytest.mark.parametrize("shared_prompt", [False, True])
@pytest.mark.parametrize("family", ["seq2seq", "causal", "gemma3"])
def test_rank_classification_equals_naive_per_choice_scores(
    family, shared_prompt, tiny_backbones, tiny_gemma3, tmp_path, monkeypatch
):
    # Both causal paths: all (prompt, choice) pairs in one batch, and the prompt once with a shared cache.
    monkeypatch.setattr(scoring, "SHARED_PROMPT_MIN_TOKENS", 0 if shared_prompt else 10**9)
    # gemma3: a sliding-window cache and logit soft-capping, the default backbone's architecture in miniature.
    path = tiny_gemma3 if family == "gemma3" else tiny_backbones[family]
    backbone = load_backbone(path, cache_dir=tmp_path)
    fast = choice_log_likelihoods(backbone.model, backbone, EXAMPLE)
    naive = [_naive_log_likelihood(backbone, EXAMPLE.input, c) for c in EXAMPLE.answer_choices]
    assert fast == pytest.approx(naive, abs=1e-4)


@pytest.fixture
def trained(lab):
    lab.add_task("bigbench:colours", max_examples=48, training=FAST)
    lab.add_task("bigbench:moods", max_examples=48, training=FAST)
    lab.add_task("bigbench:echo", max_examples=24, training=FAST, kind="ffn_adapter")
    assert all(j.status == "succeeded" for j in lab.train())
    return lab


def test_pool_switches_experts_without_reloading_the_backbone(trained):
    pool = AdapterPool(trained.context, trained.settings.backbone, capacity=1)
    colours, moods, echo = (trained.expert(n) for n in ("colours", "moods", "echo"))
    base_params = {n: p.clone() for n, p in pool.backbone.model.named_parameters()}
    outputs = {}
    for expert in (colours, moods, colours, echo, None, moods):
        with pool.use(expert) as model:
            outputs.setdefault(expert.name if expert else "base", []).append(
                choice_log_likelihoods(model, pool.backbone, EXAMPLE)
            )
        assert pool.resident == ([expert.id] if expert else [])  # capacity 1: the other LoRA was evicted
    assert pool.backbone_loads == 1
    assert outputs["colours"][0] == pytest.approx(outputs["colours"][1], abs=1e-6)  # same expert, same scores
    assert outputs["colours"][0] != pytest.approx(outputs["moods"][0], abs=1e-6)
    with pool.use(None) as model:
        assert dict(model.named_parameters()).keys() >= set() and choice_log_likelihoods(
            model, pool.backbone, EXAMPLE
        )
    for name, tensor in pool.backbone.model.named_parameters():
        if name in base_params:
            assert torch.equal(tensor, base_params[name]), name


def test_pool_refuses_a_tampered_artifact(trained):
    expert = trained.expert("colours")
    _, key = s3_module.parse_s3_uri(expert.artifact.uri)
    artifacts = trained.context.artifacts
    original = artifacts.client.get_object(Bucket=artifacts.bucket, Key=key)["Body"].read()
    tampered = bytearray(original)
    tampered[-1] ^= 0xFF
    artifacts.client.put_object(Bucket=artifacts.bucket, Key=key, Body=bytes(tampered))
    pool = AdapterPool(trained.context, trained.settings.backbone)
    for cached in (trained.settings.cache_path / "artifacts").rglob("*"):
        if cached.is_file():
            cached.unlink()
    with pytest.raises(ArtifactIntegrityError), pool.use(expert):
        pass
    assert pool.resident == []


def test_eval_stores_roe_base_oracle_and_expert(trained):
    results = {
        r: trained.evaluate("colours", r, split="all", limit=24)
        for r in ("roe", "base", "oracle", "expert:moods")
    }
    assert results["roe"].expert == "colours" and results["oracle"].expert == "colours"
    assert results["roe"].score >= results["base"].score
    assert results["oracle"].score >= max(results["roe"].score, results["expert:moods"].score)
    rows = trained.context.evaluations.list_evaluations(task_id=trained.task("colours").id)
    assert [r.route for r in rows] == ["roe", "base", "oracle", "expert"]
    assert all(r.metric == "accuracy" and r.n_examples == 24 for r in rows)


def test_predict_cli(trained, tmp_path):
    env = lab_environ(trained)
    runner = CliRunner()
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        "\n".join(
            json.dumps({"input": f"what colour is the {t} ?", "answer_choices": ["blue", "green"]})
            for t in ("sky", "grass")
        )
    )
    out = tmp_path / "answers.jsonl"
    result = runner.invoke(
        cli,
        ["predict", "--input", str(queries), "--route", "roe", "--q", "2", "--out", str(out)],
        env=env,
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["expert"] for r in rows] == ["colours", "colours"] and all(
        r["prediction"] in ("blue", "green") for r in rows
    )
    generated = render_split(
        DatasetSpec("bigbench:echo", split="all"), None, cache_dir=trained.settings.cache_path, limit=2
    )
    assert all(isinstance(r["prediction"], str) for r in trained.predict(generated, expert="echo"))
    bad = runner.invoke(cli, ["predict", "--input", str(queries), "--expert", "nope"], env=env)
    assert bad.exit_code == 2 and "no expert 'nope'" in bad.output


def test_mixed_batches_answer_as_each_expert_alone(trained):
    colours, moods, echo = (trained.expert(n) for n in ("colours", "moods", "echo"))
    spec = DatasetSpec("bigbench:colours", split="train")
    # Same-length inputs: generation batches then need no padding, so mixed and single runs see equal tensors.
    instances = render_split(spec, None, cache_dir=trained.settings.cache_path, limit=6)
    chosen = [colours, moods, None, echo, moods, colours]
    ids = [e.id if e else None for e in chosen]

    def alone(examples):
        return [
            trained.predict([example], expert=expert)[0]["prediction"]
            for example, expert in zip(examples, ids, strict=True)
        ]

    classified = trained.answer(instances, trained.assignment(ids))
    assert [r["prediction"] for r in classified] == alone(instances)
    assert [r["expert"] for r in classified] == [e.name if e else None for e in chosen]
    open_ended = [PromptedExample(i.input, i.target, None) for i in instances]
    generated = [r["prediction"] for r in trained.answer(open_ended, trained.assignment(ids))]
    assert generated == alone(open_ended)
    assert len(set(generated)) > 1  # the experts do answer differently, so order mix-ups would show
    assert trained._pools[trained.settings.backbone].backbone_loads == 1


def test_training_and_pools_share_one_backbone_and_hand_it_over(trained):
    """One loaded backbone per registry: a second pool, or training, has the first pool's experts taken off."""
    pool = AdapterPool(trained.context, trained.settings.backbone, capacity=2)
    other = AdapterPool(trained.context, trained.settings.backbone, capacity=2)
    assert pool.backbone is other.backbone
    colours, echo = trained.expert("colours"), trained.expert("echo")
    with pool.use(colours) as model:
        before = choice_log_likelihoods(model, pool.backbone, EXAMPLE)
    with other.use(echo) as model:  # changes the backbone's modules: the LoRA adapter must be off first
        choice_log_likelihoods(model, other.backbone, EXAMPLE)
    assert pool.resident == [] and other.resident == [echo.id]

    trained.add_task("bigbench:sizes", max_examples=8, training=FAST, now=True)
    assert other.resident == [] and other.backbone.active_expert is None
    with pool.use(colours) as model:
        assert choice_log_likelihoods(model, pool.backbone, EXAMPLE) == pytest.approx(before, abs=1e-6)
    assert pool.backbone_loads == 1


def test_mixed_batches_refuse_what_cannot_mix(trained):
    pool = AdapterPool(trained.context, trained.settings.backbone, capacity=1)
    colours, moods, echo = (trained.expert(n) for n in ("colours", "moods", "echo"))
    with pytest.raises(UserError, match="holds 1"), pool.use_mixed([colours, moods]):
        pass
    with pytest.raises(UserError, match="only LoRA experts mix"), pool.use_mixed([echo]):
        pass
    with pytest.raises(UserError, match="one expert per instance"):
        trained.answer([EXAMPLE], trained.assignment([colours.id, moods.id]))
