"""Training LoRA experts through PEFT, saved in PEFT's own format (see ``experts.lora`` for loading them).

The artifact is PEFT's ``adapter_model.safetensors``; the expert's config holds the ``adapter_config.json``
content, so ``experts.lora.export_peft_folder`` rebuilds a folder that plain ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from elmreg.experts.lora import ADAPTER_NAME, CONFIG_FILE, LoraLoader
from elmreg.models.backbones import Backbone
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds import LORA, LoraTrainingConfig, TrainingConfig
from elmreg.trainers.base import ExpertTrainer, TrainedExpert


class LoraTrainer(ExpertTrainer):
    """LoRA on every linear layer (by default) of a frozen backbone.

    ``config`` of a trained expert: ``{"kind": "lora", "adapter_config": <adapter_config.json content>}``.
    """

    kind = LORA.name

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
            weights = out_dir / LORA.weights_file
            shutil.move(staging / LORA.weights_file, weights)
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
        # Taking the adapter off is the same after training as after loading a saved expert.
        LoraLoader().detach(backbone, model)
