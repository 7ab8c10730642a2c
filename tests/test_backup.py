"""Backup and restore: a catalogue with every kind of expert, a merge, a trained retriever, decisions and
evaluations is backed up, refused when damaged, and restored into a fresh home (its own embedded PostgreSQL and
S3) where every weight file verifies, ``status`` matches and routing the same instances decides the same."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.models.embedder import forget_loaded_embedders
from elmreg.registry.artifacts.base import sha256_file
from elmreg.registry.entities import LibraryEntry
from elmreg.registry.gc import publishing_artifacts
from elmreg.registry.settings import load_settings
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext
from elmreg.services import services_down

FAST = {"epochs": 1, "learning_rate": 5e-3, "batch_size": 8}
QUERIES = [
    "Answer Choices: black | blue | green | red | white | yellow, Instance: what colour is the grass ?",
    "Answer Choices: black | blue | green | red | white | yellow, Instance: what colour is the sun ?",
    "Answer Choices: negative | positive, Instance: i really hate this movie .",
    "Answer Choices: None, Instance: reverse cat dog",
]


@pytest.fixture
def fresh_home(lab, tmp_path) -> Iterator[Registry]:
    """An empty home with its own embedded PostgreSQL and S3 and the lab's backbone and embedder settings."""
    home = Path(
        tempfile.mkdtemp(prefix="elmreg-test-restore-")
    )  # see the root conftest: not under pytest's root
    settings = load_settings({"ELMREG_HOME": str(home)}).replace(
        cache_dir=tmp_path / "restored-cache",
        backbone=lab.settings.backbone,
        embedder=lab.settings.embedder,
        device="cpu",
    )
    registry = Registry(settings)
    yield registry
    registry.close()
    services_down(settings)
    shutil.rmtree(home, ignore_errors=True)


def _decision(decision) -> dict:
    return {
        "chosen": decision.chosen_expert_name,
        "library_version": decision.library_version,
        "router": decision.router,
        "embedder": decision.embedder,
        "tallies": [(t.expert_id, t.votes) for t in decision.tallies],
        "votes": [
            (v.query_index, v.rank, v.entry_id, v.expert_id, round(v.score, 5)) for v in decision.votes
        ],
    }


