"""LoRA experts (PEFT), stored in PEFT's own format: their options and their declaration."""

from __future__ import annotations

from dataclasses import dataclass, field

from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds.config import TrainingConfig
from elmreg.registry.kinds.kind import ExpertKind, register_expert_kind


@dataclass
class LoraTrainingConfig(TrainingConfig):
    """The common hyper-parameters plus PEFT's LoRA settings."""

    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: int = field(
        default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={
            "help": "Modules to adapt: 'all-linear' (every linear layer but the LM head) or a list of names."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigurationError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigurationError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigurationError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list | tuple):
            if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
                raise ConfigurationError(
                    "LoRA target_modules must be 'all-linear' or a non-empty list of names"
                )
            self.target_modules = list(self.target_modules)
        elif not isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigurationError("LoRA target_modules must be 'all-linear' or a non-empty list of names")


LORA = register_expert_kind(
    ExpertKind(
        name="lora",
        config_class=LoraTrainingConfig,
        trainer="elmreg.trainers.lora:LoraTrainer",
        loader="elmreg.experts.lora:LoraLoader",
        weights_file="adapter_model.safetensors",
        merge="lora_factors",
        mixable=True,
        warm_start=True,
    )
)
