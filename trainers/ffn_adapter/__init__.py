"""Training the paper's parallel FFN adapter experts: h = FFN_e(u) + FFN_d(u) + u, only FFN_e trained."""

from elmreg.trainers.ffn_adapter.trainer import FfnAdapterTrainer

__all__ = ["FfnAdapterTrainer"]
