"""What every expert kind shares: the training configuration, the training loop, and the trainer interface.

A kind (``trainers/<kind>/``) says which parameters it adds or unfreezes, how it saves them as one safetensors
file, and how it puts a saved expert on a loaded backbone and takes it off again. The loop here trains it the
way the paper does (constant learning rate, several epochs over K sampled examples), seeded and reproducible.
"""

from __future__ import annotations

import dataclasses
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from elmreg.registry.backbones import Backbone
from elmreg.registry.encoding import encode, target_token_loss
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.prompts import PromptedExample

# progress(step, total_steps, loss)
ProgressCallback = Callable[[int, int, float], None]


@dataclass
class TrainingConfig:
    """Hyper-parameters common to all kinds; defaults follow the paper (5 epochs, constant LR 1e-4)."""

    epochs: int = field(default=5, metadata={"help": "Passes over the task's sampled examples."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Constant AdamW learning rate."})
    batch_size: int = field(default=8, metadata={"help": "Examples per optimiser step."})
    max_source_length: int = field(
        default=256, metadata={"help": "Input tokens kept (the end of the prompt)."}
    )
    max_target_length: int = field(default=64, metadata={"help": "Target tokens kept."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    seed: int = field(default=0, metadata={"help": "Seeds initialisation, shuffling and dropout."})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigurationError(f"epochs must be at least 1, got {self.epochs}")
        if not 0 < self.learning_rate < 1:
            raise ConfigurationError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.batch_size < 1:
            raise ConfigurationError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.max_source_length < 1 or self.max_target_length < 1:
            raise ConfigurationError("max_source_length and max_target_length must be positive")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build from JSON (e.g. a task's training_config); unknown keys are a ConfigurationError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigurationError(
                f"unknown {cls.__name__} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainedExpert:
    """The result of training: one weights file, the config to rebuild the expert, and training metrics."""

    weights_path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class ExpertTrainer(ABC):
    """One expert kind."""

    kind: ClassVar[str]
    config_class: ClassVar[type[TrainingConfig]] = TrainingConfig

    def make_config(self, values: dict[str, Any] | None = None) -> TrainingConfig:
        return self.config_class.from_dict(values or {})

    # -- what a kind implements ----------------------------------------------------------------------------
    @abstractmethod
    def prepare(
        self, backbone: Backbone, config: TrainingConfig
    ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        """Add (or unfreeze) the trainable parameters; return the model to train and those parameters."""

    @abstractmethod
    def save(
        self, model: torch.nn.Module, backbone: Backbone, config: TrainingConfig, out_dir: Path
    ) -> TrainedExpert:
        """Write the trained parameters to one safetensors file in ``out_dir`` and return it (metrics empty)."""

    @abstractmethod
    def restore(self, model: torch.nn.Module, backbone: Backbone) -> None:
        """Return the backbone to its pre-trained state after training (the worker reuses it)."""

    @abstractmethod
    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        """Put a saved expert on the backbone; returns the model to run. Undo with :meth:`detach`."""

    @abstractmethod
    def detach(self, backbone: Backbone, model: torch.nn.Module) -> None:
        """Take the expert off again, leaving the backbone exactly as it was."""

    # -- the shared loop -----------------------------------------------------------------------------------
    def train(
        self,
        backbone: Backbone,
        examples: Sequence[PromptedExample],
        config: TrainingConfig,
        out_dir: Path,
        *,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], None] | None = None,
    ) -> TrainedExpert:
        """Train an expert of this kind on ``examples``.

        Args:
            out_dir: Where the weights file is written.
            progress: Called after every step with (step, total_steps, loss).
            should_stop: Called between steps; raises to abort (the worker's lease check).

        Raises:
            ConfigurationError: No examples.
        """
        if not examples:
            raise ConfigurationError("cannot train an expert on zero examples")
        seed_everything(config.seed)
        model, parameters = self.prepare(backbone, config)
        try:
            metrics = self._loop(model, parameters, backbone, examples, config, progress, should_stop)
            out_dir.mkdir(parents=True, exist_ok=True)
            trained = self.save(model, backbone, config, out_dir)
        finally:
            self.restore(model, backbone)
        trained.metrics = metrics
        return trained

    def _loop(self, model, parameters, backbone, examples, config, progress, should_stop) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        order_rng = random.Random(config.seed)
        batches_per_epoch = (len(examples) + config.batch_size - 1) // config.batch_size
        total = batches_per_epoch * config.epochs
        step, losses, epoch_losses, target_tokens = 0, [], [], 0
        started = time.perf_counter()
        model.train()
        try:
            for _ in range(config.epochs):
                order = list(range(len(examples)))
                order_rng.shuffle(order)
                epoch_total = 0.0
                for start in range(0, len(order), config.batch_size):
                    if should_stop is not None:
                        should_stop()
                    chosen = [examples[i] for i in order[start : start + config.batch_size]]
                    batch = encode(
                        backbone.family,
                        backbone.tokenizer,
                        [e.input for e in chosen],
                        [e.target for e in chosen],
                        max_source_length=config.max_source_length,
                        max_target_length=config.max_target_length,
                    ).to(backbone.device)
                    loss = target_token_loss(model, backbone.family, batch)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                    optimizer.step()
                    step += 1
                    value = float(loss.detach())
                    losses.append(round(value, 5))
                    epoch_total += value
                    target_tokens += int((batch.labels != -100).sum())
                    if progress is not None:
                        progress(step, total, value)
                epoch_losses.append(round(epoch_total / batches_per_epoch, 5))
        finally:
            model.eval()
        seconds = time.perf_counter() - started
        return {
            "steps": step,
            "examples": len(examples),
            "epochs": config.epochs,
            "loss_per_step": losses,
            "loss_per_epoch": epoch_losses,
            "final_loss": epoch_losses[-1],
            "seconds": round(seconds, 2),
            "target_tokens_per_second": round(target_tokens / seconds, 1) if seconds else None,
            "trainable_parameters": sum(p.numel() for p in parameters),
        }
