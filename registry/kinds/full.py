"""Fully fine-tuned experts, stored as task vectors: their options and their declaration."""

from __future__ import annotations

from dataclasses import dataclass

from elmreg.registry.kinds.config import TrainingConfig
from elmreg.registry.kinds.kind import ExpertKind, register_expert_kind


@dataclass
class FullTrainingConfig(TrainingConfig):
    """Full fine-tuning uses the common hyper-parameters only (every backbone weight is trained)."""


FULL = register_expert_kind(
    ExpertKind(
        name="full",
        config_class=FullTrainingConfig,
        trainer="elmreg.trainers.full:FullTrainer",
        loader="elmreg.experts.full:FullLoader",
        weights_file="task_vector.safetensors",
        merge="tensors",
        merge_config=("format",),
    )
)
