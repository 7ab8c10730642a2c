"""LoRA experts (PEFT), stored in PEFT's own format."""

from elmreg.trainers.lora.config import LoraTrainingConfig
from elmreg.trainers.lora.trainer import LoraTrainer, export_peft_folder

__all__ = ["LoraTrainer", "LoraTrainingConfig", "export_peft_folder"]
