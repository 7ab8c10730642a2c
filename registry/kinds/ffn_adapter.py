"""The paper's parallel feed-forward adapter experts: their options and their declaration."""

from __future__ import annotations

from dataclasses import dataclass, field

from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds.config import TrainingConfig
from elmreg.registry.kinds.kind import ExpertKind, register_expert_kind


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


FFN_ADAPTER = register_expert_kind(
    ExpertKind(
        name="ffn_adapter",
        config_class=FfnAdapterTrainingConfig,
        trainer="elmreg.trainers.ffn_adapter:FfnAdapterTrainer",
        loader="elmreg.experts.ffn_adapter:FfnAdapterLoader",
        weights_file="ffn_adapter.safetensors",
        merge="tensors",
        merge_config=("hidden_size",),
    )
)
