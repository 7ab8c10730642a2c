"""What every expert kind's training shares: the training loop and the trainer interface.

A kind (``trainers/<kind>/``) says which parameters it adds or unfreezes (:meth:`ExpertTrainer.prepare`), how it
saves them as one safetensors file (:meth:`~ExpertTrainer.save`), and how it puts the backbone back afterwards
(:meth:`~ExpertTrainer.restore`). The loop here trains it the way the paper does (constant learning rate, several
epochs over K sampled examples), seeded and reproducible, with the loss on target tokens only. The kind's
options are declared in ``registry.kinds``; putting a saved expert on a backbone is ``experts.load_expert``.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from elmreg.models.backbones import Backbone
from elmreg.models.encoding import encode, target_token_loss
from elmreg.registry.errors import ConfigurationError, UserError
from elmreg.registry.kinds import ExpertKind, TrainingConfig, get_expert_kind
from elmreg.registry.progress import SILENT, Reporter


class Example(Protocol):
    """What training reads from an example (``elmreg.data.prompts.PromptedExample`` has it)."""

    @property
    def input(self) -> str: ...

    @property
    def target(self) -> str: ...


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
    """Trains experts of one kind.

    Public API: :meth:`make_config`, :meth:`train`. Subclasses implement :meth:`prepare`, :meth:`save` and
    :meth:`restore` (and :meth:`initialise` if the kind declares ``warm_start``).
    """

    kind: ClassVar[str]

    @property
    def spec(self) -> ExpertKind:
        """The kind's declaration (options, weights file, ...)."""
        return get_expert_kind(self.kind)

    @property
    def config_class(self) -> type[TrainingConfig]:
        return self.spec.config_class

    def make_config(self, values: dict[str, Any] | None = None) -> TrainingConfig:
        """This kind's config from JSON values (defaults for what is missing).

        Raises:
            ConfigurationError: Unknown keys or invalid values.
        """
        return self.spec.make_config(values)

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
        """Write the trained parameters to ``out_dir / spec.weights_file`` and return it (metrics empty)."""

    @abstractmethod
    def restore(self, model: torch.nn.Module, backbone: Backbone) -> None:
        """Return the backbone to its pre-trained state after training (a worker reuses it)."""

    def initialise(self, model: torch.nn.Module, weights_path: Path) -> None:
        """Overwrite the freshly prepared trainable parameters with a saved expert's (``init_from``).

        Raises:
            ConfigurationError: The kind does not support it, or the weights do not fit the prepared model.
        """
        raise ConfigurationError(f"{self.kind} experts cannot start from another expert (init_from)")

    # -- the shared loop -----------------------------------------------------------------------------------
    def train(
        self,
        backbone: Backbone,
        examples: Sequence[Example],
        config: TrainingConfig,
        out_dir: Path | None = None,
        *,
        seed: int | None = None,
        progress: Reporter = SILENT,
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
            progress: Told of the training steps as one counted step ("training"), with the running loss.
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
        backbone.release()  # an adapter pool sharing the backbone takes its experts off first
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
        progress: Reporter,
        should_stop: Callable[[], None] | None,
    ) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        # Its own generator, so that example order depends on the seed alone, not on what else drew numbers.
        order_rng = random.Random(config.seed)
        batches_per_epoch = -(-len(examples) // config.batch_size)
        total_steps = batches_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        step, step_losses, epoch_losses = 0, [], []
        tokens = target_tokens = 0
        started = time.perf_counter()
        model.train()
        progress.start("training", total_steps)
        try:
            for _ in range(config.epochs):
                if step >= total_steps:  # max_steps reached
                    break
                order = list(range(len(examples)))
                order_rng.shuffle(order)
                epoch_total, epoch_steps = 0.0, 0
                for start in range(0, len(order), config.batch_size):
                    if step >= total_steps:
                        break
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
                    epoch_steps += 1
                    tokens += int(batch.attention_mask.sum()) + (
                        int((batch.labels != -100).sum()) if backbone.family == "seq2seq" else 0
                    )
                    target_tokens += int((batch.labels != -100).sum())
                    progress.advance(step, detail=f"loss {value:.4f}")
                epoch_losses.append(round(epoch_total / epoch_steps, 5))
        finally:
            progress.finish()
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
