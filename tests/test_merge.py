"""Merging experts: PEFT's merge functions tensor by tensor, LoRA merges equal to PEFT's own, lineage in SQL,
refusals that write nothing, weights tuned on validation data, and composition at prediction time."""

from __future__ import annotations

import json
import sys
import weakref

import pytest
import torch
from click.testing import CliRunner
from conftest import lab_environ
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sqlalchemy import text

from elmreg.cli.main import cli
from elmreg.data.examples import render_split
from elmreg.data.sources import DatasetSpec
from elmreg.experts import load_expert, unload_expert
from elmreg.merging.lora import check_lora_configs, merge_lora, peft_combination
from elmreg.merging.methods import MergeError, MergeSpec, merge_tensors, tensor_seed
from elmreg.merging.task_vectors import TensorReader, merge_tensor_files, open_readers
from elmreg.models.backbones import load_backbone

FAST = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}


def _train(lab, kind: str, *names: str, **training) -> None:
    for name in names:
        lab.add_task(f"bigbench:{name}", max_examples=32, kind=kind, training={**FAST, **training})
    jobs = lab.train()
    assert all(j.status == "succeeded" for j in jobs), [j.last_error for j in jobs]


def _weights(lab, expert) -> dict[str, torch.Tensor]:
    return load_file(str(lab.context.artifact_cache.fetch(expert.artifact)))


def _counts(lab) -> dict[str, int]:
    return dict(lab.status().row_counts)


def _bucket(lab) -> set[str]:
    return {o.uri for o in lab.context.artifacts.list_objects()}


def _cli(lab, *args):
    return CliRunner().invoke(cli, list(args), env=lab_environ(lab), catch_exceptions=False)


def safe_metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


# -- the tensor merges -------------------------------------------------------------------------------------------
def test_methods_are_pefts_functions_and_seeded():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    weights = (0.5, 0.3, 0.2)
    expected = {
        "task_arithmetic": merge_utils.task_arithmetic(tensors, torch.tensor(weights)),
        "ties": merge_utils.ties(tensors, torch.tensor(weights), 0.4, "total"),
        "magnitude_prune": merge_utils.magnitude_prune(tensors, torch.tensor(weights), 0.4),
    }
    for method, value in expected.items():
        density = None if method == "task_arithmetic" else 0.4
        assert torch.equal(merge_tensors(tensors, MergeSpec(method, weights, density), "w"), value), method
    for method in ("dare_linear", "dare_ties"):
        spec = MergeSpec(method, weights, 0.4, seed=7)
        first = merge_tensors(tensors, spec, "layer.weight")
        torch.manual_seed(123)  # what else ran before must not matter
        assert torch.equal(merge_tensors(tensors, spec, "layer.weight"), first)
        assert not torch.equal(
            merge_tensors(tensors, MergeSpec(method, weights, 0.4, seed=8), "layer.weight"), first
        )
        torch.manual_seed(tensor_seed(7, "layer.weight"))
        function = getattr(merge_utils, method)
        peft_value = function(
            tensors, torch.tensor(weights), 0.4, *(("total",) if method == "dare_ties" else ())
        )
        assert torch.equal(first, peft_value), method


def test_bad_specs_are_refused():
    with pytest.raises(MergeError, match="unknown merge method"):
        MergeSpec("average", (0.5, 0.5))
    with pytest.raises(MergeError, match="--density applies to"):
        MergeSpec("task_arithmetic", (0.5, 0.5), density=0.3)
    with pytest.raises(MergeError, match=r"in \(0, 1\]"):
        MergeSpec("ties", (0.5, 0.5), density=1.5)
    with pytest.raises(MergeError, match="different shapes"):
        merge_tensors([torch.zeros(2, 3), torch.zeros(3, 2)], MergeSpec("task_arithmetic", (1, 1)), "w")


