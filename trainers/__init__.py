"""Expert kinds (one sub-package each) and the worker that trains queued tasks."""

from __future__ import annotations

from elmreg.registry.errors import ConfigurationError
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig


def get_trainer(kind: str) -> ExpertTrainer:
    """The trainer of an expert kind: ``lora``, ``ffn_adapter`` or ``full``."""
    # Imported here so that `import elmreg.trainers` stays light until a kind is actually used.
    from elmreg.trainers.ffn_adapter import FfnAdapterTrainer
    from elmreg.trainers.full import FullTrainer
    from elmreg.trainers.lora import LoraTrainer

    trainers = {t.kind: t for t in (LoraTrainer, FfnAdapterTrainer, FullTrainer)}
    if kind not in trainers:
        raise ConfigurationError(f"unknown expert kind '{kind}'; choose one of {', '.join(trainers)}")
    return trainers[kind]()


__all__ = ["ExpertTrainer", "TrainedExpert", "TrainingConfig", "get_trainer"]
