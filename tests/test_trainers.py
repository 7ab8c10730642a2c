"""Expert kinds on tiny backbones of every family: training, saving, loading onto a backbone and off again.

One matrix over kinds (lora, ffn_adapter, full) and backbones (T5 seq2seq, Llama and Gemma 3 causal).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from fixtures.tiny_models import BACKBONES, build_all
from peft import PeftModel
from safetensors.torch import load_file

from elmreg.data.prompts import PromptedExample
from elmreg.experts import load_expert, unload_expert
from elmreg.experts.ffn_adapter.model import ParallelAdapter, add_adapters, remove_adapters
from elmreg.experts.full.task_vector import trainable_entries
from elmreg.experts.lora import export_peft_folder
from elmreg.models.backbones import Backbone, load_backbone
from elmreg.models.encoding import IGNORE_INDEX, EncodedBatch, encode, target_token_loss
from elmreg.registry.errors import ArtifactError, ConfigurationError, UserError
from elmreg.registry.kinds import trainable_kinds
from elmreg.registry.progress import Silent
from elmreg.registry.settings import DEFAULT_BACKBONE
from elmreg.trainers import get_trainer

KINDS = trainable_kinds()

NAMES = list(BACKBONES)
EXAMPLES = [
    PromptedExample("what colour is the sky ?", "blue"),
    PromptedExample("what colour is grass ?", "green"),
    PromptedExample("what colour is snow ?", "white"),
    PromptedExample("what colour is the sun ?", "yellow", ("blue", "green", "white", "yellow")),
]
# A high learning rate so that a few dozen steps on a 20k-parameter model learn the task.
FAST = {"epochs": 30, "learning_rate": 5e-3, "batch_size": 4, "seed": 1}


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_all(tmp_path_factory.mktemp("tiny-backbones"))


@pytest.fixture
def backbone(request: pytest.FixtureRequest, tiny_folders: dict[str, Path], tmp_path: Path) -> Backbone:
    """A freshly loaded tiny backbone; parametrise indirectly with a name from ``BACKBONES``."""
    return load_backbone(str(tiny_folders[request.param]), cache_dir=tmp_path / "cache")


def _batch(backbone: Backbone, examples=EXAMPLES) -> EncodedBatch:
    return encode(
        backbone.family, backbone.tokenizer, [e.input for e in examples], [e.target for e in examples]
    )


def _loss(backbone: Backbone, model: torch.nn.Module | None = None) -> float:
    with torch.no_grad():
        return float(target_token_loss(model or backbone.model, backbone.family, _batch(backbone)))


def _logits(backbone: Backbone, model: torch.nn.Module | None = None) -> torch.Tensor:
    batch = _batch(backbone)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if backbone.family == "seq2seq":
        inputs["labels"] = batch.labels  # gives the decoder its inputs
    with torch.no_grad():
        return (model or backbone.model)(**inputs).logits


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[tuple[str, int]]]:
    """The weights, and which module object sits where (unloading must put back the very same objects)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, [(name, id(module)) for name, module in model.named_modules()]


def _assert_unchanged(model: torch.nn.Module, snapshot) -> None:
    state, modules = snapshot
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert [(name, id(module)) for name, module in model.named_modules()] == modules


class _Steps(Silent):
    """Records the training steps as the trainer reports them: (step, total)."""

    def __init__(self):
        self.seen, self.total, self.detail, self.finished = [], None, "", False

    def start(self, description, total):
        self.total = total

    def advance(self, done, *, detail=""):
        self.seen.append((done, self.total))
        self.detail = detail

    def finish(self):
        self.finished = True


