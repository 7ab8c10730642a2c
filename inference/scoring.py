"""Answering with a model: rank classification (as in T0 and the paper) and greedy generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from elmreg.registry.backbones import Backbone
from elmreg.registry.encoding import encode, target_token_loss
from elmreg.registry.errors import UserError
from elmreg.registry.prompts import PromptedExample


@torch.no_grad()
def choice_log_likelihoods(
    model, backbone: Backbone, example: PromptedExample, *, max_source_length: int = 512
) -> list[float]:
    """Log-likelihood of each answer choice given the input (the sum over the choice's tokens).

    All choices of an input go through the model as one batch; the answer is the choice with the highest value.
    """
    if not example.answer_choices:
        raise UserError("rank classification needs answer choices for every instance")
    choices = list(example.answer_choices)
    batch = encode(
        backbone.family,
        backbone.tokenizer,
        [example.input] * len(choices),
        choices,
        max_source_length=max_source_length,
        max_target_length=128,
    ).to(backbone.device)
    return [-float(v) for v in target_token_loss(model, backbone.family, batch, reduction="none")]


def rank_classify(model, backbone: Backbone, examples: Sequence[PromptedExample]) -> list[str]:
    """The most likely answer choice of each example."""
    answers = []
    for example in examples:
        scores = choice_log_likelihoods(model, backbone, example)
        answers.append(example.answer_choices[max(range(len(scores)), key=scores.__getitem__)])
    return answers


@torch.no_grad()
def generate(
    model,
    backbone: Backbone,
    examples: Sequence[PromptedExample],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions of each example's input."""
    tokenizer = backbone.tokenizer
    outputs: list[str] = []
    for start in range(0, len(examples), batch_size):
        inputs = [e.input for e in examples[start : start + batch_size]]
        if backbone.family == "causal":
            tokenizer.padding_side = "left"  # generation continues from the last real token
        encoded = tokenizer(inputs, return_tensors="pt", padding=True).to(backbone.device)
        tokenizer.padding_side = "right"
        generated = model.generate(
            **encoded,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if backbone.family == "causal":
            generated = generated[:, encoded["input_ids"].shape[1] :]
        outputs.extend(t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True))
    return outputs


def answer(
    model, backbone: Backbone, examples: Sequence[PromptedExample], *, task_type: str | None = None
) -> list[str]:
    """Rank classification where examples carry answer choices (or ``task_type`` says so), else generation."""
    classify = task_type == "classification" or (
        task_type is None and all(e.answer_choices for e in examples)
    )
    return rank_classify(model, backbone, examples) if classify else generate(model, backbone, examples)
