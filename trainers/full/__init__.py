"""Training fully fine-tuned experts (the paper's Dataset Experts), saved as task vectors τ = θ_fine-tuned − θ_pre."""

from elmreg.trainers.full.trainer import FullTrainer

__all__ = ["FullTrainer"]
