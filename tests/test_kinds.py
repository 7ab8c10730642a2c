"""The registry of expert kinds: what every kind declares resolves, the two sets of kinds stay apart, reading the
registry costs no ML import, and every way of creating a task validates its training options."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from elmreg.experts import get_loader
from elmreg.registry.errors import ConfigurationError
from elmreg.registry.kinds import (
    LORA,
    MERGED_KIND,
    expert_row_kinds,
    get_expert_kind,
    mergeable_kinds,
    register_expert_kind,
    trainable_kinds,
    weights_kind,
)
from elmreg.runtime.tasks import ingest_manifests
from elmreg.trainers import get_trainer


def test_trainable_kinds_and_expert_row_kinds_differ_by_merged():
    assert trainable_kinds() == ("lora", "ffn_adapter", "full")
    assert expert_row_kinds() == (*trainable_kinds(), MERGED_KIND)
    assert set(mergeable_kinds()) <= set(trainable_kinds())
    with pytest.raises(ConfigurationError, match="unknown expert kind"):
        get_expert_kind(MERGED_KIND)  # merged experts load as their base kind, never as 'merged'


@pytest.mark.parametrize("kind", trainable_kinds())
def test_every_declared_trainer_and_loader_is_of_its_kind(kind: str):
    assert get_trainer(kind).kind == kind
    assert get_loader(kind).kind == kind
    assert get_trainer(kind).config_class is get_expert_kind(kind).config_class


def test_only_mixable_kinds_mix_and_only_lora_starts_warm():
    assert [k for k in trainable_kinds() if get_expert_kind(k).mixable] == ["lora"]
    assert [k for k in trainable_kinds() if get_expert_kind(k).warm_start] == ["lora"]
    with pytest.raises(ConfigurationError, match="init_from"):
        get_expert_kind("full").make_config({"init_from": "colours"})


def test_a_kind_is_registered_once_and_merged_is_reserved():
    with pytest.raises(ConfigurationError, match="already registered"):
        register_expert_kind(LORA)
    with pytest.raises(ConfigurationError, match="already registered"):
        register_expert_kind(dataclasses.replace(LORA, name=MERGED_KIND))


def test_a_merged_expert_loads_as_its_base_kind():
    merged = SimpleNamespace(kind=MERGED_KIND, name="both", config={"base_kind": "ffn_adapter"})
    assert weights_kind(merged) == "ffn_adapter"
    assert weights_kind(SimpleNamespace(kind="full", name="x", config={})) == "full"
    with pytest.raises(ConfigurationError, match="base_kind"):
        weights_kind(SimpleNamespace(kind=MERGED_KIND, name="odd", config={"base_kind": MERGED_KIND}))


def test_the_registry_and_task_creation_import_no_ml_stack():
    """The CLI reads the kinds for its choices and validates tasks; neither may cost a torch import."""
    code = (
        "import sys\n"
        "import elmreg.registry.kinds, elmreg.runtime.tasks, elmreg.registry.store.models, elmreg.jobs\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_manifest_ingestion_validates_training_options_without_being_asked(fresh_registry, tmp_path):
    """The scheduler's nightly ingestion calls ingest_manifests with nothing but the context."""
    (tmp_path / "nightly.yaml").write_text(
        "- dataset: bigbench:colours\n  name: bad-rank\n  training: {rank: 0}\n"
        "- dataset: bigbench:colours\n  name: bad-option\n  kind: full\n  training: {rank: 8}\n"
    )
    report = ingest_manifests(fresh_registry, tmp_path)
    assert report.added == []
    assert [(where, "rank" in message) for where, message in report.failed] == [
        ("nightly.yaml#1", True),
        ("nightly.yaml#2", True),
    ]
    assert fresh_registry.catalogue.list_tasks() == []
