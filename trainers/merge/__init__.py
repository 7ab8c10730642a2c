"""Merging experts: one new expert (kind ``merged``) from the weights of several experts of one kind.

A merged expert's weights are in the format of its parents' kind (a task vector, a PEFT LoRA adapter, or FFN
adapter weights), so ``config["base_kind"]`` says how to load it and ``config["kind"]`` is that kind too, which
lets the kind's trainer load it unchanged. Its lineage (parents, weights, method, parameters) is in the catalogue.

Kept free of heavy imports: the adapter pool imports :func:`weights_kind` from here.
"""

from __future__ import annotations

from typing import Any

from elmreg.registry.errors import ConfigurationError

MERGED_KIND = "merged"
# Expert kinds whose weights can be merged, i.e. every trainable kind (trainers.KINDS).
BASE_KINDS = ("lora", "ffn_adapter", "full")


def weights_kind(expert: Any) -> str:
    """The kind whose trainer loads this expert's weights: its own kind, or a merged expert's ``base_kind``.

    Raises:
        ConfigurationError: A merged expert without a valid ``base_kind`` in its config.
    """
    if expert.kind != MERGED_KIND:
        return expert.kind
    base = expert.config.get("base_kind")
    if base not in BASE_KINDS:
        raise ConfigurationError(
            f"merged expert {expert.name} has no valid 'base_kind' in its config ({base!r})"
        )
    return base


__all__ = ["BASE_KINDS", "MERGED_KIND", "weights_kind"]
