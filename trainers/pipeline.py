"""From a registered task to a ready expert: by training it (the ``train`` job) or by importing an adapter.

Steps, in the order that keeps the catalogue honest: load and render the task's examples; train; upload the
weights (verified); embed S library samples; then publish, which records the artifact, inserts the entries,
takes the next library version and marks the expert ready in one transaction, only while this worker still
holds the job's lease. A crash anywhere before that leaves no ready expert, and the job is claimed again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from elmreg.data.examples import task_examples
from elmreg.data.prompts import PromptedExample, library_text
from elmreg.experts import load_expert, unload_expert
from elmreg.experts.lora import CONFIG_FILE, export_peft_folder
from elmreg.models.backbones import Backbone
from elmreg.models.embedder import load_embedder
from elmreg.registry.entities import Expert, Task, TrainingRun
from elmreg.registry.errors import (
    AlreadyExistsError,
    CatalogueError,
    NotFoundError,
    TaskSpecError,
    first_line,
)
from elmreg.registry.gc import publishing_artifacts
from elmreg.registry.kinds import LORA, TrainingConfig, weights_kind
from elmreg.registry.leases import Lease
from elmreg.registry.names import check_expert_name, derived_expert_name
from elmreg.registry.outputs import check_writable_folder
from elmreg.registry.pause_points import pause_point
from elmreg.registry.progress import SILENT, Reporter
from elmreg.runtime.context import RegistryContext
from elmreg.runtime.library_embedding import (
    SAMPLES_PER_EXPERT,
    embed_entries,
    register_embedder,
    sample_indices,
)
from elmreg.trainers import get_trainer


def _expert_for(context: RegistryContext, task: Task, backbone_id: int) -> Expert:
    """The task's unfinished expert from an earlier attempt, or a new one."""
    for expert in reversed(context.catalogue.list_experts(task_id=task.id)):
        if expert.status in ("pending", "training", "failed"):
            return context.catalogue.set_expert_status(expert.id, "training")
    name = task.name
    for suffix in range(2, 1000):
        try:
            return context.catalogue.create_expert(
                name=name, backbone_id=backbone_id, kind=task.expert_kind, task_id=task.id, status="training"
            )
        except AlreadyExistsError:
            name = f"{task.name}-{suffix}"
    raise AlreadyExistsError(f"could not find a free expert name for task {task.name}")


def train_task(
    context: RegistryContext,
    task: Task,
    *,
    lease: Lease | None = None,
    reporter: Reporter = SILENT,
) -> Expert:
    """Train, upload and publish the expert of ``task``; returns it ready.

    With a ``lease`` (a ``train`` job), training stops and nothing is published once the lease is lost; without
    one the expert is trained inline.

    A task that already has a ready expert is not trained again (a job re-claimed after its worker died between
    publishing and reporting success must not add a second expert).
    """
    ready = _ready_expert(context, task, lease, reporter)
    if ready is not None:
        return ready
    trainer = get_trainer(task.expert_kind)
    config = trainer.make_config(task.training_config)
    reporter.stage(f"loading examples of {task.name} ({task.dataset}, K={task.max_examples})")
    examples = task_examples(
        task, cache_dir=context.settings.cache_path, limit=task.max_examples, seed=config.seed
    )
    init_weights = _init_weights(context, task, config.init_from) if config.init_from is not None else None
    backbone_id, backbone = _load_backbone(context, task, reporter)
    expert = _expert_for(context, task, backbone_id)
    run = _start_training_run(context, task, expert, config, lease)
    try:
        with tempfile.TemporaryDirectory(prefix="train-", dir=_tmp_dir(context)) as scratch:
            reporter.stage(
                f"training {task.expert_kind} expert on {len(examples)} examples, {config.epochs} epoch(s)"
            )
            trained = trainer.train(
                backbone,
                examples,
                config,
                Path(scratch),
                progress=reporter,
                should_stop=lease.check if lease else None,
                init_weights=init_weights,
            )
            published = publish(
                context,
                expert,
                trained.weights_path,
                config={**trained.config, "training": config.to_dict(), "examples": len(examples)},
                metrics=trained.metrics,
                examples=examples,
                seed=config.seed,
                lease=lease,
                reporter=reporter,
            )
            pause_point("published")  # tests kill a worker here: expert ready, its job not yet marked done
    except BaseException as exc:
        context.jobs.finish_training_run(run.id, status="failed", error=f"{type(exc).__name__}: {exc}"[:4000])
        context.catalogue.set_expert_status(expert.id, "failed")
        raise
    context.jobs.finish_training_run(run.id, status="succeeded", metrics=trained.metrics)
    reporter.stage(f"expert {published.name} is ready at library version {published.library_version}")
    return published


