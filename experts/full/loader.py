"""Fully fine-tuned experts on a backbone: θ_pre + τ applied in place, and θ_pre read back from disk (exact, where
subtracting τ again would not be)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from elmreg.experts.base import KindLoader
from elmreg.experts.full.task_vector import apply_task_vector, restore_pretrained
from elmreg.models.backbones import Backbone
from elmreg.registry.kinds import FULL


class FullLoader(KindLoader):
    """``config`` of a full expert: ``{"kind": "full", "format": "task_vector"}``."""

    kind = FULL.name

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        apply_task_vector(backbone.model, weights_path)
        return backbone.model

    def detach(self, backbone: Backbone, model: torch.nn.Module) -> None:
        restore_pretrained(backbone.model, backbone.path)
