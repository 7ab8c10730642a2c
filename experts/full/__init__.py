"""Fully fine-tuned experts (the paper's Dataset Experts), stored as task vectors τ = θ_fine-tuned − θ_pre."""

from elmreg.experts.full.loader import FullLoader

__all__ = ["FullLoader"]
