"""Configuration of the paper's parallel feed-forward adapters."""

from __future__ import annotations

from dataclasses import dataclass, field

from elmreg.registry.errors import ConfigurationError
from elmreg.trainers.base import TrainingConfig


@dataclass
class FfnAdapterTrainingConfig(TrainingConfig):
    """The common hyper-parameters plus the adapter's width."""

    hidden_size: int = field(
        default=64, metadata={"help": "Hidden size e of each adapter FFN_e (one per transformer layer)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size < 1:
            raise ConfigurationError(f"adapter hidden_size must be at least 1, got {self.hidden_size}")
