"""Rank classification batched across instances and LoRA experts equals the one-instance-at-a-time computation."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny_models import build_tiny_gemma3
from peft import LoraConfig, PeftModel, get_peft_model

from elmreg.data.prompts import PromptedExample
from elmreg.inference.pool import BASE_ADAPTER
from elmreg.inference.scoring import choice_log_likelihoods, choice_log_likelihoods_batch
from elmreg.models.backbones import load_backbone
from elmreg.registry.errors import UserError

# Prompts of different lengths and choice counts: the batch pads, and choices of one example are not contiguous
# with one adapter.
EXAMPLES = [
    PromptedExample("what colour is the sky ?", "blue", ("blue", "green", "white")),
    PromptedExample("the grass is", "green", ("green", "red")),
    PromptedExample("what colour is the snow at night ? answer", "white", ("white", "black", "blue", "yes")),
    PromptedExample("is the sun yellow", "yes", ("yes", "no")),
]


def _with_two_adapters(backbone) -> PeftModel:
    """Two LoRA adapters with random (non-zero) B, so each changes the scores differently."""
    targets = ["q", "v"] if backbone.family == "seq2seq" else ["q_proj", "v_proj"]
    torch.manual_seed(0)
    model = get_peft_model(
        backbone.model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False), adapter_name="one"
    )
    model.add_adapter("two", LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.eval()
    return model


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    return str(build_tiny_gemma3(tmp_path_factory.mktemp("gemma3")))


@pytest.mark.parametrize("family", ["seq2seq", "causal", "gemma3"])
def test_mixed_batch_scores_equal_each_example_alone(family, tiny_backbones, tiny_gemma3, tmp_path):
    backbone = load_backbone(
        tiny_gemma3 if family == "gemma3" else tiny_backbones[family], cache_dir=tmp_path
    )
    model = _with_two_adapters(backbone)
    adapters = ["one", "two", BASE_ADAPTER, "two"]
    batched = choice_log_likelihoods_batch(model, backbone, EXAMPLES, adapter_names=adapters, rows_per_pass=5)
    for example, adapter, scores in zip(EXAMPLES, adapters, batched, strict=True):
        if adapter == BASE_ADAPTER:
            with model.disable_adapter():
                alone = choice_log_likelihoods(model, backbone, example)
        else:
            model.set_adapter(adapter)
            alone = choice_log_likelihoods(model, backbone, example)
        assert scores == pytest.approx(alone, abs=1e-4), (example.input, adapter)
    model.set_adapter("one")
    one = choice_log_likelihoods(model, backbone, EXAMPLES[1])
    assert batched[1] != pytest.approx(one, abs=1e-4)  # the adapters differ, so a mix-up would show
    # Without adapter names: the active adapter for every row, as the single-example path.
    plain = choice_log_likelihoods_batch(model, backbone, EXAMPLES[:2])
    assert plain[1] == pytest.approx(one, abs=1e-4)


def test_batch_scoring_refuses_examples_without_choices(tiny_backbones, tmp_path):
    backbone = load_backbone(tiny_backbones["causal"], cache_dir=tmp_path)
    with pytest.raises(UserError, match="answer choices"):
        choice_log_likelihoods_batch(backbone.model, backbone, [PromptedExample("the sky", None, None)])
