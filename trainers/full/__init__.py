"""Fully fine-tuned experts stored as task vectors."""

from elmreg.trainers.full.config import FullTrainingConfig
from elmreg.trainers.full.trainer import FullTrainer

__all__ = ["FullTrainer", "FullTrainingConfig"]
