"""Fully fine-tuned experts, stored as task vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from elmreg.registry.backbones import Backbone
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig
from elmreg.trainers.full.config import FullTrainingConfig
from elmreg.trainers.full.task_vector import apply_task_vector, restore_pretrained, write_task_vector

WEIGHTS_FILE = "task_vector.safetensors"


class FullTrainer(ExpertTrainer):
    kind = "full"
    config_class = FullTrainingConfig

    def prepare(
        self, backbone: Backbone, config: TrainingConfig
    ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        backbone.model.requires_grad_(True)
        return backbone.model, [p for _, p in backbone.model.named_parameters()]

    def save(self, model, backbone: Backbone, config: TrainingConfig, out_dir: Path) -> TrainedExpert:
        weights = out_dir / WEIGHTS_FILE
        write_task_vector(model, backbone.path, weights)
        return TrainedExpert(weights, {"kind": self.kind, "format": "task_vector"}, {})

    def restore(self, model, backbone: Backbone) -> None:
        backbone.model.requires_grad_(False)
        restore_pretrained(backbone.model, backbone.path)

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        apply_task_vector(backbone.model, weights_path)
        return backbone.model

    def detach(self, backbone: Backbone, model) -> None:
        restore_pretrained(backbone.model, backbone.path)
