"""What an expert kind declares, and the one registry of kinds (in the manner of PEFT's ``register_peft_method``).

Everything that depends on the list of kinds reads it from here: the catalogue's CHECK constraints, task
validation, the CLI's choices, training, loading, merging, the adapter pool and mixed batches. The trainer and
the loader are named by dotted path and imported by the layer that uses them, on first use, so reading the
registry costs no torch import and the registry (the lowest layer) imports nothing above it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds.config import TrainingConfig

# An expert made by merging others: its weights are in its parents' kind's format (its ``base_kind``).
MERGED_KIND = "merged"
# How the experts of a kind merge: their LoRA factors (PEFT's combinations), or their named tensors one by one.
MERGE_FORMATS = ("lora_factors", "tensors")


@dataclass(frozen=True)
class ExpertKind:
    """One kind of expert: its name, options, trainer and loader, whether and how it merges, whether it mixes.

    Attributes:
        name: As stored in ``tasks.expert_kind`` and ``experts.kind``.
        config_class: Its training options; a torch-free dataclass, so that creating a task validates them.
        trainer: ``module:Class`` of its ``elmreg.trainers.base.ExpertTrainer`` (training loop parts).
        loader: ``module:Class`` of its ``elmreg.experts.base.KindLoader`` (puts saved weights on a backbone).
        weights_file: Name of the one safetensors file an expert of the kind is stored as.
        merge: How its experts merge (one of :data:`MERGE_FORMATS`); ``None`` if they cannot be merged.
        merge_config: Config fields that merged parents must share and that the merged expert keeps (its shape).
        mixable: LoRA-style: experts load as named PEFT adapters that stay on the backbone side by side, and one
            batch can run a different one per row (PEFT's ``adapter_names``). Others change the backbone itself,
            so one of them is on it at a time.
        warm_start: Whether training can start from a saved expert's weights (``init_from``).
    """

    name: str
    config_class: type[TrainingConfig]
    trainer: str
    loader: str
    weights_file: str
    merge: str | None = None
    merge_config: tuple[str, ...] = ()
    mixable: bool = False
    warm_start: bool = False

    def __post_init__(self) -> None:
        if self.merge is not None and self.merge not in MERGE_FORMATS:
            raise ConfigurationError(f"kind {self.name}: merge must be one of {', '.join(MERGE_FORMATS)}")
        for field in ("trainer", "loader"):
            if ":" not in getattr(self, field):
                raise ConfigurationError(f"kind {self.name}: {field} must be a 'module:Class' path")

    def make_config(self, values: dict[str, Any] | None = None) -> TrainingConfig:
        """This kind's training config from JSON values (defaults for what is missing).

        Raises:
            ConfigurationError: Unknown keys, invalid values, or ``init_from`` for a kind without warm starts.
        """
        config = self.config_class.from_dict(values or {})
        if config.init_from is not None and not self.warm_start:
            raise ConfigurationError(f"{self.name} experts cannot start from another expert (init_from)")
        return config


_KINDS: dict[str, ExpertKind] = {}


def register_expert_kind(kind: ExpertKind) -> ExpertKind:
    """Add a kind to the registry.

    A kind an expert row can have is also written into the catalogue's CHECK constraints, so a new kind needs a
    migration too (``tests/test_migrations.py`` checks that the constraints equal the registry).

    Raises:
        ConfigurationError: The name is taken, or is the reserved ``merged``.
    """
    if kind.name in _KINDS or kind.name == MERGED_KIND:
        raise ConfigurationError(f"expert kind '{kind.name}' is already registered")
    _KINDS[kind.name] = kind
    return kind


def get_expert_kind(name: str) -> ExpertKind:
    """A registered (trainable) kind by name.

    Raises:
        ConfigurationError: Unknown kind (``merged`` included: merged experts load as their ``base_kind``).
    """
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown expert kind '{name}'; choose one of {', '.join(trainable_kinds())}"
        ) from None


def trainable_kinds() -> tuple[str, ...]:
    """Kinds a task can train (``tasks.expert_kind``), in registration order."""
    return tuple(_KINDS)


def expert_row_kinds() -> tuple[str, ...]:
    """Kinds an expert row can have (``experts.kind``): every trainable kind, and ``merged``."""
    return (*_KINDS, MERGED_KIND)


def mergeable_kinds() -> tuple[str, ...]:
    """Kinds whose experts can be merged."""
    return tuple(name for name, kind in _KINDS.items() if kind.merge is not None)


def weights_kind(expert: Any) -> str:
    """The kind whose format an expert's weights are in: its own kind, or a merged expert's ``base_kind``.

    Args:
        expert: Anything with ``kind``, ``config`` and ``name`` (a catalogue ``Expert``).

    Raises:
        ConfigurationError: A merged expert without a valid ``base_kind`` in its config.
    """
    if expert.kind != MERGED_KIND:
        return expert.kind
    base = expert.config.get("base_kind")
    if base not in mergeable_kinds():
        raise ConfigurationError(
            f"merged expert {expert.name} has no valid 'base_kind' in its config ({base!r})"
        )
    return base


def import_object(path: str) -> Any:
    """The object a ``module:attribute`` path names (a kind's trainer or loader class), imported now.

    Raises:
        ConfigurationError: The module or the attribute does not exist.
    """
    module_name, _, attribute = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot import {path}: {exc}") from exc
