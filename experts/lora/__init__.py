"""LoRA experts (PEFT), in PEFT's own format."""

from elmreg.experts.lora.loader import ADAPTER_NAME, CONFIG_FILE, LoraLoader, export_peft_folder

__all__ = ["ADAPTER_NAME", "CONFIG_FILE", "LoraLoader", "export_peft_folder"]
