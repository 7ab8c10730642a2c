"""Expert kinds (one sub-package each: ``lora``, ``ffn_adapter``, ``full``) and the worker that trains them."""

from __future__ import annotations

from elmreg.registry.errors import ConfigurationError
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig

KINDS = ("lora", "ffn_adapter", "full")


def _trainer_classes() -> dict[str, type[ExpertTrainer]]:
    # Imported here so that `import elmreg.trainers` does not pull in PEFT until a kind is used.
    from elmreg.trainers.ffn_adapter import FfnAdapterTrainer
    from elmreg.trainers.full import FullTrainer
    from elmreg.trainers.lora import LoraTrainer

    return {cls.kind: cls for cls in (LoraTrainer, FfnAdapterTrainer, FullTrainer)}


def get_trainer(kind: str) -> ExpertTrainer:
    """The trainer of an expert kind.

    Args:
        kind: ``lora``, ``ffn_adapter`` or ``full``.

    Raises:
        ConfigurationError: Unknown kind.
    """
    classes = _trainer_classes()
    if kind not in classes:
        raise ConfigurationError(f"unknown expert kind '{kind}'; choose one of {', '.join(KINDS)}")
    return classes[kind]()


__all__ = ["KINDS", "ExpertTrainer", "TrainedExpert", "TrainingConfig", "get_trainer"]
