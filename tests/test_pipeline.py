"""Growing the library end to end: add-task -> worker -> ready expert, on tiny backbones, real Postgres and S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import lab_environ as _env
from peft import PeftModel
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.models.backbones import load_backbone

FAST = {"epochs": 1, "learning_rate": 1e-3, "batch_size": 8}


def _bucket_keys(registry: Registry) -> set[str]:
    return {obj.uri for obj in registry.context.artifacts.list_objects()}


def _counts(registry: Registry) -> dict[str, int]:
    return dict(registry.status().row_counts)


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
@pytest.mark.parametrize("kind", ["lora", "ffn_adapter", "full"])
def test_add_task_then_worker_gives_a_ready_expert(lab, tiny_backbones, family, kind):
    task = lab.add_task(
        "bigbench:colours", kind=kind, backbone=tiny_backbones[family], max_examples=24, training=FAST
    )
    assert task.task_type == "classification" and task.metric == "accuracy" and task.max_examples == 24
    assert [j.status for j in lab.jobs()] == ["queued"]

    [job] = lab.train()
    assert job.status == "succeeded", job.last_error
    [expert] = lab.experts(task=task.name)
    assert expert.status == "ready" and expert.kind == kind and expert.library_version == 1
    assert expert.metrics["steps"] == 3 and expert.metrics["examples"] == 24
    # The artifact is in S3 and matches the catalogue's checksum (the cache verifies on download).
    local = lab.context.artifact_cache.fetch(expert.artifact)
    assert local.stat().st_size == expert.artifact.size
    with lab.context.engine.connect() as c:
        rows = c.execute(
            text("SELECT count(*), min(vector_dims(embedding)) FROM library_entries WHERE expert_id = :e"),
            {"e": expert.id},
        ).one()
    assert tuple(rows) == (24, 384)  # S = min(100, K) samples, MiniLM vectors
    [run] = lab.training_runs(task.name)
    assert run.status == "succeeded" and run.expert_id == expert.id


def test_adding_an_expert_changes_nothing_else(lab):
    lab.add_task("bigbench:colours", max_examples=16, training=FAST)
    lab.train()
    [first] = lab.experts()
    with lab.context.engine.connect() as c:
        before = c.execute(text("SELECT id, embedding::text FROM library_entries ORDER BY id")).all()
    lab.add_task("bigbench:moods", max_examples=16, training=FAST)
    lab.train()
    assert lab.expert(first.id) == first
    with lab.context.engine.connect() as c:
        after = c.execute(text("SELECT id, embedding::text FROM library_entries ORDER BY id")).all()
    assert after[: len(before)] == before and len(after) == 2 * len(before)
    assert [e.library_version for e in lab.experts()] == [1, 2]


def test_generative_task_and_subtasks(lab):
    task = lab.add_task("bigbench:echo", max_examples=8, training=FAST)
    assert task.task_type == "generative" and task.metric == "rouge_l"
    both = lab.add_task("bigbench:sizes", name="sizes-all", max_examples=8, training=FAST)
    one = lab.add_task("bigbench:sizes/small_things", max_examples=8, training=FAST)
    assert both.subset is None and one.name == "sizes.small_things"


BAD_INPUTS = [
    (["--dataset", "bigbench:colorz"], "no BIG-bench task 'colorz' (did you mean colours"),
    (["--dataset", "bigbench:colours", "--split", "test"], "splits train, validation, all"),
    (["--dataset", "bigbench:sizes/huge_things"], "has no subtask 'huge_things'"),
    (["--dataset", "{data}", "--prompt", "{{{{question}}}} ||| {{{{answer}}}}"], "uses field 'answer'"),
    (["--dataset", "{data}", "--prompt", "{{{{text}}}}"], "needs '|||'"),
    (["--dataset", "{empty}", "--prompt", "{{{{text}}}} ||| {{{{label}}}}"], "is empty"),
    (
        [
            "--dataset",
            "{data}",
            "--prompt",
            "{{{{text}}}} ||| {{{{label}}}}",
            "--task-type",
            "classification",
        ],
        "has no answer choices",
    ),
    (["--dataset", "{data}"], "needs a prompt"),
    (
        ["--dataset", "nonexistent/dataset-on-the-hub", "--prompt", "{{{{a}}}} ||| {{{{b}}}}"],
        "could not be loaded from the Hugging Face hub",
    ),
    # Refused by the option's range before the kind's own check (which manifests and the API go through).
    (["--dataset", "bigbench:colours", "--kind", "lora", "--epochs", "0"], "0 is not in the range x>=1"),
    (["--dataset", "bigbench:colours", "--name", "colours"], "already exists"),
    (
        ["--dataset", "bigbench:colours", "--name", "x", "--backbone", "/no/such/model"],
        "backbone '/no/such/model'",
    ),
]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(lab, tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"review {i}", "label": "good"}) for i in range(5)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    lab.add_task("bigbench:colours", name="colours", max_examples=8, training=FAST)
    counts, keys = _counts(lab), _bucket_keys(lab)
    runner = CliRunner()
    for args, message in BAD_INPUTS:
        args = [a.format(data=data, empty=empty) for a in args]
        result = runner.invoke(cli, ["add-task", *args], env=_env(lab), catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output, result.output
    assert _counts(lab) == counts and _bucket_keys(lab) == keys


def test_now_trains_inline_and_cli_lists_it(lab):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        ["add-task", "--dataset", "bigbench:colours", "-k", "8", "--epochs", "1", "--now", "--quiet"],
        env=_env(lab),
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert "trained" in result.output
    listed = runner.invoke(cli, ["experts", "list", "--json"], env=_env(lab), catch_exceptions=False)
    [expert] = json.loads(listed.output)
    assert expert["status"] == "ready" and expert["name"] == "colours"
    assert (
        json.loads(runner.invoke(cli, ["jobs", "list", "--json"], env=_env(lab)).output)[0]["status"]
        == "succeeded"
    )


def test_two_worker_processes_train_every_job_exactly_once(lab):
    for name in ("colours", "moods", "echo", "sizes"):
        lab.add_task(f"bigbench:{name}", max_examples=8, training=FAST)
    elmreg = str(Path(sys.executable).parent / "elmreg")
    workers = [
        subprocess.Popen(
            [elmreg, "worker", "--drain", "--quiet", "--name", f"w{i}"],
            env=_env(lab),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    jobs = lab.jobs()
    assert [j.status for j in jobs] == ["succeeded"] * 4, [j.last_error for j in jobs]
    assert all(j.attempts == 1 for j in jobs)
    runs = lab.training_runs()
    assert sorted(r.task_id for r in runs) == sorted(t.id for t in lab.tasks())
    assert len({r.worker for r in runs}) >= 1
    assert sorted(e.library_version for e in lab.experts(status="ready")) == [1, 2, 3, 4]


def test_killed_worker_job_is_reclaimed_and_ends_with_one_ready_expert(lab):
    task = lab.add_task("bigbench:colours", max_examples=64, training={"epochs": 400, "batch_size": 4})
    elmreg = str(Path(sys.executable).parent / "elmreg")
    victim = subprocess.Popen(
        [elmreg, "worker", "--once", "--quiet", "--lease", "2", "--name", "victim"],
        env=_env(lab),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not lab.training_runs(task.name):
        time.sleep(0.2)
    assert lab.training_runs(task.name), "the victim never started training"
    os.killpg(victim.pid, signal.SIGKILL)  # mid-training, no chance to clean up
    victim.wait()
    assert lab.jobs()[0].status == "running" and lab.jobs()[0].lease_owner == "victim"

    # A new worker can only take the job once the victim's lease has expired; make the retry short.
    with lab.context.engine.begin() as c:
        c.execute(
            text("UPDATE tasks SET training_config = '{\"epochs\": 1}'::jsonb WHERE id = :id"),
            {"id": task.id},
        )
    time.sleep(2.5)
    job = lab.worker(name="rescuer").run_once()
    assert job.status == "succeeded" and job.attempts == 2 and job.lease_owner == "rescuer"
    experts = lab.experts(task=task.name)
    assert [e.status for e in experts] == ["ready"]
    # The victim's run is closed as abandoned when its job is taken over.
    assert [r.status for r in lab.training_runs(task.name)] == ["failed", "succeeded"]
    assert "abandoned" in lab.training_runs(task.name)[0].error


def test_export_and_import_lora_round_trip(lab, tmp_path):
    lab.add_task("bigbench:colours", max_examples=16, training=FAST)
    lab.train()
    [expert] = lab.experts()
    lab.tag_expert(expert.name, {"owner": "nlp"}, description="# Colours\nAnswers colour questions.")
    lab.set_alias("colours", "prod", expert.name)
    # The alias names the expert wherever an expert is taken; tags and description travel in the card.
    folder = lab.export_expert("colours@prod", tmp_path / "export")
    card = json.loads((folder / "elmreg_expert.json").read_text())
    assert card["name"] == expert.name and card["backbone"] == lab.settings.backbone
    assert card["tags"] == {"owner": "nlp"} and card["aliases"] == ["colours@prod"]
    plain = PeftModel.from_pretrained(load_backbone(lab.settings.backbone, cache_dir=tmp_path).model, folder)
    assert any("lora_A" in n for n, _ in plain.named_parameters())

    imported = lab.import_expert(folder, task="colours", name="colours-again")
    assert imported.status == "ready" and imported.library_version == 2
    assert imported.artifact == expert.artifact  # same bytes: one object in the bucket
    assert imported.tags == {"owner": "nlp"} and imported.description.startswith("# Colours")
    assert imported.aliases == ()  # an alias names one expert: the copy does not take it
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    result = CliRunner().invoke(cli, ["experts", "import", str(broken), "--task", "colours"], env=_env(lab))
    assert result.exit_code == 2 and "not a PEFT adapter folder" in result.output


def test_manifest_ingestion_adds_new_tasks_only(lab, tmp_path):
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "nightly.yaml").write_text(
        "- dataset: bigbench:colours\n  name: colours\n  max_examples: 8\n"
        "- dataset: bigbench:moods\n  max-examples: 8\n  kind: ffn_adapter\n"
        "- dataset: bigbench:nope\n  name: nope\n"
    )
    # Bad entries of every sort: each is one line in the report and writes nothing; the good ones still count.
    (manifests / "broken.yaml").write_text(
        "- dataset: bigbench:echo\n  name: bad-epochs\n  training: {epochs: -1}\n"
        "- dataset: bigbench:echo\n  name: bad-key\n  max_exampels: 8\n"
        "- just a string\n"
        "- dataset: bigbench:echo\n  name: bad-kind\n  kind: prefix_tuning\n"
    )
    (manifests / "garbled.yml").write_text("- dataset: [unclosed\n")
    (manifests / "latin1.yaml").write_bytes("- dataset: caf\xe9\n".encode("latin-1"))
    first = lab.ingest(manifests)
    assert sorted(first.added) == ["colours", "moods"]
    assert [w for w, _ in first.failed] == [
        "broken.yaml#1",
        "broken.yaml#2",
        "broken.yaml#3",
        "broken.yaml#4",
        "garbled.yml",
        "latin1.yaml",
        "nightly.yaml#3",
    ]
    assert all("\n" not in error and error for _, error in first.failed)
    assert "epochs" in dict(first.failed)["broken.yaml#1"]
    assert {t.name for t in lab.tasks()} == {"colours", "moods"}
    assert len(lab.jobs()) == 2
    second = lab.ingest(manifests)
    assert second.added == [] and sorted(second.skipped) == ["colours", "moods"]
    assert lab.task("moods").expert_kind == "ffn_adapter"
