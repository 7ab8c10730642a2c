"""The training options every expert kind shares; a kind's own config class adds its fields.

Plain dataclasses without torch: task creation validates a task's options through them (``add-task``, the API,
manifests), and the CLI reads their fields, neither of which should pay for importing the ML stack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from elmreg.registry.errors import ConfigurationError


@dataclass
class TrainingConfig:
    """Hyper-parameters common to all kinds; defaults follow the paper (5 epochs, constant LR 1e-4, AdamW)."""

    epochs: int = field(default=5, metadata={"help": "Passes over the task's sampled examples."})
    max_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many optimiser steps, mid-epoch if need be (default: all the epochs). "
            "For budgets compared at equal steps, e.g. a multitask adapter trained as long as one expert."
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "Constant AdamW learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimiser step."})
    max_source_length: int = field(
        default=256, metadata={"help": "Input tokens kept (the end of the prompt, where the question is)."}
    )
    max_target_length: int = field(default=64, metadata={"help": "Target tokens kept (the start)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(
        default=0,
        metadata={"help": "Seeds initialisation, example order and dropout: same seed, same weights."},
    )
    init_from: int | str | None = field(
        default=None,
        metadata={
            "help": "Expert (id or name) whose weights start training instead of a fresh initialisation: "
            "continual fine-tuning of an existing expert (same kind, backbone and shape; LoRA only)."
        },
    )

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigurationError(f"epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or self.max_steps < 1):
            raise ConfigurationError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0 < self.learning_rate < 1:
            raise ConfigurationError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_source_length < 1 or self.max_target_length < 1:
            raise ConfigurationError(
                f"max_source_length and max_target_length must be positive, got "
                f"{self.max_source_length} and {self.max_target_length}"
            )
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigurationError("weight_decay and max_grad_norm must not be negative")
        if self.init_from is not None and (
            isinstance(self.init_from, bool)
            or not isinstance(self.init_from, int | str)
            or self.init_from == ""
        ):
            raise ConfigurationError(f"init_from must be an expert id or name, got {self.init_from!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build from JSON (e.g. a task's ``training_config``).

        Raises:
            ConfigurationError: An unknown key, or a value out of range.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a string where a number belongs, failing a comparison
            raise ConfigurationError(f"invalid {cls.__name__}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