# -- the matrix ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", NAMES, indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_training_learns_and_load_unload_restores_the_backbone(backbone: Backbone, kind: str, tmp_path: Path):
    trainer = get_trainer(kind)
    model_before = backbone.model
    snapshot, loss_before, logits_before = _snapshot(backbone.model), _loss(backbone), _logits(backbone)
    steps = _Steps()
    trained = trainer.train(
        backbone,
        EXAMPLES,
        trainer.make_config(FAST),
        tmp_path / "out",
        progress=steps,
    )
    assert trained.weights_path.is_file() and trained.weights_path.parent == tmp_path / "out"
    assert trained.config["kind"] == kind and trained.config["backbone_fingerprint"] == backbone.fingerprint
    json.dumps(trained.config)
    json.dumps(trained.metrics)
    assert steps.seen == [(s, FAST["epochs"]) for s in range(1, FAST["epochs"] + 1)] and steps.finished
    assert steps.detail.startswith("loss ")
    assert trained.metrics["steps"] == FAST["epochs"] and trained.metrics["examples"] == len(EXAMPLES)
    assert len(trained.metrics["loss_per_step"]) == FAST["epochs"] == len(trained.metrics["loss_per_epoch"])
    assert trained.metrics["loss_per_epoch"][-1] < 0.5 * trained.metrics["loss_per_epoch"][0]
    assert trained.metrics["tokens_per_second"] > 0

    # Training leaves the backbone exactly as it was: a worker trains the next expert on it.
    assert backbone.model is model_before and backbone.active_expert is None
    _assert_unchanged(backbone.model, snapshot)
    assert not any(p.requires_grad for p in backbone.model.parameters())

    model = load_expert(backbone, trained.weights_path, trained.config)
    assert backbone.active_expert == kind
    assert _loss(backbone, model) < 0.5 * loss_before  # the loaded expert is the trained one
    unload_expert(backbone, model)
    assert backbone.model is model_before and backbone.active_expert is None
    _assert_unchanged(backbone.model, snapshot)
    assert torch.equal(_logits(backbone), logits_before)


