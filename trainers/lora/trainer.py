"""LoRA experts through PEFT, stored in PEFT's own format.

The artifact is PEFT's ``adapter_model.safetensors``; the expert's config holds the ``adapter_config.json``
content, so :func:`export_peft_folder` rebuilds a folder that plain ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from elmreg.registry.backbones import Backbone
from elmreg.trainers.base import ExpertTrainer, TrainedExpert, TrainingConfig
from elmreg.trainers.lora.config import LoraTrainingConfig

ADAPTER_NAME = "default"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class LoraTrainer(ExpertTrainer):
    kind = "lora"
    config_class = LoraTrainingConfig

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
        model = get_peft_model(backbone.model, peft_config)
        return model, [p for p in model.parameters() if p.requires_grad]

    def save(self, model, backbone: Backbone, config: TrainingConfig, out_dir: Path) -> TrainedExpert:
        folder = out_dir / "peft"
        model.save_pretrained(folder, safe_serialization=True)
        adapter_config = json.loads((folder / CONFIG_FILE).read_text())
        # The backbone is recorded by the catalogue; a local cache path here would not travel with the expert.
        adapter_config["base_model_name_or_path"] = backbone.name
        weights = out_dir / WEIGHTS_FILE
        shutil.move(folder / WEIGHTS_FILE, weights)
        shutil.rmtree(folder)
        return TrainedExpert(weights, {"kind": self.kind, "adapter_config": adapter_config}, {})

    def restore(self, model, backbone: Backbone) -> None:
        # unload() removes the LoRA layers without merging them: the backbone's modules are its own again.
        backbone.model = model.unload()
        backbone.model.eval()
        backbone.model.requires_grad_(False)

    def attach(self, backbone: Backbone, weights_path: Path, config: dict[str, Any]) -> torch.nn.Module:
        folder = weights_path.parent / (weights_path.name + ".peft")
        export_peft_folder(weights_path, config, folder)
        return PeftModel.from_pretrained(
            backbone.model, folder, adapter_name=ADAPTER_NAME, is_trainable=False
        )

    def detach(self, backbone: Backbone, model) -> None:
        self.restore(model, backbone)


def export_peft_folder(weights_path: Path, config: dict[str, Any], out_dir: Path) -> Path:
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for an expert."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(config["adapter_config"], indent=2))
    target = out_dir / WEIGHTS_FILE
    if not target.exists() or target.stat().st_size != weights_path.stat().st_size:
        shutil.copyfile(weights_path, target)
    return out_dir