class CountingReader(TensorReader):
    """Fails if it hands out a tensor while the previous one it handed out is still alive anywhere."""

    def __init__(self, handle, label):
        super().__init__(handle, label)
        self.previous = None
        self.reads = 0

    def _handed_out(self, tensor):
        assert self.previous is None or self.previous() is None, f"{self.label}: two tensors alive at once"
        self.previous = weakref.ref(tensor)
        self.reads += 1
        return tensor

    def read(self, name):
        return self._handed_out(super().read(name))

    def read_rows(self, name, start, stop):
        return self._handed_out(super().read_rows(name, start, stop))


@pytest.mark.parametrize("block_elements", [2**24, 32])
def test_streaming_merge_holds_one_tensor_per_parent(block_elements, tmp_path):
    generator = torch.Generator().manual_seed(1)
    names = [f"layers.{i}.weight" for i in range(6)] + ["norm.weight"]
    parents = [
        {n: torch.randn(16, 8, generator=generator) if n != "norm.weight" else torch.randn(8) for n in names}
        for _ in range(3)
    ]
    paths = []
    for i, tensors in enumerate(parents):
        paths.append(tmp_path / f"tv{i}.safetensors")
        save_file(tensors, str(paths[-1]), metadata={"format": "elmreg-task-vector"})
    for method in ("task_arithmetic", "dare_linear", "ties"):
        spec = MergeSpec(method, (0.2, 0.3, 0.5), None if method == "task_arithmetic" else 0.5, seed=5)
        out = tmp_path / f"{method}.safetensors"
        with open_readers(paths, ["a", "b", "c"]) as plain:
            readers = [CountingReader(r.handle, r.label) for r in plain]
            merge_tensor_files(readers, spec, out, block_elements=block_elements)
        # 32 elements per block: 16x8 tensors are read as 4 blocks of 4 rows (TIES needs whole tensors).
        blocks = 4 if block_elements == 32 and method != "ties" else 1
        assert [r.reads for r in readers] == [6 * blocks + 1] * 3, method
        merged = load_file(str(out))
        assert safe_metadata(out) == {"format": "elmreg-task-vector"}
        for name in names:
            rows = len(parents[0][name])
            blocked = blocks > 1 and parents[0][name].dim() > 1
            step = rows // blocks if blocked else rows
            expected = torch.cat(
                [
                    merge_tensors(
                        [p[name][s : s + step] for p in parents],
                        spec,
                        f"{name}[{s}:{s + step}]" if blocked else name,
                    )
                    for s in range(0, rows, step)
                ]
            )
            assert torch.equal(merged[name], expected), (method, name)
            if method == "task_arithmetic":  # blocks or not, exactly PEFT's function on whole tensors
                whole = merge_utils.task_arithmetic([p[name] for p in parents], torch.tensor(spec.weights))
                assert torch.equal(merged[name], whole)


# -- LoRA: the same as PEFT's add_weighted_adapter -----------------------------------------------------------------
def _random_lora(backbone, rank: int, seed: int, folder):
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(backbone.model, config)
    model.save_pretrained(folder)
    backbone.model = model.unload()
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize(
    ("method", "ranks"),
    [
        ("task_arithmetic", (4, 8)),
        ("svd", (4, 8)),
        ("linear", (4, 4)),
        ("ties", (4, 8)),
        ("magnitude_prune", (8, 8)),
    ],
)
def test_lora_merge_equals_pefts_add_weighted_adapter(method, ranks, tiny_backbones, tmp_path):
    backbone = load_backbone(tiny_backbones["causal"], cache_dir=tmp_path / "cache")
    folders = [tmp_path / f"adapter{i}" for i in range(2)]
    configs = [_random_lora(backbone, r, seed, f) for r, seed, f in zip(ranks, (1, 2), folders, strict=True)]
    spec = MergeSpec(method, (0.7, -0.4) if method in ("task_arithmetic", "svd", "linear") else (0.7, 0.4))
    out = tmp_path / "merged"
    out.mkdir()
    with open_readers([f / "adapter_model.safetensors" for f in folders], ["a", "b"]) as readers:
        merged_config = merge_lora(readers, configs, spec, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(merged_config))

    model = PeftModel.from_pretrained(backbone.model, folders[0], adapter_name="a")
    model.load_adapter(folders[1], adapter_name="b")
    model.load_adapter(out, adapter_name="ours")
    model.add_weighted_adapter(
        ["a", "b"],
        list(spec.weights),
        "peft",
        combination_type=peft_combination(method),
        density=spec.density,
    )
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and "ours" in m.lora_A]
    assert layers
    for layer in layers:
        ours, theirs = layer.get_delta_weight("ours"), layer.get_delta_weight("peft")
        assert torch.allclose(ours, theirs, atol=1e-5), (method, (ours - theirs).abs().max())
    exact = sum(w * layers[0].get_delta_weight(n) for w, n in zip(spec.weights, "ab", strict=True))
    if method == "task_arithmetic":  # cat is exact: Σ λ_i ΔW_i
        assert torch.allclose(layers[0].get_delta_weight("ours"), exact, atol=1e-6)


