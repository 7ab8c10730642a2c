"""What every expert kind shares: the training configuration, the training loop, and the trainer interface.

A kind (``trainers/<kind>/``) says which parameters it adds or unfreezes (:meth:`ExpertTrainer.prepare`), how it
saves them as one safetensors file (:meth:`~ExpertTrainer.save`), and how it puts a saved expert on a loaded
backbone and takes it off again (:meth:`~ExpertTrainer.attach`, :meth:`~ExpertTrainer.detach`). The loop here
trains it the way the paper does (constant learning rate, several epochs over K sampled examples), seeded and
reproducible, with the loss on target tokens only.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from elmreg.registry.backbones import Backbone
from elmreg.registry.encoding import encode, target_token_loss
from elmreg.registry.errors import ArtifactError, ConfigurationError, UserError

# progress(step, total_steps, loss): called after every optimiser step.
ProgressCallback = Callable[[int, int, float], None]


class Example(Protocol):
    """What training reads from an example (``elmreg.registry.prompts.PromptedExample`` has it)."""

    @property
    def input(self) -> str: ...

    @property
    def target(self) -> str: ...


@dataclass
class TrainingConfig:
    """Hyper-parameters common to all kinds; defaults follow the paper (5 epochs, constant LR 1e-4, AdamW)."""

    epochs: int = field(default=5, metadata={"help": "Passes over the task's sampled examples."})
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


@dataclass
class TrainedExpert:
    """The result of training.

    Attributes:
        weights_path: The one safetensors file holding the expert.
        config: JSON-serialisable; with the weights it is enough to rebuild the expert (``kind`` plus the kind's
            own fields, and the fingerprint of the backbone it was trained on).
        metrics: Loss per step and per epoch, steps, examples, seconds, tokens per second.
    """

    weights_path: Path
    config: dict[str, Any]
    metrics: dict[str, Any]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class ExpertTrainer(ABC):
    """One expert kind: trains experts, and loads saved ones onto a backbone and off again.

    Public API: :meth:`make_config`, :meth:`train`, :meth:`load_expert`, :meth:`unload`. Subclasses implement
    :meth:`prepare`, :meth:`save`, :meth:`restore`, :meth:`attach` and :meth:`detach`.
    """

    kind: ClassVar[str]
    config_class: ClassVar[type[TrainingConfig]] = TrainingConfig
    # Whether ``init_from`` (training that starts from a saved expert's weights) is implemented for the kind.
    supports_warm_start: ClassVar[bool] = False

    def make_config(self, values: dict[str, Any] | None = None) -> TrainingConfig:
        """This kind's config from JSON values (defaults for what is missing).

        Raises:
            ConfigurationError: Unknown keys or invalid values.
        """
        config = self.config_class.from_dict(values or {})
        if config.init_from is not None and not self.supports_warm_start:
            raise ConfigurationError(f"{self.kind} experts cannot start from another expert (init_from)")
        return config

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
        """Return the backbone to its pre-trained state after training (a worker reuses it)."""

    @abstractmethod
    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        """Put a saved expert on the backbone; return the model to run."""

    @abstractmethod
    def detach(self, backbone: Backbone, model: torch.nn.Module) -> None:
        """Take the expert off again, leaving the backbone exactly as it was."""

    def initialise(self, model: torch.nn.Module, weights_path: Path) -> None:
        """Overwrite the freshly prepared trainable parameters with a saved expert's (``init_from``).

        Raises:
            ConfigurationError: The kind does not support it, or the weights do not fit the prepared model.
        """
        raise ConfigurationError(f"{self.kind} experts cannot start from another expert (init_from)")

    # -- loading saved experts -----------------------------------------------------------------------------
    def load_expert(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        """Put a saved expert on an already loaded backbone (no reload); undo with :meth:`unload`.

        Args:
            backbone: The backbone the expert was trained on, with no other expert loaded.
            weights_path: The expert's safetensors file.
            config: :attr:`TrainedExpert.config` as saved.

        Returns:
            The model to run (for ``lora`` a ``PeftModel`` around ``backbone.model``; otherwise
            ``backbone.model`` itself, changed in place).

        Raises:
            UserError: Another expert is loaded on the backbone.
            ConfigurationError: The config is of another kind.
            ArtifactError: The expert was trained on another backbone, or its weights do not fit this one.
        """
        if backbone.active_expert is not None:
            raise UserError(
                f"a {backbone.active_expert} expert is already loaded on backbone {backbone.name}; unload it first"
            )
        if config.get("kind") != self.kind:
            raise ConfigurationError(f"expert config is of kind '{config.get('kind')}', not '{self.kind}'")
        trained_on = config.get("backbone_fingerprint")
        if trained_on is not None and trained_on != backbone.fingerprint:
            raise ArtifactError(
                f"expert {weights_path.name} was trained on backbone {config.get('backbone')} ({trained_on}), "
                f"not on {backbone.name} ({backbone.fingerprint})"
            )
        model = self.attach(backbone, weights_path, config)
        backbone.active_expert = self.kind
        return model

    def unload(self, backbone: Backbone, model: torch.nn.Module) -> None:
        """Take the expert that :meth:`load_expert` returned as ``model`` off the backbone.

        Afterwards the backbone computes exactly what it computed before the expert was loaded.
        """
        self.detach(backbone, model)
        backbone.active_expert = None

    # -- the shared loop -----------------------------------------------------------------------------------
    def train(
        self,
        backbone: Backbone,
        examples: Sequence[Example],
        config: TrainingConfig,
        out_dir: Path | None = None,
        *,
        seed: int | None = None,
        progress: ProgressCallback | None = None,
        should_stop: Callable[[], None] | None = None,
        init_weights: Path | None = None,
    ) -> TrainedExpert:
        """Train an expert of this kind on ``examples``; the backbone is left as it was.

        Args:
            backbone: A loaded backbone with no expert on it.
            examples: Rendered examples (``input``, ``target``); the loss covers the target tokens only.
            config: This kind's config (see :meth:`make_config`).
            out_dir: Where the weights file is written; a new temporary folder (the caller's to remove) if
                ``None``.
            seed: Overrides ``config.seed``. The same seed, examples and config give identical weights.
            progress: Called after every step with (step, total_steps, loss).
            should_stop: Called between steps; raises to abort (the worker's lease check).
            init_weights: A saved expert's weights file to start from (continual fine-tuning); the pipeline
                resolves ``config.init_from`` to it.

        Returns:
            The weights file, the config to rebuild the expert, and the training metrics.

        Raises:
            ConfigurationError: No examples, or a config of another kind.
            UserError: An expert is loaded on the backbone.
        """
        if not examples:
            raise ConfigurationError("cannot train an expert on zero examples")
        if not isinstance(config, self.config_class):
            raise ConfigurationError(f"a {self.kind} expert needs a {self.config_class.__name__}")
        if backbone.active_expert is not None:
            raise UserError(
                f"unload the {backbone.active_expert} expert from {backbone.name} before training"
            )
        if seed is not None and seed != config.seed:
            config = dataclasses.replace(config, seed=seed)
        out_dir = Path(tempfile.mkdtemp(prefix=f"elmreg-{self.kind}-")) if out_dir is None else out_dir
        seed_everything(config.seed)
        model, parameters = self.prepare(backbone, config)
        try:
            if init_weights is not None:
                self.initialise(model, init_weights)
            metrics = self._loop(model, parameters, backbone, examples, config, progress, should_stop)
            out_dir.mkdir(parents=True, exist_ok=True)
            trained = self.save(model, backbone, config, out_dir)
        finally:
            self.restore(model, backbone)
        trained.config.update(
            {"backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint, "seed": config.seed}
        )
        trained.metrics = metrics
        return trained

    def _loop(
        self,
        model: torch.nn.Module,
        parameters: list[torch.nn.Parameter],
        backbone: Backbone,
        examples: Sequence[Example],
        config: TrainingConfig,
        progress: ProgressCallback | None,
        should_stop: Callable[[], None] | None,
    ) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        # Its own generator, so that example order depends on the seed alone, not on what else drew numbers.
        order_rng = random.Random(config.seed)
        batches_per_epoch = -(-len(examples) // config.batch_size)
        total_steps = batches_per_epoch * config.epochs
        step, step_losses, epoch_losses = 0, [], []
        tokens = target_tokens = 0
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
                    step_losses.append(round(value, 5))
                    epoch_total += value
                    tokens += int(batch.attention_mask.sum()) + (
                        int((batch.labels != -100).sum()) if backbone.family == "seq2seq" else 0
                    )
                    target_tokens += int((batch.labels != -100).sum())
                    if progress is not None:
                        progress(step, total_steps, value)
                epoch_losses.append(round(epoch_total / batches_per_epoch, 5))
        finally:
            model.eval()
        seconds = time.perf_counter() - started
        return {
            "steps": step,
            "examples": len(examples),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "loss_per_step": step_losses,
            "loss_per_epoch": epoch_losses,
            "final_loss": epoch_losses[-1],
            "seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / step, 4),
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "target_tokens_per_second": round(target_tokens / seconds, 1) if seconds else None,
            "trainable_parameters": sum(p.numel() for p in parameters),
        }
