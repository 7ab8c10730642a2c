"""Training and loading of parallel FFN adapter experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from elmreg.registry.backbones import Backbone
from elmreg.registry.errors import ArtifactError
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig
from elmreg.trainers.ffn_adapter.config import FfnAdapterTrainingConfig
from elmreg.trainers.ffn_adapter.model import adapter_state, add_adapters, remove_adapters

WEIGHTS_FILE = "ffn_adapter.safetensors"


class FfnAdapterTrainer(ExpertTrainer):
    kind = "ffn_adapter"
    config_class = FfnAdapterTrainingConfig

    def prepare(
        self, backbone: Backbone, config: TrainingConfig
    ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        assert isinstance(config, FfnAdapterTrainingConfig)
        adapters = add_adapters(backbone.model, config.hidden_size)
        parameters = []
        for wrapper in adapters.values():
            for name, parameter in wrapper.named_parameters():
                if name.startswith("adapter_"):
                    parameter.requires_grad_(True)
                    parameters.append(parameter)
        self._adapters = adapters
        return backbone.model, parameters

    def save(self, model, backbone: Backbone, config: TrainingConfig, out_dir: Path) -> TrainedExpert:
        assert isinstance(config, FfnAdapterTrainingConfig)
        weights = out_dir / WEIGHTS_FILE
        save_file(adapter_state(self._adapters), str(weights), metadata={"kind": self.kind})
        return TrainedExpert(weights, {"kind": self.kind, "hidden_size": config.hidden_size}, {})

    def restore(self, model, backbone: Backbone) -> None:
        remove_adapters(backbone.model)
        self._adapters = {}

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        state = load_file(str(weights_path), device=str(backbone.device))
        adapters = add_adapters(backbone.model, int(config["hidden_size"]))
        expected = set(adapter_state(adapters))
        if set(state) != expected:
            remove_adapters(backbone.model)
            raise ArtifactError(
                f"{weights_path.name} does not fit this backbone ({len(set(state) ^ expected)} tensors differ)"
            )
        for path, wrapper in adapters.items():
            prefix = path + "."
            wrapper.load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=False
            )
            wrapper.requires_grad_(False)
        return backbone.model

    def detach(self, backbone: Backbone, model) -> None:
        remove_adapters(backbone.model)