def test_linear_lora_merge_needs_equal_ranks():
    configs = [{"peft_type": "LORA", "r": r, "lora_alpha": 8, "target_modules": ["q"]} for r in (4, 8)]
    with pytest.raises(MergeError, match="equal rank"):
        check_lora_configs(configs, ["a", "b"], "linear")
    check_lora_configs(configs, ["a", "b"], "svd")  # svd and cat handle different ranks


# -- merged experts in the registry ------------------------------------------------------------------------------
def test_task_arithmetic_on_task_vectors_reproduces_parent_and_averages(lab, tmp_path):
    _train(lab, "full", "colours", "moods")
    colours, moods = lab.expert("colours"), lab.expert("moods")
    one_zero = lab.merge(["colours", "moods"], weights=[1, 0]).expert
    for name, tensor in _weights(lab, one_zero).items():
        assert torch.equal(tensor, _weights(lab, colours)[name]), name

    half = lab.merge([colours.id, moods.id]).expert  # default weights 1/N
    assert half.parents == ((colours.id, 0.5), (moods.id, 0.5)) and half.merge_params["weights"] == [0.5, 0.5]
    backbone = load_backbone(lab.settings.backbone, cache_dir=tmp_path)
    tuned = {}
    for expert in (colours, moods, half):
        model = load_expert(
            backbone, lab.context.artifact_cache.fetch(expert.artifact), expert.config, kind="full"
        )
        tuned[expert.id] = {n: p.detach().clone() for n, p in model.named_parameters()}
        unload_expert(backbone, model)
    for name, merged in tuned[half.id].items():
        mean = (tuned[colours.id][name] + tuned[moods.id][name]) / 2
        assert torch.allclose(merged, mean, atol=1e-6), name

    again = lab.merge(["colours", "moods"])  # the same merge: found, not made again
    assert again.reused and again.expert.id == half.id


