"""Training parallel FFN adapter experts (see ``experts.ffn_adapter`` for the adapter itself and loading it)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from elmreg.experts.ffn_adapter.model import (
    adapter_parameters,
    adapter_state,
    add_adapters,
    find_adapters,
    remove_adapters,
)
from elmreg.models.backbones import Backbone
from elmreg.registry.kinds import FFN_ADAPTER, FfnAdapterTrainingConfig, TrainingConfig
from elmreg.trainers.base import ExpertTrainer, TrainedExpert


class FfnAdapterTrainer(ExpertTrainer):
    """One small FFN per transformer layer, in parallel with the layer's own.

    ``config`` of a trained expert: ``{"kind": "ffn_adapter", "hidden_size": e}``; the safetensors file holds
    ``<block path>.adapter_{down,up}.{weight,bias}`` for every wrapped block.
    """

    kind = FFN_ADAPTER.name

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
        weights = out_dir / FFN_ADAPTER.weights_file
        save_file(
            adapter_state(find_adapters(model)),
            str(weights),
            metadata={"kind": self.kind, "hidden_size": str(config.hidden_size)},
        )
        return TrainedExpert(weights, {"kind": self.kind, "hidden_size": config.hidden_size}, {})

    def restore(self, model: torch.nn.Module, backbone: Backbone) -> None:
        remove_adapters(backbone.model)