def _ready_expert(
    context: RegistryContext, task: Task, lease: Lease | None, reporter: Reporter
) -> Expert | None:
    """The task's ready expert if it has one (nothing to train then), its training run closed."""
    ready = [e for e in context.catalogue.list_experts(task_id=task.id) if e.status == "ready"]
    if not ready:
        return None
    reporter.stage(f"task {task.name} already has ready expert {ready[0].name}; nothing to train")
    if lease is not None:
        # The previous holder of this job died after publishing and before closing its training run: that
        # run did produce the ready expert, so close it as succeeded rather than leave it 'running' forever.
        for run in context.jobs.list_training_runs(task_id=task.id, status="running"):
            if run.job_id == lease.job_id and run.expert_id == ready[0].id:
                context.jobs.finish_training_run(run.id, status="succeeded", metrics=ready[0].metrics)
    return ready[0]


def _load_backbone(context: RegistryContext, task: Task, reporter: Reporter) -> tuple[int, Backbone]:
    """The task's backbone, loaded, with its catalogue id; records its fingerprint the first time it loads."""
    record = context.catalogue.get_backbone(task.backbone_id)
    reporter.stage(f"loading backbone {record.name}")
    backbone = context.backbones.get(record.name)
    if record.fingerprint is None:
        context.catalogue.get_or_create_backbone(
            record.name, backbone.family, fingerprint=backbone.fingerprint
        )
    return record.id, backbone


def _start_training_run(
    context: RegistryContext, task: Task, expert: Expert, config: TrainingConfig, lease: Lease | None
) -> TrainingRun:
    """A new running training run; under a lease, the job's runs that a dead worker left open are closed."""
    if lease is not None:
        context.jobs.abandon_training_runs(
            lease.job_id, f"abandoned: the worker stopped heartbeating; {lease.worker} took the job over"
        )
    return context.jobs.start_training_run(
        task_id=task.id,
        expert_id=expert.id,
        worker=lease.worker if lease else "inline",
        config={"kind": task.expert_kind, **config.to_dict()},
        job_id=lease.job_id if lease else None,
    )


def _init_weights(context: RegistryContext, task: Task, key: int | str) -> Path:
    """The weights file of the expert a task's training starts from (``init_from``), checked to fit."""
    try:
        source = context.catalogue.get_expert(key)
    except NotFoundError as exc:
        raise TaskSpecError(f"task {task.name}: init_from expert '{key}' does not exist") from exc
    if source.artifact is None or source.kind != task.expert_kind or source.backbone_id != task.backbone_id:
        raise TaskSpecError(
            f"task {task.name}: init_from expert {source.name} must be a trained {task.expert_kind} expert "
            "on the task's backbone"
        )
    return context.artifact_cache.fetch(source.artifact)


def publish(
    context: RegistryContext,
    expert: Expert,
    weights_path: Path,
    *,
    config: dict[str, Any],
    metrics: dict[str, Any],
    examples: Sequence[PromptedExample],
    seed: int,
    lease: Lease | None = None,
    reporter: Reporter = SILENT,
) -> Expert:
    """Upload the weights (verified), embed S library samples of ``examples``, and make the expert ready
    (with a ``lease``: only while it is still held)."""
    # From the upload (or the decision to skip it) until the expert references the object, garbage collection
    # must not delete it: see registry/gc.py.
    with publishing_artifacts(context.jobs):
        reporter.stage("uploading weights")
        artifact = context.artifacts.put_file(weights_path)
        pause_point("uploaded")  # tests kill a worker here: weights stored, nothing refers to them yet
        reporter.stage(f"embedding {min(SAMPLES_PER_EXPERT, len(examples))} library samples")
        embedder = load_embedder(context.settings.embedder)
        chosen = sample_indices(len(examples), SAMPLES_PER_EXPERT, seed=seed)
        entries = embed_entries(embedder, [library_text(examples[i]) for i in chosen])
        if lease is not None:
            lease.check()
        return context.catalogue.publish_expert(
            expert.id,
            artifact=artifact,
            embedder_id=register_embedder(context.catalogue, embedder).id,
            entries=entries,
            metrics=metrics,
            config=config,
            lease=lease.holder if lease else None,
        )


