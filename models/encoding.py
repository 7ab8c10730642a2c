"""How a prompted example becomes token ids, shared by training and scoring so both see the same text.

Causal LMs read ``input`` followed by ``" " + target`` and an end-of-sequence token; the loss (and at inference
the log-likelihood) covers only the target tokens. Seq2seq models read ``input`` in the encoder and produce
``target`` + end-of-sequence in the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class EncodedBatch:
    """Padded tensors of one batch. For causal LMs ``labels`` is aligned with ``input_ids`` (-100 off target)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: str | torch.device) -> EncodedBatch:
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def _pad(sequences: Sequence[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def target_text(target: str) -> str:
    """The continuation a causal LM is trained (and scored) on: a space, then the target."""
    return " " + target


def encode_causal(
    tokenizer,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    max_source_length: int,
    max_target_length: int,
) -> EncodedBatch:
    """Right-padded ``input + " " + target + eos``; sources are truncated from the left (the end of a prompt,
    where the question usually is, matters most)."""
    rows, labels = [], []
    for source, target in zip(inputs, targets, strict=True):
        source_ids = tokenizer(source, add_special_tokens=True)["input_ids"][-max_source_length:]
        target_ids = tokenizer(target_text(target), add_special_tokens=False)["input_ids"][:max_target_length]
        if tokenizer.eos_token_id is not None:
            target_ids = [*target_ids, tokenizer.eos_token_id]
        rows.append(source_ids + target_ids)
        labels.append([IGNORE_INDEX] * len(source_ids) + target_ids)
    input_ids = _pad(rows, tokenizer.pad_token_id)
    attention = _pad([[1] * len(r) for r in rows], 0)
    return EncodedBatch(input_ids, attention, _pad(labels, IGNORE_INDEX))


def encode_seq2seq(
    tokenizer,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    max_source_length: int,
    max_target_length: int,
) -> EncodedBatch:
    """Encoder ids for ``inputs``; decoder labels for ``targets`` (+eos, padding as -100)."""
    sources = [tokenizer(s, add_special_tokens=True)["input_ids"][:max_source_length] for s in inputs]
    labels = [tokenizer(t, add_special_tokens=True)["input_ids"][:max_target_length] for t in targets]
    input_ids = _pad(sources, tokenizer.pad_token_id)
    attention = _pad([[1] * len(s) for s in sources], 0)
    return EncodedBatch(input_ids, attention, _pad(labels, IGNORE_INDEX))


def encode(
    family: str,
    tokenizer,
    inputs: Sequence[str],
    targets: Sequence[str],
    *,
    max_source_length: int = 512,
    max_target_length: int = 128,
) -> EncodedBatch:
    encoder = encode_seq2seq if family == "seq2seq" else encode_causal
    return encoder(
        tokenizer, inputs, targets, max_source_length=max_source_length, max_target_length=max_target_length
    )


def unwrap_causal(model):
    """The causal LM under a PEFT wrapper (adapters stay active: they live inside its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_head_logits(causal, hidden: torch.Tensor) -> torch.Tensor:
    """LM-head logits (float32) for selected hidden states only, with the model's final soft-capping (Gemma)."""
    logits = causal.get_output_embeddings()(hidden).float()
    softcap = getattr(causal.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def target_token_loss(model, family: str, batch: EncodedBatch, *, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over target tokens only.

    For causal LMs the LM head runs only at the positions that predict a target token: with a 262k vocabulary
    (gemma-3) the full ``[batch, length, vocab]`` logits dominate the cost of a step otherwise.

    Args:
        model: The (possibly adapter-wrapped) Hugging Face model.
        reduction: ``mean`` over all target tokens, or ``none`` for one summed value per example.
    """
    if family == "seq2seq":
        labels = batch.labels
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).logits
        flat = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(labels.shape)
        if reduction == "none":
            return flat.sum(dim=1)
        return flat.sum() / (labels != IGNORE_INDEX).sum()

    causal = unwrap_causal(model)
    hidden = causal.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    # Position t predicts token t+1: shift labels left and keep the positions whose next token is a target.
    next_labels = batch.labels[:, 1:]
    predicting = next_labels != IGNORE_INDEX
    rows, cols = predicting.nonzero(as_tuple=True)
    logits = lm_head_logits(causal, hidden[:, :-1][rows, cols])
    token_losses = torch.nn.functional.cross_entropy(logits, next_labels[rows, cols], reduction="none")
    if reduction == "none":
        per_example = torch.zeros(batch.labels.shape[0], dtype=token_losses.dtype, device=token_losses.device)
        return per_example.index_add(0, rows, token_losses)
    return token_losses.mean()
