"""LoRA experts on a backbone through PEFT, from their stored form: PEFT's ``adapter_model.safetensors``, with the
``adapter_config.json`` content kept in the expert's config, so :func:`export_peft_folder` rebuilds a folder that
plain ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from elmreg.experts.base import AdapterLoader
from elmreg.models.backbones import Backbone
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds import LORA

# peft 0.21 reads transformers 5's deprecated ``is_gradient_checkpointing`` on every wrap: a warning users can
# do nothing about, printed in the middle of progress bars.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ADAPTER_NAME = "default"
CONFIG_FILE = "adapter_config.json"


class LoraLoader(AdapterLoader):
    """``config`` of a LoRA expert: ``{"kind": "lora", "adapter_config": <adapter_config.json content>}``."""

    kind = LORA.name

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> PeftModel:
        return self.add_adapter(None, backbone, weights_path, config, ADAPTER_NAME)

    def add_adapter(
        self,
        model: PeftModel | None,
        backbone: Backbone,
        weights_path: Path,
        config: dict[str, Any],
        adapter_name: str,
    ) -> PeftModel:
        if "adapter_config" not in config:
            raise ConfigurationError("a lora expert's config needs its 'adapter_config'")
        # PEFT loads from a folder; a temporary one that links to the weights avoids copying them, and keeps
        # the folder holding the weights (perhaps a read-only cache) untouched. PEFT reads the weights into
        # memory while loading, so the folder can go right after.
        with tempfile.TemporaryDirectory(prefix="elmreg-lora-") as folder:
            export_peft_folder(weights_path, config, Path(folder), link=True)
            # Not low_cpu_mem_usage: that path (PEFT 0.21) casts the saved float32 adapter to the base layer's
            # dtype and back, so on a bf16 backbone every attached LoRA weight was rounded (up to 1e-3). The
            # normal path initialises the LoRA layers randomly before loading the saved weights over them
            # exactly; forking the generator keeps that draw from changing anyone else's random stream.
            with torch.random.fork_rng(devices=_cuda_devices(backbone)):
                if model is None:
                    return PeftModel.from_pretrained(
                        backbone.model, folder, adapter_name=adapter_name, is_trainable=False
                    )
                model.load_adapter(folder, adapter_name=adapter_name, is_trainable=False)
                return model

    def detach(self, backbone: Backbone, model: PeftModel) -> None:
        # unload() swaps every LoRA layer back for the module it wrapped, without merging: the backbone's
        # modules (the very same objects) and weights are untouched.
        backbone.model = model.unload()
        backbone.model.eval()
        backbone.model.requires_grad_(False)


def _cuda_devices(backbone: Backbone) -> list[int]:
    device = next(backbone.model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


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
    target = out_dir / LORA.weights_file
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
