"""Expert kinds on tiny backbones of both families: training, saving, attaching, detaching."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.tiny_models import BUILDERS
from peft import PeftModel
from safetensors.torch import load_file

from elmreg.registry.backbones import load_backbone
from elmreg.registry.encoding import encode, target_token_loss
from elmreg.registry.prompts import PromptedExample
from elmreg.trainers import get_trainer
from elmreg.trainers.full.task_vector import trainable_entries
from elmreg.trainers.lora import export_peft_folder

FAMILIES = ["seq2seq", "causal"]
KINDS = ["lora", "ffn_adapter", "full"]
EXAMPLES = [
    PromptedExample("what colour is the sky ?", "blue"),
    PromptedExample("what colour is grass ?", "green"),
    PromptedExample("what colour is snow ?", "white"),
    PromptedExample("what colour is the sun ?", "yellow"),
]
FAST = {"epochs": 30, "learning_rate": 5e-3, "batch_size": 4, "seed": 1}


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    return {family: build(tmp_path_factory.mktemp(family)) for family, build in BUILDERS.items()}


@pytest.fixture
def backbone(request, tiny_folders, tmp_path):
    return load_backbone(str(tiny_folders[request.param]), cache_dir=tmp_path)


def _loss(backbone, model=None) -> float:
    batch = encode(
        backbone.family, backbone.tokenizer, [e.input for e in EXAMPLES], [e.target for e in EXAMPLES]
    )
    with torch.no_grad():
        return float(target_token_loss(model or backbone.model, backbone.family, batch))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backbone", FAMILIES, indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_training_learns_and_leaves_the_backbone_untouched(backbone, kind, tmp_path):
    trainer = get_trainer(kind)
    before_state, before_loss = _state(backbone.model), _loss(backbone)
    steps = []
    trained = trainer.train(
        backbone,
        EXAMPLES,
        trainer.make_config(FAST),
        tmp_path / "out",
        progress=lambda s, t, loss: steps.append(s),
    )
    assert trained.weights_path.exists() and trained.config["kind"] == kind
    assert trained.metrics["steps"] == len(steps) == FAST["epochs"]
    assert trained.metrics["loss_per_epoch"][-1] < trained.metrics["loss_per_epoch"][0] * 0.5
    # The worker reuses its backbone for the next job: training must leave it exactly as it was.
    after = backbone.model.state_dict()
    assert set(after) == set(before_state)
    assert all(torch.equal(after[k], before_state[k]) for k in before_state)
    assert _loss(backbone) == pytest.approx(before_loss, abs=0)

    model = trainer.attach(backbone, trained.weights_path, trained.config)
    assert _loss(backbone, model) < before_loss * 0.5
    trainer.detach(backbone, model)
    assert _loss(backbone) == pytest.approx(before_loss, abs=0)


@pytest.mark.parametrize("backbone", ["causal"], indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights(backbone, kind, tmp_path):
    trainer = get_trainer(kind)
    config = {**FAST, "epochs": 2}
    first = trainer.train(backbone, EXAMPLES, trainer.make_config(config), tmp_path / "a")
    second = trainer.train(backbone, EXAMPLES, trainer.make_config(config), tmp_path / "b")
    other = trainer.train(backbone, EXAMPLES, trainer.make_config({**config, "seed": 2}), tmp_path / "c")
    a, b, c = (load_file(str(t.weights_path)) for t in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("backbone", FAMILIES, indirect=True)
def test_untrained_ffn_adapter_is_the_identity(backbone, tmp_path):
    from elmreg.trainers.ffn_adapter.model import add_adapters, remove_adapters

    before = _loss(backbone)
    adapters = add_adapters(backbone.model, hidden_size=16)
    assert len(adapters) == (4 if backbone.family == "seq2seq" else 2)  # one per layer: 2+2 in T5, 2 in Llama
    assert _loss(backbone) == pytest.approx(before, abs=1e-7)
    remove_adapters(backbone.model)
    assert _loss(backbone) == before


@pytest.mark.parametrize("backbone", FAMILIES, indirect=True)
def test_target_only_logits_equal_full_logits_loss(backbone):
    batch = encode(
        backbone.family, backbone.tokenizer, [e.input for e in EXAMPLES], [e.target for e in EXAMPLES]
    )
    with torch.no_grad():
        fast = target_token_loss(backbone.model, backbone.family, batch)
        full = backbone.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    assert float(fast) == pytest.approx(float(full), abs=1e-5)


@pytest.mark.parametrize("backbone", FAMILIES, indirect=True)
def test_exported_lora_loads_in_plain_peft_with_identical_logits(backbone, tiny_folders, tmp_path):
    trainer = get_trainer("lora")
    trained = trainer.train(backbone, EXAMPLES, trainer.make_config({**FAST, "epochs": 3}), tmp_path / "t")
    folder = export_peft_folder(trained.weights_path, trained.config, tmp_path / "export")
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"

    batch = encode(
        backbone.family, backbone.tokenizer, [e.input for e in EXAMPLES], [e.target for e in EXAMPLES]
    )
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if backbone.family == "seq2seq":
        inputs["labels"] = batch.labels
    model = trainer.attach(backbone, trained.weights_path, trained.config)
    with torch.no_grad():
        ours = model(**inputs).logits
    trainer.detach(backbone, model)

    fresh = load_backbone(str(tiny_folders[backbone.family]), cache_dir=tmp_path)  # a separate, plain copy
    plain = PeftModel.from_pretrained(fresh.model, folder)
    with torch.no_grad():
        theirs = plain(**inputs).logits
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("backbone", FAMILIES, indirect=True)
def test_task_vector_reconstructs_the_fine_tuned_weights(backbone, tmp_path):
    trainer = get_trainer("full")
    config = trainer.make_config({**FAST, "epochs": 2})
    # Capture θ_d at the moment of saving, before the trainer restores θ_pre.
    captured = {}
    original_save = trainer.save

    def save_and_capture(model, bb, cfg, out_dir):
        captured.update({n: p.detach().clone() for n, p in trainable_entries(model)})
        return original_save(model, bb, cfg, out_dir)

    trainer.save = save_and_capture
    trained = trainer.train(backbone, EXAMPLES, config, tmp_path / "full")
    tau = load_file(str(trained.weights_path))
    pre = dict(trainable_entries(backbone.model))
    assert set(tau) == set(captured) == set(pre)
    assert any(bool(t.abs().max() > 0) for t in tau.values())
    exact = total = 0
    for name, fine_tuned in captured.items():
        rebuilt = pre[name] + tau[name]
        # θ_d − θ_pre is exact in float32 whenever the two are within a factor of two (Sterbenz), which is
        # almost always after fine-tuning; elsewhere the rounding of τ is below one ulp of the weight.
        assert torch.allclose(rebuilt, fine_tuned, rtol=0, atol=float(torch.finfo(torch.float32).eps)), name
        exact += int((rebuilt == fine_tuned).sum())
        total += fine_tuned.numel()
    assert exact / total > 0.98
