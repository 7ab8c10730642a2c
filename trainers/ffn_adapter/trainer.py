"""Training and loading of parallel FFN adapter experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from elmreg.registry.backbones import Backbone
from elmreg.registry.errors import ArtifactError, ConfigurationError
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig
from elmreg.trainers.ffn_adapter.config import FfnAdapterTrainingConfig
from elmreg.trainers.ffn_adapter.model import (
    adapter_parameters,
    adapter_state,
    add_adapters,
    find_adapters,
    load_adapter_state,
    remove_adapters,
)

WEIGHTS_FILE = "ffn_adapter.safetensors"


class FfnAdapterTrainer(ExpertTrainer):
    """One small FFN per transformer layer, in parallel with the layer's own.

    ``config`` of a trained expert: ``{"kind": "ffn_adapter", "hidden_size": e}``; the safetensors file holds
    ``<block path>.adapter_{down,up}.{weight,bias}`` for every wrapped block.
    """

    kind = "ffn_adapter"
    config_class = FfnAdapterTrainingConfig

    def prepare(
        self, backbone: Backbone, config: TrainingConfig
    ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        assert isinstance(config, FfnAdapterTrainingConfig)
        parameters = adapter_parameters(add_adapters(backbone.model, config.hidden_size))
        for parameter in parameters:
            parameter.requires_grad_(True)
        return backbone.model, parameters

    def save(
        self, model: torch.nn.Module, backbone: Backbone, config: TrainingConfig, out_dir: Path
    ) -> TrainedExpert:
        assert isinstance(config, FfnAdapterTrainingConfig)
        weights = out_dir / WEIGHTS_FILE
        save_file(
            adapter_state(find_adapters(model)),
            str(weights),
            metadata={"kind": self.kind, "hidden_size": str(config.hidden_size)},
        )
        return TrainedExpert(weights, {"kind": self.kind, "hidden_size": config.hidden_size}, {})

    def restore(self, model: torch.nn.Module, backbone: Backbone) -> None:
        remove_adapters(backbone.model)

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
