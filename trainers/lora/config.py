"""Configuration of LoRA experts."""

from __future__ import annotations

from dataclasses import dataclass, field

from elmreg.registry.errors import ConfigurationError
from elmreg.trainers.base import TrainingConfig


@dataclass
class LoraTrainingConfig(TrainingConfig):
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: int = field(
        default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | str = field(
        default="all-linear", metadata={"help": "Modules to adapt: 'all-linear' or a list of module names."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigurationError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ConfigurationError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
