"""The registry of expert kinds: one declaration per kind (``lora``, ``ffn_adapter``, ``full``).

Light on purpose (no torch, PEFT or transformers): the catalogue's models, task creation and the CLI read it.
"""

# isort: off
# Each module registers its kind on import; this order is the order users see them in (CLI choices, messages).
from elmreg.registry.kinds.lora import LORA, LoraTrainingConfig
from elmreg.registry.kinds.ffn_adapter import FFN_ADAPTER, FfnAdapterTrainingConfig
from elmreg.registry.kinds.full import FULL, FullTrainingConfig

# isort: on
from elmreg.registry.kinds.config import TrainingConfig
from elmreg.registry.kinds.kind import (
    MERGE_FORMATS,
    MERGED_KIND,
    ExpertKind,
    expert_row_kinds,
    get_expert_kind,
    mergeable_kinds,
    register_expert_kind,
    trainable_kinds,
    weights_kind,
)

__all__ = [
    "FFN_ADAPTER",
    "FULL",
    "LORA",
    "MERGED_KIND",
    "MERGE_FORMATS",
    "ExpertKind",
    "FfnAdapterTrainingConfig",
    "FullTrainingConfig",
    "LoraTrainingConfig",
    "TrainingConfig",
    "expert_row_kinds",
    "get_expert_kind",
    "mergeable_kinds",
    "register_expert_kind",
    "trainable_kinds",
    "weights_kind",
]
