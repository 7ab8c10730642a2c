"""The paper's parallel FFN adapter experts."""

from elmreg.trainers.ffn_adapter.config import FfnAdapterTrainingConfig
from elmreg.trainers.ffn_adapter.trainer import FfnAdapterTrainer

__all__ = ["FfnAdapterTrainer", "FfnAdapterTrainingConfig"]