@pytest.mark.parametrize("backbone", ["llama"], indirect=True)
def test_max_steps_stops_mid_epoch_where_the_full_schedule_was(backbone: Backbone, tmp_path: Path):
    """A run stopped at max_steps is the first steps of the same run without it (same seed, same order)."""
    trainer = get_trainer("lora")
    options = {**FAST, "epochs": 3, "batch_size": 3}
    full = trainer.train(backbone, EXAMPLES, trainer.make_config(options), tmp_path / "full", seed=3)
    per_epoch = -(-len(EXAMPLES) // 3)
    stop = per_epoch + 1  # one step into the second epoch
    steps = _Steps()
    short = trainer.train(
        backbone,
        EXAMPLES,
        trainer.make_config({**options, "max_steps": stop}),
        tmp_path / "short",
        seed=3,
        progress=steps,
    )
    assert short.metrics["steps"] == stop and steps.seen[-1] == (stop, stop)
    assert short.metrics["loss_per_step"] == full.metrics["loss_per_step"][:stop]
    assert len(short.metrics["loss_per_epoch"]) == 2
    with pytest.raises(ConfigurationError, match="max_steps must be at least 1"):
        trainer.make_config({"max_steps": 0})


@pytest.mark.parametrize("backbone", NAMES, indirect=True)
@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_weights(backbone: Backbone, kind: str, tmp_path: Path):
    trainer = get_trainer(kind)
    config = trainer.make_config({**FAST, "epochs": 2})
    first, second, other = (
        trainer.train(backbone, EXAMPLES, config, tmp_path / name, seed=seed)
        for name, seed in (("a", 7), ("b", 7), ("c", 8))
    )
    a, b, c = (load_file(str(t.weights_path)) for t in (first, second, other))
    assert set(a) == set(b) == set(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert first.config["seed"] == 7 and other.config["seed"] == 8


# -- per kind --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", NAMES, indirect=True)
def test_untrained_ffn_adapter_leaves_logits_unchanged(backbone: Backbone):
    before = _logits(backbone)
    adapters = add_adapters(backbone.model, hidden_size=16)
    layers = 4 if backbone.family == "seq2seq" else 2  # one per layer: 2 encoder + 2 decoder in T5
    assert len(adapters) == layers
    assert all(isinstance(a, ParallelAdapter) for a in adapters.values())
    assert torch.equal(_logits(backbone), before)  # zero-initialised up-projection: exactly the identity
    remove_adapters(backbone.model)
    assert torch.equal(_logits(backbone), before)


@pytest.mark.parametrize("backbone", NAMES, indirect=True)
def test_exported_lora_loads_in_plain_peft_with_identical_logits(
    backbone: Backbone, tiny_folders: dict[str, Path], tmp_path: Path
):
    trainer = get_trainer("lora")
    trained = trainer.train(backbone, EXAMPLES, trainer.make_config({**FAST, "epochs": 3}), tmp_path / "t")
    folder = export_peft_folder(trained.weights_path, trained.config, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"

    model = load_expert(backbone, trained.weights_path, trained.config)
    ours = _logits(backbone, model)
    unload_expert(backbone, model)
    assert not torch.equal(ours, _logits(backbone))  # the adapter does something

    plain = load_backbone(str(tiny_folders[backbone.name.split("/")[-1]]), cache_dir=tmp_path / "cache")
    theirs = _logits(plain, PeftModel.from_pretrained(plain.model, folder))
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("backbone", NAMES, indirect=True)
def test_task_vector_reconstructs_the_fine_tuned_weights(backbone: Backbone, tmp_path: Path):
    trainer = get_trainer("full")
    captured: dict[str, torch.Tensor] = {}
    save = trainer.save

    def save_and_capture(model, backbone_, config, out_dir):  # θ_d, before the trainer restores θ_pre
        captured.update({name: p.detach().clone() for name, p in trainable_entries(model)})
        return save(model, backbone_, config, out_dir)

    trainer.save = save_and_capture
    trained = trainer.train(backbone, EXAMPLES, trainer.make_config({**FAST, "epochs": 2}), tmp_path / "full")
    tau = load_file(str(trained.weights_path))
    pre = {name: p.detach().clone() for name, p in trainable_entries(backbone.model)}
    assert set(tau) == set(captured) == set(pre)
    assert all(tau[name].dtype == pre[name].dtype for name in tau)

    exact = total = 0
    for name, fine_tuned in captured.items():
        rebuilt = pre[name] + tau[name]
        # Where θ_d and θ_pre are within a factor of two of each other (almost always after fine-tuning),
        # θ_d − θ_pre is exact in float (Sterbenz), and so is θ_pre + τ = θ_d. Elsewhere τ is rounded once and
        # the sum once: an error of at most about one ulp of the larger weight.
        bound = 4 * torch.finfo(fine_tuned.dtype).eps * torch.maximum(fine_tuned.abs(), pre[name].abs())
        assert bool(((rebuilt - fine_tuned).abs() <= bound).all()), name
        exact += int((rebuilt == fine_tuned).sum())
        total += fine_tuned.numel()
    # Bit-exact for the vast majority; the rest are near-zero weights that this high learning rate moved by
    # more than a factor of two.
    assert exact / total > 0.95

    # load_expert adds τ in place; unload reads θ_pre back from the backbone's files.
    model = load_expert(backbone, trained.weights_path, trained.config)
    loaded = dict(trainable_entries(model))
    assert all(torch.equal(loaded[name], pre[name] + tau[name]) for name in tau)
    unload_expert(backbone, model)
    assert all(torch.equal(p, pre[name]) for name, p in trainable_entries(backbone.model))


# -- the loss ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", NAMES, indirect=True)
def test_target_only_loss_equals_the_full_logits_loss(backbone: Backbone):
    examples = [*EXAMPLES, PromptedExample("translate hello to french :", "bonjour monde")]
    batch = _batch(backbone, examples)
    assert bool((batch.labels != IGNORE_INDEX).any(dim=1).all())
    with torch.no_grad():
        fast = target_token_loss(backbone.model, backbone.family, batch)
        per_example = target_token_loss(backbone.model, backbone.family, batch, reduction="none")
        if backbone.family == "seq2seq":
            logits = backbone.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            ).logits
            labels = batch.labels
        else:  # the naive way: logits at every position, then shift
            logits = backbone.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
                :, :-1
            ]
            labels = batch.labels[:, 1:]
        naive = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(labels.shape)
        transformers_loss = backbone.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    assert float(fast) == pytest.approx(float(naive.sum() / (labels != IGNORE_INDEX).sum()), abs=1e-5)
    assert float(fast) == pytest.approx(float(transformers_loss), abs=1e-5)
    assert torch.allclose(per_example, naive.sum(dim=1), atol=1e-5)


@pytest.mark.parametrize("backbone", ["gemma3"], indirect=True)
def test_loss_covers_only_target_tokens(backbone: Backbone):
    """Changing the input changes the loss only through the target's context: inputs carry no labels."""
    batch = _batch(backbone)
    for row, example in zip(batch.labels, EXAMPLES, strict=True):
        target_ids = backbone.tokenizer(" " + example.target, add_special_tokens=False)["input_ids"]
        assert row[row != IGNORE_INDEX].tolist() == [*target_ids, backbone.tokenizer.eos_token_id]


# -- guards and configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["llama"], indirect=True)
def test_experts_are_never_stacked_or_put_on_another_backbone(
    backbone: Backbone, tiny_folders: dict[str, Path], tmp_path: Path
):
    trainer = get_trainer("ffn_adapter")
    trained = trainer.train(backbone, EXAMPLES, trainer.make_config({**FAST, "epochs": 1}))
    assert trained.weights_path.is_file()  # out_dir defaults to a temporary folder
    model = load_expert(backbone, trained.weights_path, trained.config)
    with pytest.raises(UserError, match="already loaded"):
        load_expert(backbone, trained.weights_path, trained.config, kind="full")
    with pytest.raises(UserError, match="unload"):
        trainer.train(backbone, EXAMPLES, trainer.make_config(FAST))
    unload_expert(backbone, model)

    with pytest.raises(ConfigurationError, match="kind"):
        load_expert(backbone, trained.weights_path, trained.config, kind="lora")
    other = load_backbone(str(tiny_folders["gemma3"]), cache_dir=tmp_path / "cache")
    with pytest.raises(ArtifactError, match="trained on"):
        load_expert(other, trained.weights_path, trained.config)
    assert other.active_expert is None
    # Without the recorded fingerprint (an imported expert) the shapes still have to fit.
    with pytest.raises(ArtifactError, match="does not fit"):
        load_expert(other, trained.weights_path, {"kind": "ffn_adapter", "hidden_size": 32})
    assert not any(isinstance(m, ParallelAdapter) for m in other.model.modules())


@pytest.mark.parametrize("kind", KINDS)
def test_configs_document_and_validate_every_field(kind: str):
    trainer = get_trainer(kind)
    config = trainer.make_config()
    assert (config.epochs, config.learning_rate, config.batch_size) == (5, 1e-4, 8)  # the paper's defaults
    assert all(f.metadata.get("help") for f in dataclasses.fields(config))
    assert trainer.make_config(config.to_dict()) == config
    for bad in ({"epochs": 0}, {"learning_rate": 0}, {"batch_size": 0}, {"max_source_length": 0}):
        with pytest.raises(ConfigurationError):
            trainer.make_config(bad)
    with pytest.raises(ConfigurationError, match="unknown"):
        trainer.make_config({"epoch": 3})


def test_kind_specific_options_are_validated():
    for kind, bad in (
        ("lora", {"rank": 0}),
        ("lora", {"dropout": 1.0}),
        ("lora", {"target_modules": []}),
        ("ffn_adapter", {"hidden_size": 0}),
        ("full", {"rank": 8}),  # a LoRA option means nothing to full fine-tuning
    ):
        with pytest.raises(ConfigurationError):
            get_trainer(kind).make_config(bad)
    with pytest.raises(ConfigurationError, match="unknown expert kind"):
        get_trainer("prefix_tuning")


# -- the real default backbone ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """google/gemma-3-270m, converted once into pytest's cache folder (about a minute), then loaded in seconds."""
    cache = getattr(request.config, "cache", None)
    cache_dir = cache.mkdir("elmreg-gemma") if cache is not None else tmp_path_factory.mktemp("gemma")
    return load_backbone(DEFAULT_BACKBONE, cache_dir=Path(cache_dir))


@pytest.mark.slow
def test_lora_on_the_default_gemma(gemma: Backbone, tmp_path: Path):
    """On the real 262k vocabulary: the target-only loss is the full-logits loss, and a LoRA expert round-trips."""
    batch = _batch(gemma)
    with torch.no_grad():
        fast = target_token_loss(gemma.model, gemma.family, batch)
        full = gemma.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
        ).loss
    assert float(fast) == pytest.approx(float(full), abs=1e-5)

    trainer = get_trainer("lora")
    before = _logits(gemma)
    trained = trainer.train(gemma, EXAMPLES, trainer.make_config({"epochs": 1, "batch_size": 4}), tmp_path)
    assert trained.metrics["steps"] == 1 and trained.metrics["final_loss"] < 20
    model = load_expert(gemma, trained.weights_path, trained.config)
    assert not torch.equal(_logits(gemma, model), before)
    unload_expert(gemma, model)
    assert torch.equal(_logits(gemma), before)