def _tmp_dir(context: RegistryContext) -> Path:
    path = context.settings.cache_path / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def import_peft_adapter(
    context: RegistryContext,
    folder: Path,
    task: Task,
    *,
    name: str | None = None,
    reporter: Reporter = SILENT,
) -> Expert:
    """Register an existing PEFT LoRA adapter folder as the expert of ``task``.

    The adapter is loaded onto the task's backbone first, so one that does not fit is refused before anything
    is written; its library samples come from the task's training data, as for a trained expert.

    Raises:
        UserError: Not a PEFT LoRA folder, or it does not fit the task's backbone.
    """
    # Checked before the backbone loads: a bad name must not cost a minute of loading first.
    name = check_expert_name(name) if name is not None else derived_expert_name(f"{task.name}-imported")
    config_file, weights = folder / CONFIG_FILE, folder / LORA.weights_file
    pickled = [p.name for p in (folder / "adapter_model.bin", folder / "pytorch_model.bin") if p.is_file()]
    if pickled and not weights.is_file():
        # A .bin adapter is a torch pickle: loading it can run any code, so elmreg never does.
        raise TaskSpecError(
            f"{folder} holds {pickled[0]}, a pickle; elmreg loads weights only from safetensors: save the adapter "
            f"with save_pretrained(..., safe_serialization=True) to get {LORA.weights_file}"
        )
    if not config_file.is_file() or not weights.is_file():
        raise TaskSpecError(
            f"{folder} is not a PEFT adapter folder (needs {CONFIG_FILE} and {LORA.weights_file})"
        )
    try:
        adapter_config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TaskSpecError(f"{config_file} is not JSON in UTF-8: {first_line(exc)}") from exc
    if not isinstance(adapter_config, dict):
        raise TaskSpecError(f"{config_file} is not a JSON object; is {folder} a PEFT adapter folder?")
    if adapter_config.get("peft_type") != "LORA":
        raise TaskSpecError(
            f"{folder} holds a {adapter_config.get('peft_type')} adapter; only LoRA can be imported"
        )
    if task.expert_kind != LORA.name:
        raise TaskSpecError(f"task {task.name} trains {task.expert_kind} experts; import into a lora task")
    backbone_record = context.catalogue.get_backbone(task.backbone_id)
    reporter.stage(f"checking the adapter against backbone {backbone_record.name}")
    backbone = context.backbones.get(backbone_record.name)
    config = {"kind": LORA.name, "adapter_config": adapter_config}
    try:
        model = load_expert(backbone, weights, config, label=str(folder))
    except Exception as exc:  # noqa: BLE001 - peft raises assorted errors for shape and module mismatches
        raise TaskSpecError(
            f"the adapter in {folder} does not fit backbone {backbone_record.name}: {first_line(exc)}"
        ) from exc
    unload_expert(backbone, model)
    examples = task_examples(task, cache_dir=context.settings.cache_path, limit=task.max_examples)
    expert = context.catalogue.create_expert(
        name=name, backbone_id=backbone_record.id, kind=LORA.name, task_id=task.id
    )
    return publish(
        context,
        expert,
        weights,
        config={**config, "imported_from": str(folder)},
        metrics={},
        examples=examples,
        seed=0,
        reporter=reporter,
    )


def export_expert(context: RegistryContext, expert: Expert, out_dir: Path) -> Path:
    """Write an expert to ``out_dir``: a PEFT folder for LoRA, else its safetensors file; always a JSON card."""
    if expert.artifact is None:
        raise CatalogueError(f"expert {expert.name} has no weights yet (status {expert.status})")
    check_writable_folder(out_dir)  # before a download of maybe gigabytes
    weights = context.artifact_cache.fetch(expert.artifact)
    out_dir.mkdir(parents=True, exist_ok=True)
    if weights_kind(expert) == LORA.name:  # merged LoRA experts are PEFT adapters too
        export_peft_folder(weights, expert.config, out_dir)
    else:
        shutil.copyfile(weights, out_dir / f"{expert.kind}.safetensors")
    card = {k: v for k, v in dataclasses.asdict(expert).items() if k not in ("metrics",)}
    card["backbone"] = context.catalogue.get_backbone(expert.backbone_id).name
    (out_dir / "elmreg_expert.json").write_text(json.dumps(card, indent=2, default=str))
    return out_dir