def _is_empty(registry: Registry) -> bool:
    with registry.context.engine.connect() as connection:
        tables = connection.scalar(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"))
    artifacts = registry.context.artifacts
    buckets = [b["Name"] for b in artifacts.client.list_buckets().get("Buckets", [])]
    return tables == 0 and (artifacts.bucket not in buckets or list(artifacts.list_objects()) == [])


def _cli(registry: Registry, *args: str):
    s = registry.settings
    env = {"ELMREG_HOME": str(s.home), "ELMREG_CACHE_DIR": str(s.cache_path), "ELMREG_DEVICE": "cpu"}
    return CliRunner().invoke(cli, ["--quiet", *args], env=env)


def test_backup_restores_into_a_fresh_home(lab, fresh_home, tmp_path):
    for name, kind in (("colours", "full"), ("moods", "full"), ("echo", "lora"), ("sizes", "ffn_adapter")):
        lab.add_task(f"bigbench:{name}", max_examples=32, kind=kind, training=FAST)
    jobs = lab.train()
    assert all(j.status == "succeeded" for j in jobs), [j.last_error for j in jobs]
    merged = lab.merge(["colours", "moods"]).expert
    lab.train_retriever(name="retriever-b", epochs=1)
    lab.evaluate("colours", limit=8, q=4)
    lab.route(QUERIES, task="colours", q=None)
    kinds = {e.kind for e in lab.experts(status="ready")}
    assert kinds == {"full", "lora", "ffn_adapter", "merged"} and merged.parents
    expected = lab.status()
    assert all(expected.row_counts[t] > 0 for t in ("evaluations", "routing_decisions", "expert_parents"))

    report = lab.backup(tmp_path / "backup")
    folder = tmp_path / "backup"
    manifest = json.loads((folder / "manifest.json").read_text())
    referenced = lab.context.catalogue.referenced_artifact_uris()
    assert {o["uri"] for o in manifest["objects"]} == referenced and report.objects == len(referenced)
    for entry in manifest["objects"]:
        assert sha256_file(folder / entry["file"]) == (entry["sha256"], entry["size"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".backup.partial")]

    # Damaged backups: one line, exit 2, nothing written to the fresh home.
    for damage, phrase in (("tamper", "has sha256"), ("remove", "cannot be read")):
        broken = tmp_path / f"backup-{damage}"
        shutil.copytree(folder, broken)
        victim = broken / manifest["objects"][0]["file"]
        if damage == "tamper":
            victim.write_bytes(b"\0" + victim.read_bytes()[1:])
        else:
            victim.unlink()
        result = _cli(fresh_home, "restore", str(broken))
        assert result.exit_code == 2 and phrase in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
        assert _is_empty(fresh_home)

    restored = fresh_home.restore(folder)
    assert restored.objects == len(referenced)
    actual = fresh_home.status()
    assert actual.row_counts == expected.row_counts
    assert (actual.schema_revision, actual.library_version) == (
        expected.schema_revision,
        expected.library_version,
    )

    # Every expert's weights (and the retriever's) come back from the new home's own S3, verified.
    target = fresh_home.context.endpoints
    source_experts = {e.name: e for e in lab.experts()}
    for expert in fresh_home.experts():
        if expert.artifact is None:
            continue
        assert expert.artifact.sha256 == source_experts[expert.name].artifact.sha256
        assert expert.artifact.uri.startswith(f"s3://{target.s3_bucket}/{target.s3_prefix}blobs/")
        assert (
            sha256_file(fresh_home.context.artifact_cache.fetch(expert.artifact))[0] == expert.artifact.sha256
        )
    retriever = fresh_home.context.catalogue.get_embedder("retriever-b")
    fresh_home.context.artifact_cache.fetch(retriever.artifact)

    # Routing the same instances decides the same, with the same votes, by RoE and by the trained retriever.
    for router in ("roe", "trained"):
        forget_loaded_embedders()
        before = lab.route(QUERIES, router=router, q=None)
        forget_loaded_embedders()
        after = fresh_home.route(QUERIES, router=router, q=None)
        assert _decision(after) == _decision(before), router

    again = _cli(fresh_home, "restore", str(folder))
    assert again.exit_code == 2 and "not empty" in again.output, again.output


def test_backup_waits_for_a_publish_in_flight_and_includes_it(settings, scratch_database, tmp_path, unique):
    context = RegistryContext(settings.replace(database_url=scratch_database, s3_prefix=f"backup-{unique}/"))
    registry = Registry(context.settings)
    try:
        schema.upgrade(context.engine)
        catalogue = context.catalogue
        backbone = catalogue.get_or_create_backbone("backup-backbone", "causal")
        embedder = catalogue.get_or_create_embedder("backup-embedder", 4)
        (tmp_path / "weights").write_bytes(b"weights published while the backup starts")
        finished: list[Path] = []
        with publishing_artifacts(context.jobs):
            artifact = context.artifacts.put_file(tmp_path / "weights")
            worker = threading.Thread(target=lambda: finished.append(registry.backup(tmp_path / "b").folder))
            worker.start()
            worker.join(timeout=3)
            assert worker.is_alive() and not (tmp_path / "b").exists(), "the backup must wait for the publish"
            expert = catalogue.create_expert(name="in-flight", backbone_id=backbone.id, kind="lora")
            catalogue.publish_expert(
                expert.id,
                artifact=artifact,
                embedder_id=embedder.id,
                entries=[LibraryEntry(0, "x", np.ones(4))],
            )
        worker.join(timeout=60)
        assert finished == [tmp_path / "b"]
        manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
        assert [o["uri"] for o in manifest["objects"]] == [artifact.uri]
    finally:
        registry.close()
        context.close()
