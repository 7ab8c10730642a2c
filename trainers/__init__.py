"""Training experts: one sub-package per expert kind (``lora``, ``ffn_adapter``, ``full``) and the pipeline from a
registered task to a ready expert. The kinds themselves are declared in ``registry.kinds``."""

from __future__ import annotations

from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds import get_expert_kind
from elmreg.registry.kinds.kind import import_object
from elmreg.trainers.base import ExpertTrainer, TrainedExpert


def get_trainer(kind: str) -> ExpertTrainer:
    """The trainer of an expert kind, imported from the kind's declaration.

    Args:
        kind: A trainable kind (``registry.kinds.trainable_kinds()``).

    Raises:
        ConfigurationError: Unknown kind, or a declaration that names no trainer of that kind.
    """
    trainer_class = import_object(get_expert_kind(kind).trainer)
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, ExpertTrainer)):
        raise ConfigurationError(f"kind {kind}: {trainer_class!r} is not an ExpertTrainer")
    if trainer_class.kind != kind:
        raise ConfigurationError(f"kind {kind}: its trainer is declared for kind {trainer_class.kind}")
    return trainer_class()


__all__ = ["ExpertTrainer", "TrainedExpert", "get_trainer"]