@pytest.mark.parametrize("kind", ["lora", "ffn_adapter", "full"])
def test_merged_expert_lineage_export_and_eval(kind, lab, tmp_path):
    _train(lab, kind, "colours", "moods")
    version = lab.status().library_version
    result = _cli(lab, "merge", "colours", "moods", "--weights", "0.6,0.4", "--name", "both", "--json")
    assert result.exit_code == 0, result.output
    merged = json.loads(result.stdout)["expert"]
    assert merged["kind"] == "merged" and merged["config"]["base_kind"] == kind
    assert merged["library_version"] == version + 1 and merged["status"] == "ready"

    with lab.context.engine.connect() as c:
        lineage = c.execute(
            text(
                "SELECT p.name, ep.position, ep.weight, m.merge_method FROM expert_parents ep "
                "JOIN experts p ON p.id = ep.parent_id JOIN experts m ON m.id = ep.expert_id "
                "WHERE m.name = 'both' ORDER BY ep.position"
            )
        ).all()
        entries = c.execute(
            text(
                "SELECT e.name, count(*) FROM library_entries le JOIN experts e ON e.id = le.expert_id "
                "GROUP BY e.name ORDER BY e.name"
            )
        ).all()
    assert [tuple(r) for r in lineage] == [
        ("colours", 0, 0.6, "task_arithmetic"),
        ("moods", 1, 0.4, "task_arithmetic"),
    ]
    counts = dict(entries)
    assert counts["both"] == counts["colours"] + counts["moods"]  # the union of the parents' samples

    shown = _cli(lab, "experts", "show", "both")
    assert "lineage: merged by task_arithmetic" in shown.output and "colours" in shown.output

    folder = lab.export_expert("both", tmp_path / "export")
    backbone = load_backbone(lab.settings.backbone, cache_dir=tmp_path / "cache")
    if kind == "lora":
        loaded = PeftModel.from_pretrained(backbone.model, folder)  # plain PEFT loads it
        assert any("lora_A" in n for n, _ in loaded.named_parameters())
    else:
        card = json.loads((folder / "elmreg_expert.json").read_text())
        model = load_expert(backbone, folder / "merged.safetensors", card["config"], kind=kind)
        unload_expert(backbone, model)

    evaluated = _cli(
        lab, "eval", "--task", "colours", "--route", "expert:both", "--route", "expert:colours", "--json"
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert [r["expert"] for r in json.loads(evaluated.stdout)] == ["both", "colours"]


def test_ties_and_dare_merges_are_reproducible(lab):
    _train(lab, "full", "colours", "moods")
    first = lab.merge(["colours", "moods"], method="dare_ties", density=0.5, seed=3).expert
    assert first.merge_params["density"] == 0.5 and first.merge_params["seed"] == 3
    # Same request: the catalogue has it. Another seed: a different merge, with different weights.
    assert lab.merge(["colours", "moods"], method="dare_ties", density=0.5, seed=3).expert.id == first.id
    other = lab.merge(["colours", "moods"], method="dare_ties", density=0.5, seed=4).expert
    assert other.id != first.id and other.artifact.sha256 != first.artifact.sha256
    ties = lab.merge(["colours", "moods"], method="ties", density=0.3).expert
    assert ties.merge_method == "ties" and ties.merge_params["majority_sign_method"] == "total"


def test_bad_merges_are_one_line_exit_2_and_write_nothing(lab, tiny_backbones):
    _train(lab, "lora", "colours", "moods")
    lab.add_task("bigbench:echo", max_examples=16, kind="ffn_adapter", training=FAST)
    lab.add_task(
        "bigbench:sizes", name="sizes-t5", max_examples=16, backbone=tiny_backbones["seq2seq"], training=FAST
    )
    lab.add_task("bigbench:sizes/small_things", name="small4", max_examples=16, training={**FAST, "rank": 4})
    lab.train()
    pending = lab.context.catalogue.create_expert(
        name="unfinished", backbone_id=lab.expert("colours").backbone_id, kind="lora"
    )
    cases = [
        (["colours"], "at least 2 experts"),
        (["colours", "nosuch"], "no expert 'nosuch'"),
        (["colours", "colours"], "named twice"),
        (["colours", "sizes-t5"], "different backbones"),
        (["colours", "echo"], "different kinds"),
        (["colours", "moods", "--weights", "0.5,0.3,0.2"], "3 weight(s) for 2 experts"),
        (["colours", "moods", "--weights", "a,b"], "expected numbers"),
        (["colours", "small4", "--method", "linear"], "equal rank"),
        (["colours", "moods", "--density", "0.3"], "--density applies to"),
        (["colours", str(pending.id)], "only ready experts"),
        (["colours", "moods", "--name", "moods"], "already exists"),
        (
            ["colours", "moods", "--tune-on", "colours", "--grid", "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8"],
            "at most 64",
        ),
        (["colours", "moods", "--tune-on", "nosuch"], "no task 'nosuch'"),
    ]
    counts, keys = _counts(lab), _bucket(lab)
    for args, message in cases:
        result = _cli(lab, "merge", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0 and "Traceback" not in result.output, result.output
    assert _counts(lab) == counts and _bucket(lab) == keys


def test_tune_on_chooses_weights_on_validation_data_and_stores_the_table(lab):
    _train(lab, "lora", "colours", "moods")
    result = lab.merge(["colours", "moods"], tune_on=["colours", "moods"], grid=[0.5, 1.0], tune_limit=8)
    tuning = result.expert.merge_params["tuning"]
    assert [row["weights"] for row in tuning["table"]] == [[0.5, 0.5], [0.5, 1.0], [1.0, 0.5], [1.0, 1.0]]
    assert all(set(row["scores"]) == {"colours", "moods"} for row in tuning["table"])
    best = max(row["mean"] for row in tuning["table"])
    assert tuning["chosen_score"] == best and tuning["chosen"] in [r["weights"] for r in tuning["table"]]
    assert [w for _, w in result.expert.parents] == tuning["chosen"]
    assert result.expert.merge_params["weights"] == tuning["chosen"]


def test_compose_merges_the_two_most_voted_experts_and_records_it(lab, tmp_path):
    _train(lab, "lora", "colours", "moods")
    instances = [
        *render_split(
            DatasetSpec("bigbench:colours", split="validation"),
            None,
            cache_dir=lab.settings.cache_path,
            limit=8,
        ),
        *render_split(
            DatasetSpec("bigbench:moods", split="validation"),
            None,
            cache_dir=lab.settings.cache_path,
            limit=8,
        ),
    ]
    rows = lab.predict(instances, compose=2, q=16)
    [merged] = [e for e in lab.experts() if e.kind == "merged"]
    assert {r["expert"] for r in rows} == {merged.name}
    assert {p for p, _ in merged.parents} == {lab.expert("colours").id, lab.expert("moods").id}
    assert merged.merge_params["library"] == "none"
    with lab.context.engine.connect() as c:
        details = c.execute(
            text("SELECT details -> 'compose' FROM routing_decisions WHERE id = :id"),
            {"id": rows[0]["decision_id"]},
        ).scalar_one()
    assert details["composed"] is True and details["merged_expert_id"] == merged.id
    assert sorted(details["expert_names"]) == ["colours", "moods"] and details["reused"] is False

    # The same composition again, through the CLI: the merged expert is reused, not merged twice.
    data = tmp_path / "mixed.jsonl"
    data.write_text(
        "\n".join(json.dumps({"input": i.input, "answer_choices": list(i.answer_choices)}) for i in instances)
    )
    result = _cli(lab, "predict", "--input", str(data), "--compose", "2", "--q", "16")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.output.splitlines()]
    assert len(answers) == len(instances) and {a["expert"] for a in answers} == {merged.name}
    assert [e.id for e in lab.experts() if e.kind == "merged"] == [merged.id]
    with lab.context.engine.connect() as c:
        again = c.execute(
            text("SELECT details -> 'compose' FROM routing_decisions WHERE id = :id"),
            {"id": answers[0]["decision_id"]},
        ).scalar_one()
    assert again["reused"] is True and again["merged_expert_id"] == merged.id


def test_merge_table_benchmark_compares_merged_with_parents(lab):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_table.py"
    spec = importlib.util.spec_from_file_location("merge_table", path)
    merge_table = importlib.util.module_from_spec(spec)
    sys.modules["merge_table"] = merge_table  # dataclasses look their module up there
    spec.loader.exec_module(merge_table)

    _train(lab, "lora", "colours", "moods")
    merged = lab.merge(["colours", "moods"]).expert
    rows = merge_table.merge_table(lab, limit=8)
    assert [(r.merged, r.task, r.own) for r in rows] == [
        (merged.name, "colours", "colours"),
        (merged.name, "moods", "moods"),
    ]
    assert all(set(r.scores) == {merged.name, "colours", "moods"} for r in rows)
    table = merge_table.format_table(rows)
    assert "colours+moods" in table and "Δ" in table
    with lab.context.engine.connect() as c:
        stored = c.execute(
            text("SELECT count(*) FROM evaluations WHERE expert_id = :m"), {"m": merged.id}
        ).scalar_one()
    assert stored == 2
