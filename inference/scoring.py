"""Rank classification (as in T0 and the paper): the log-likelihood of each answer choice given the input.
The engine (``inference.engine``) decides when to use which scorer; generation lives there too."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from elmreg.data.prompts import PromptedExample
from elmreg.models.backbones import Backbone
from elmreg.models.encoding import (
    IGNORE_INDEX,
    encode,
    lm_head_logits,
    target_text,
    target_token_loss,
    unwrap_causal,
)
from elmreg.registry.errors import UserError

# transformers 5.x renamed the key-value cache from ``past_key_values`` to ``cache`` (the old name still works but
# warns); use whichever name the installed version has.
_CACHE = next(
    (f.name for f in dataclasses.fields(BaseModelOutputWithPast) if f.name in ("cache", "past_key_values")),
    "past_key_values",
)


@torch.no_grad()
def choice_log_likelihoods(
    model, backbone: Backbone, example: PromptedExample, *, max_source_length: int = 512
) -> list[float]:
    """Log-likelihood of each answer choice given the input (the sum over the choice's tokens, end of sequence
    included), as rank classification in T0 and the paper; the answer is the choice with the highest value.

    For seq2seq models the encoder runs once and its output is shared by the choices. For causal LMs, when the
    prompt tokens saved are worth a second forward call ((choices - 1) x prompt tokens >= ``SHARED_PROMPT_MIN_TOKENS``)
    the prompt runs once and its key/value cache is shared by the choices' continuations; otherwise all
    (prompt, choice) pairs go through in one batch. Either way the LM head runs only where choice tokens are predicted.
    Measured on gemma-3-270m, 2 CPU cores: strategyqa (2 choices, ~20-token prompts) 121 ms/example batched vs
    149 ms shared; 8 choices with ~80-token prompts 533 ms batched vs 312 ms shared.
    """
    if not example.answer_choices:
        raise UserError("rank classification needs answer choices for every instance")
    choices = list(example.answer_choices)
    tokenizer = backbone.tokenizer
    if backbone.family == "seq2seq":
        return _seq2seq_scores(model, backbone, example.input, choices, max_source_length)
    prefix = tokenizer(example.input, add_special_tokens=True)["input_ids"][-max_source_length:]
    if (len(choices) - 1) * len(prefix) < SHARED_PROMPT_MIN_TOKENS:
        batch = encode(
            backbone.family,
            tokenizer,
            [example.input] * len(choices),
            choices,
            max_source_length=max_source_length,
            max_target_length=_MAX_CHOICE_TOKENS,
        ).to(backbone.device)
        return [-float(v) for v in target_token_loss(model, backbone.family, batch, reduction="none")]
    continuations = [
        tokenizer(target_text(c), add_special_tokens=False)["input_ids"][:_MAX_CHOICE_TOKENS]
        + [tokenizer.eos_token_id]
        for c in choices
    ]
    return _causal_scores(model, backbone, prefix, continuations)


_MAX_CHOICE_TOKENS = 128
# Below this many saved prompt tokens, a second forward call costs more than re-reading the prompt per choice.
SHARED_PROMPT_MIN_TOKENS = 256


def _seq2seq_scores(
    model, backbone: Backbone, source: str, choices: list[str], max_source_length: int
) -> list[float]:
    tokenizer, device = backbone.tokenizer, backbone.device
    encoded = tokenizer(source, return_tensors="pt", truncation=True, max_length=max_source_length).to(device)
    encoder_output = model.get_encoder()(**encoded)
    n = len(choices)
    labels = [tokenizer(c, add_special_tokens=True)["input_ids"][:_MAX_CHOICE_TOKENS] for c in choices]
    width = max(len(ids) for ids in labels)
    label_tensor = torch.tensor([ids + [IGNORE_INDEX] * (width - len(ids)) for ids in labels], device=device)
    encoder_output.last_hidden_state = encoder_output.last_hidden_state.expand(n, -1, -1)
    logits = model(
        encoder_outputs=encoder_output,
        attention_mask=encoded["attention_mask"].expand(n, -1),
        labels=label_tensor,
    ).logits.float()
    return _summed_log_probs(logits, label_tensor)


def _causal_scores(
    model, backbone: Backbone, prefix: list[int], continuations: list[list[int]]
) -> list[float]:
    device, n = backbone.device, len(continuations)
    causal = unwrap_causal(model)
    # Hidden states, not logits: the LM head (262k columns on gemma-3) runs only where a choice token is predicted.
    prompt = causal.base_model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    first = torch.log_softmax(lm_head_logits(causal, prompt.last_hidden_state[0, -1]), dim=-1)
    cache = getattr(prompt, _CACHE)
    cache.batch_repeat_interleave(n)
    width = max(len(c) for c in continuations)
    pad = backbone.tokenizer.pad_token_id
    ids = torch.tensor([c + [pad] * (width - len(c)) for c in continuations], device=device)
    mask = torch.tensor(
        [[1] * (len(prefix) + len(c)) + [0] * (width - len(c)) for c in continuations], device=device
    )
    positions = torch.arange(len(prefix), len(prefix) + width, device=device).expand(n, -1)
    scores = [float(first[c[0]]) for c in continuations]
    if width > 1:
        hidden = causal.base_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, **{_CACHE: cache}
        ).last_hidden_state
        # Token t of a continuation is predicted at its position t-1 (t >= 1); token 0 by the prompt's last position.
        targets = torch.tensor(
            [c[1:] + [IGNORE_INDEX] * (width - len(c)) for c in continuations], device=device
        )
        rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
        log_probs = torch.log_softmax(lm_head_logits(causal, hidden[rows, cols]), dim=-1)
        picked = log_probs.gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1)
        for row, value in zip(rows.tolist(), picked.tolist(), strict=True):
            scores[row] += value
    return scores


def _summed_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Sum over positions of log p(label) (positions labelled IGNORE_INDEX count zero)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    keep = labels != IGNORE_INDEX
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return [float(v) for v in (picked * keep).sum(dim=1)]


# Rows ((example, choice) pairs) per forward pass of the batched scorer: bounds activation memory.
BATCH_SCORING_ROWS = 64


@contextmanager
def mixed_adapters(model, adapter_names: Sequence[str] | None) -> Iterator[None]:
    """Every forward pass in the block runs row i through PEFT adapter ``adapter_names[i]`` (``"__base__"``: none).

    ``PeftModel.forward`` and ``generate`` take ``adapter_names`` themselves, but the scorers call the inner model
    directly (to run the LM head only where needed); PEFT's forward hooks, which its own forward installs, pass
    the names down to every LoRA layer either way.
    """
    if adapter_names is None:
        yield
        return
    with model.base_model._enable_peft_forward_hooks(adapter_names=list(adapter_names)):
        yield


@torch.no_grad()
def choice_log_likelihoods_batch(
    model,
    backbone: Backbone,
    examples: Sequence[PromptedExample],
    *,
    adapter_names: Sequence[str] | None = None,
    max_source_length: int = 512,
    rows_per_pass: int = BATCH_SCORING_ROWS,
) -> list[list[float]]:
    """:func:`choice_log_likelihoods` for many examples at once, each with its own adapter if given.

    Every (example, choice) pair is one row of a padded batch, so the choices of all examples (of many requests,
    for many LoRA experts) share forward passes; the values equal the per-example computation up to float
    rounding (tests/test_serve_scoring.py).

    Args:
        adapter_names: One PEFT adapter name per example (a mixed batch, see :func:`mixed_adapters`).
        rows_per_pass: Pairs per forward pass.
    """
    if any(not e.answer_choices for e in examples):
        raise UserError("rank classification needs answer choices for every instance")
    if adapter_names is not None and len(adapter_names) != len(examples):
        raise UserError(f"{len(adapter_names)} adapter names for {len(examples)} examples")
    pairs = [(index, choice) for index, e in enumerate(examples) for choice in e.answer_choices]
    flat: list[float] = []
    for start in range(0, len(pairs), rows_per_pass):
        chunk = pairs[start : start + rows_per_pass]
        batch = encode(
            backbone.family,
            backbone.tokenizer,
            [examples[index].input for index, _ in chunk],
            [choice for _, choice in chunk],
            max_source_length=max_source_length,
            max_target_length=_MAX_CHOICE_TOKENS,
        ).to(backbone.device)
        names = None if adapter_names is None else [adapter_names[index] for index, _ in chunk]
        with mixed_adapters(model, names):
            losses = target_token_loss(model, backbone.family, batch, reduction="none")
        flat.extend(-float(v) for v in losses)
    scores: list[list[float]] = [[] for _ in examples]
    for (index, _), value in zip(pairs, flat, strict=True):
        scores[index].append(value)
    return scores


def best_choice(example: PromptedExample, scores: Sequence[float]) -> str:
    """The answer choice with the highest log-likelihood (the first of equals)."""
    return example.answer_choices[max(range(len(scores)), key=scores.__getitem__)]
