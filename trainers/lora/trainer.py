"""LoRA experts through PEFT, stored in PEFT's own format.

The artifact is PEFT's ``adapter_model.safetensors``; the expert's config holds the ``adapter_config.json``
content, so :func:`export_peft_folder` rebuilds a folder that plain ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from elmreg.registry.backbones import Backbone
from elmreg.registry.errors import ConfigurationError
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig
from elmreg.trainers.lora.config import LoraTrainingConfig

# peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` on every wrap: a warning users can
# do nothing about, printed in the middle of progress bars.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ADAPTER_NAME = "default"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class LoraTrainer(ExpertTrainer):
    """LoRA on every linear layer (by default) of a frozen backbone.

    ``config`` of a trained expert: ``{"kind": "lora", "adapter_config": <adapter_config.json content>}``.
    """

    kind = "lora"
    config_class = LoraTrainingConfig
    supports_warm_start = True

    def prepare(
        self, backbone: Backbone, config: TrainingConfig
    ) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
        assert isinstance(config, LoraTrainingConfig)
        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            task_type="SEQ_2_SEQ_LM" if backbone.family == "seq2seq" else "CAUSAL_LM",
        )
        model = get_peft_model(backbone.model, peft_config, adapter_name=ADAPTER_NAME)
        return model, [p for p in model.parameters() if p.requires_grad]

    def save(
        self, model: torch.nn.Module, backbone: Backbone, config: TrainingConfig, out_dir: Path
    ) -> TrainedExpert:
        staging = Path(tempfile.mkdtemp(prefix=".peft-", dir=out_dir))
        try:
            model.save_pretrained(staging, safe_serialization=True)
            adapter_config = json.loads((staging / CONFIG_FILE).read_text())
            weights = out_dir / WEIGHTS_FILE
            shutil.move(staging / WEIGHTS_FILE, weights)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # The catalogue records the backbone; a local cache path here would not travel with the expert.
        adapter_config["base_model_name_or_path"] = backbone.name
        return TrainedExpert(weights, {"kind": self.kind, "adapter_config": adapter_config}, {})

    def initialise(self, model: torch.nn.Module, weights_path: Path) -> None:
        state = load_file(str(weights_path))
        try:
            result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        except RuntimeError as exc:  # size mismatches: another rank or other target modules
            raise ConfigurationError(
                f"the init_from expert's LoRA weights do not fit this task's LoRA config: {str(exc)[:300]}"
            ) from exc
        # A silently half-loaded adapter would train from a mix of old and fresh weights: refuse it.
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ConfigurationError(
                "the init_from expert's LoRA weights do not fit this task's LoRA config "
                f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors); "
                "use the same rank and target_modules"
            )

    def restore(self, model: torch.nn.Module, backbone: Backbone) -> None:
        # unload() swaps every LoRA layer back for the module it wrapped, without merging: the backbone's
        # modules (the very same objects) and weights are untouched.
        backbone.model = model.unload()
        backbone.model.eval()
        backbone.model.requires_grad_(False)

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        if "adapter_config" not in config:
            raise ConfigurationError("a lora expert's config needs its 'adapter_config'")
        # PEFT loads from a folder; a temporary one that links to the weights avoids copying them, and keeps
        # the folder holding the weights (perhaps a read-only cache) untouched.
        with tempfile.TemporaryDirectory(prefix="elmreg-lora-") as folder:
            export_peft_folder(weights_path, config, Path(folder), link=True)
            return PeftModel.from_pretrained(
                backbone.model,
                folder,
                adapter_name=ADAPTER_NAME,
                is_trainable=False,
                # Creates the LoRA layers empty instead of randomly initialising them only to overwrite them
                # (which would also draw from torch's global random generator).
                low_cpu_mem_usage=True,
            )

    def detach(self, backbone: Backbone, model: torch.nn.Module) -> None:
        self.restore(model, backbone)


def export_peft_folder(
    weights_path: Path, config: dict[str, Any], out_dir: Path, *, link: bool = False
) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for a LoRA expert.

    Args:
        weights_path: The expert's ``adapter_model.safetensors``.
        config: The expert's config (``TrainedExpert.config`` or the catalogue's copy of it).
        out_dir: The folder to write (created if missing).
        link: Symlink the weights instead of copying them (falls back to a copy where links are not allowed).

    Returns:
        ``out_dir``, which ``PeftModel.from_pretrained(base_model, out_dir)`` loads.

    Raises:
        ConfigurationError: ``config`` is not a LoRA expert's.
    """
    adapter_config = config.get("adapter_config")
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        raise ConfigurationError("not a LoRA expert's config (it needs a PEFT 'adapter_config' of type LORA)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    target = out_dir / WEIGHTS_FILE
    if target.is_symlink() or target.exists():
        target.unlink()
    if link:
        try:
            target.symlink_to(weights_path.resolve())
            return out_dir
        except OSError:
            pass
    shutil.copyfile(weights_path, target)
    return out_dir
