"""Fully fine-tuned experts (the paper's Dataset Experts), stored as task vectors τ = θ_fine-tuned − θ_pre."""

from elmreg.trainers.full.config import FullTrainingConfig
from elmreg.trainers.full.trainer import FullTrainer

__all__ = ["FullTrainer", "FullTrainingConfig"]
