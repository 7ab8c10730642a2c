"""Fully fine-tuned experts, stored as task vectors.

Training unfreezes every weight of the backbone. The expert is saved as τ = θ_d − θ_pre, streamed tensor by
tensor with θ_pre read lazily from the backbone's own safetensors files, so saving never holds a second copy
of the model; afterwards θ_pre is copied back from those files, which is exact where subtracting τ again would
not be.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from elmreg.experts.full.task_vector import restore_pretrained, trainable_entries, write_task_vector
from elmreg.models.backbones import Backbone
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds import FULL, FullTrainingConfig, TrainingConfig
from elmreg.trainers.base import ExpertTrainer, TrainedExpert


def _saved_tensor_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            names.update(handle.keys())
    return names


class FullTrainer(ExpertTrainer):
    """Full fine-tuning; the expert is a task vector over every parameter.

    ``config`` of a trained expert: ``{"kind": "full", "format": "task_vector"}``.
    """

    kind = FULL.name

    def prepare(
        self, backbone: Backbone, config: TrainingConfig
    ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        assert isinstance(config, FullTrainingConfig)
        # Checked before training rather than after it: θ_pre must be readable from disk to save τ and to put
        # the backbone back, and a checkpoint with renamed or missing tensors would only fail at the end.
        missing = {name for name, _ in trainable_entries(backbone.model)} - _saved_tensor_names(backbone.path)
        if missing:
            raise ConfigurationError(
                f"backbone {backbone.name} cannot be fully fine-tuned: {len(missing)} of its parameters "
                f"(e.g. {sorted(missing)[0]}) are not in the safetensors files under {backbone.path}"
            )
        backbone.model.requires_grad_(True)
        return backbone.model, [p for _, p in trainable_entries(backbone.model)]

    def save(
        self, model: torch.nn.Module, backbone: Backbone, config: TrainingConfig, out_dir: Path
    ) -> TrainedExpert:
        weights = out_dir / FULL.weights_file
        write_task_vector(model, backbone.path, weights)
        return TrainedExpert(weights, {"kind": self.kind, "format": "task_vector"}, {})

    def restore(self, model: torch.nn.Module, backbone: Backbone) -> None:
        backbone.model.requires_grad_(False)
        restore_pretrained(backbone.model, backbone.path)
