"""Training LoRA experts (PEFT), saved in PEFT's own format."""

from elmreg.trainers.lora.trainer import LoraTrainer

__all__ = ["LoraTrainer"]
