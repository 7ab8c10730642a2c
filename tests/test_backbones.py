"""Loading backbones: families, dtypes, errors, and fingerprints that identify the weights."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import BACKBONES, build_all, build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from elmreg.models import backbones
from elmreg.models.backbones import fingerprint, load_backbone
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.settings import DEFAULT_BACKBONE


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tiny-backbones"))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_tiny_backbones_load_frozen_with_their_family(
    name: str, tiny_folders: dict[str, Path], tmp_path: Path
):
    started = time.perf_counter()
    backbone = load_backbone(str(tiny_folders[name]), cache_dir=tmp_path)
    assert time.perf_counter() - started < 1.0
    assert backbone.family == BACKBONES[name][0]
    assert backbone.path == tiny_folders[name] and backbone.device == "cpu"
    assert backbone.active_expert is None
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.tokenizer.pad_token_id is not None
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", backbone.fingerprint)
    assert backbone.config_summary["parameters"] < 100_000


def test_dtype_is_the_checkpoints_unless_asked(tiny_folders: dict[str, Path], tmp_path: Path):
    folder = str(tiny_folders["llama"])
    assert load_backbone(folder, cache_dir=tmp_path).model.dtype == torch.float32
    assert load_backbone(folder, cache_dir=tmp_path, dtype="bfloat16").model.dtype == torch.bfloat16
    assert load_backbone(folder, cache_dir=tmp_path, dtype=torch.float16).model.dtype == torch.float16
    with pytest.raises(ConfigurationError, match="dtype"):
        load_backbone(folder, cache_dir=tmp_path, dtype="float8")


def test_a_causal_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path):
    folder = build_tiny_llama(tmp_path / "llama")
    tokenizer_config = folder / "tokenizer_config.json"
    tokenizer_config.write_text(
        json.dumps({k: v for k, v in json.loads(tokenizer_config.read_text()).items() if k != "pad_token"})
    )
    assert AutoTokenizer.from_pretrained(folder).pad_token_id is None
    backbone = load_backbone(str(folder), cache_dir=tmp_path)
    assert backbone.tokenizer.pad_token_id == backbone.tokenizer.eos_token_id


def test_unknown_backbones_are_configuration_errors(tmp_path: Path):
    # No hub access here; with access the hub answers "not found". Either way: one actionable message.
    with pytest.raises(ConfigurationError, match="give a local path"):
        load_backbone("elmreg-tests/no-such-model", cache_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigurationError, match="cannot load backbone"):
        load_backbone(str(empty), cache_dir=tmp_path)


# -- fingerprints ----------------------------------------------------------------------------------------------
def test_fingerprint_identifies_the_weights_not_the_files(tiny_folders: dict[str, Path], tmp_path: Path):
    original = tiny_folders["llama"]
    reference = fingerprint(original)
    assert fingerprint(original) == reference
    assert reference != fingerprint(tiny_folders["gemma3"])

    # The same tensors sharded differently, and saved by another library version: the same weights.
    model = AutoModelForCausalLM.from_pretrained(original)
    resharded = tmp_path / "resharded"
    model.save_pretrained(resharded, max_shard_size="20KB")
    assert len(list(resharded.glob("*.safetensors"))) > 1
    config = json.loads((resharded / "config.json").read_text())
    (resharded / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0.1"}))
    assert fingerprint(resharded) == reference

    # One weight nudged (same sizes, same config): different weights, different fingerprint.
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    nudged = tmp_path / "nudged"
    model.save_pretrained(nudged)
    assert (nudged / "model.safetensors").stat().st_size == (original / "model.safetensors").stat().st_size
    assert fingerprint(nudged) != reference

    # A config change that alters the computation changes it too.
    changed = tmp_path / "changed"
    shutil.copytree(original, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    assert fingerprint(changed) != reference


def test_fingerprint_memo_skips_rehashing_until_the_files_change(
    tiny_folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = tmp_path / "llama"
    shutil.copytree(tiny_folders["llama"], folder)
    memo = tmp_path / "fingerprints.json"
    reference = fingerprint(folder, memo=memo)
    assert memo.is_file()

    def no_hashing(files):
        raise AssertionError("hashed again")

    monkeypatch.setattr(backbones, "_hash_weights", no_hashing)
    assert fingerprint(folder, memo=memo) == reference
    (folder / "model.safetensors").touch()  # a rewritten file is hashed again
    with pytest.raises(AssertionError, match="hashed again"):
        fingerprint(folder, memo=memo)


def test_fingerprint_needs_weights(tmp_path: Path):
    with pytest.raises(ConfigurationError, match="no weight files"):
        fingerprint(tmp_path)


# -- the real default backbone ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_gemma_is_converted_once_then_loads_fast(tmp_path: Path):
    """google/gemma-3-270m from the bundled GGUF: about a minute the first time, seconds after."""
    started = time.perf_counter()
    backbone = load_backbone(DEFAULT_BACKBONE, cache_dir=tmp_path)
    first = time.perf_counter() - started
    folder = tmp_path / "backbones" / "google--gemma-3-270m"
    assert backbone.path == folder and backbone.family == "causal"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    # Nothing left over from the conversion: no GGUF copy, no staging folder.
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "fingerprints.json",
        "google--gemma-3-270m",
        "google--gemma-3-270m.lock",
    ]
    assert 260e6 < backbone.config_summary["parameters"] < 280e6
    assert backbone.config_summary["vocab_size"] == 262_144

    inputs = backbone.tokenizer("The capital of France is", return_tensors="pt")
    generated = backbone.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    completion = backbone.tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :])
    assert "France" in completion or "Paris" in completion

    started = time.perf_counter()
    again = load_backbone(DEFAULT_BACKBONE, cache_dir=tmp_path)
    assert time.perf_counter() - started < min(first / 2, 30)
    assert again.fingerprint == backbone.fingerprint
