"""Configuration of fully fine-tuned experts (stored as task vectors)."""

from __future__ import annotations

from dataclasses import dataclass

from elmreg.trainers.base import TrainingConfig


@dataclass
class FullTrainingConfig(TrainingConfig):
    """Full fine-tuning uses the common hyper-parameters only (every backbone weight is trained)."""
