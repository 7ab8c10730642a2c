"""Parallel FFN adapter experts on a backbone, from their safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from elmreg.experts.base import KindLoader
from elmreg.experts.ffn_adapter.model import (
    adapter_parameters,
    add_adapters,
    load_adapter_state,
    remove_adapters,
)
from elmreg.models.backbones import Backbone
from elmreg.registry.errors import ArtifactError, ConfigurationError
from elmreg.registry.kinds import FFN_ADAPTER


class FfnAdapterLoader(KindLoader):
    """``config`` of an ffn_adapter expert: ``{"kind": "ffn_adapter", "hidden_size": e}``; the safetensors file holds
    ``<block path>.adapter_{down,up}.{weight,bias}`` for every wrapped block."""

    kind = FFN_ADAPTER.name

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        if not isinstance(config.get("hidden_size"), int):
            raise ConfigurationError("an ffn_adapter expert's config needs its integer 'hidden_size'")
        state = load_file(str(weights_path), device=str(backbone.device))
        adapters = add_adapters(backbone.model, config["hidden_size"])
        try:
            load_adapter_state(adapters, state)
        except ValueError as exc:
            remove_adapters(backbone.model)
            raise ArtifactError(f"{weights_path.name} does not fit backbone {backbone.name}: {exc}") from exc
        for parameter in adapter_parameters(adapters):
            parameter.requires_grad_(False)
        return backbone.model

    def detach(self, backbone: Backbone, model: torch.nn.Module) -> None:
        remove_adapters(backbone.model)
