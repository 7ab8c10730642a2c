"""An attached LoRA expert holds exactly the weights that were saved, whatever the backbone's dtype.

PEFT's low-memory loading path casts a float32 adapter to the base layer's dtype and back: on a bf16 backbone
every attached weight came back rounded (up to ~1e-3 on a tiny Gemma 3). Merge tuning and the import fit check
load experts the same way, so they scored rounded experts.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny_models import build_tiny_gemma3
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from elmreg.experts import load_expert, unload_expert
from elmreg.models.backbones import load_backbone


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_attached_lora_weights_equal_the_saved_ones(tmp_path, dtype):
    backbone = load_backbone(
        str(build_tiny_gemma3(tmp_path / "gemma")), cache_dir=tmp_path / "cache", dtype=dtype
    )
    peft_model = get_peft_model(backbone.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    adapter_config = peft_model.peft_config["default"].to_dict()
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    backbone.model = peft_model.unload()
    # Trained float32 values, most of which no 16-bit float can hold exactly.
    generator = torch.Generator().manual_seed(0)
    saved = {
        name: torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * 0.1
        for name, tensor in load_file(folder / "adapter_model.safetensors").items()
    }
    save_file(saved, folder / "adapter_model.safetensors")

    config = {"kind": "lora", "adapter_config": adapter_config}
    model = load_expert(backbone, folder / "adapter_model.safetensors", config)
    try:
        attached = {name: value for name, value in model.state_dict().items() if "lora_" in name}
        for name, value in saved.items():
            loaded = attached[name.replace(".weight", ".default.weight")]
            assert loaded.dtype == torch.float32
            assert torch.equal(loaded, value), name
    finally:
        unload_expert(backbone, model)
