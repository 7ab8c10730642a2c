"""Registering tasks: validate the data and the prompt, then record the task and queue its training.

Everything that can be wrong with a task is checked before anything is written: the dataset, split and columns,
the template (syntax, fields, that it renders), the answer choices of a classification task, the training
options, the backbone, and the name. The task row and its training job are then written in one transaction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elmreg.data.prompts import (
    PromptTemplate,
    check_classification,
    default_metric,
    infer_task_type,
    load_promptsource_templates,
    render_examples,
    select_template,
)
from elmreg.data.sources import DatasetSpec, default_template, load_dataset_rows
from elmreg.models.backbones import backbone_family
from elmreg.registry.entities import Job, Task
from elmreg.registry.errors import AlreadyExistsError, NotFoundError, TaskSpecError, UserError, first_line
from elmreg.registry.kinds import get_expert_kind, trainable_kinds
from elmreg.registry.names import InvalidNameError, check_task_name
from elmreg.registry.tags import check_description, merged_tags
from elmreg.runtime.context import RegistryContext

LEVELS = ("prompt", "dataset")
METRICS = ("accuracy", "rouge_l", "bleu")
# The paper samples K=50,000 training examples per classification task and 10,000 per generative task.
DEFAULT_MAX_EXAMPLES = {"classification": 50_000, "generative": 10_000}
_VALIDATION_ROWS = 64


@dataclass(frozen=True)
class TaskRequest:
    """What ``elmreg add-task`` (or a manifest entry) asks for."""

    dataset: str
    subset: str | None = None
    split: str = "train"
    prompt: str | None = None
    answer_choices: str | None = None
    template_file: str | None = None
    template_name: str | None = None
    name: str | None = None
    level: str = "prompt"
    max_examples: int | None = None
    kind: str = "lora"
    backbone: str | None = None
    task_type: str | None = None
    metric: str | None = None
    training: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    description: str | None = None  # Markdown

    @classmethod
    def from_mapping(cls, values: dict[str, Any], where: str = "manifest") -> TaskRequest:
        """Build from a manifest entry (keys as the CLI options, with underscores)."""
        known = set(cls.__dataclass_fields__)
        normalised = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise TaskSpecError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        if "dataset" not in normalised:
            raise TaskSpecError(f"{where}: every entry needs a 'dataset'")
        return cls(**normalised)


@dataclass(frozen=True)
class TaskPlan:
    """A validated request: what will be written."""

    fields: dict[str, Any]
    backbone: str
    backbone_family: str
    rows_available: int
    examples_checked: int


def _templates(request: TaskRequest, spec: DatasetSpec, rows: list[dict[str, Any]]) -> list[PromptTemplate]:
    if request.prompt and request.template_file:
        raise TaskSpecError("give either --prompt or --template-file, not both")
    if request.prompt:
        if "|||" not in request.prompt:
            raise TaskSpecError(
                "the prompt needs '|||' between input and target, e.g. '{{question}} ||| {{answer}}'"
            )
        return [PromptTemplate.inline(request.prompt, request.answer_choices)]
    if request.template_file:
        templates = load_promptsource_templates(Path(request.template_file).expanduser())
        if request.level == "dataset":
            return (
                templates
                if not request.template_name
                else [select_template(templates, request.template_name)]
            )
        if not request.template_name:
            names = ", ".join(sorted(t.name for t in templates))
            raise TaskSpecError(
                f"pick a template with --template-name (or use --level dataset for all): {names}"
            )
        return [select_template(templates, request.template_name, request.template_file)]
    template = default_template(spec, rows)
    if request.answer_choices:
        template = PromptTemplate.inline(template.jinja, request.answer_choices, template.name)
    return [template]


def default_task_name(request: TaskRequest) -> str:
    """The name a task gets without --name: the dataset (and subset, and template for prompt-level tasks)."""
    if request.dataset.startswith("bigbench:"):
        base = request.dataset.removeprefix("bigbench:").replace("/", ".")
    else:
        path = Path(request.dataset)
        base = path.stem if path.suffix else path.name or request.dataset
    if request.subset:
        base += f".{request.subset}"
    if request.level == "prompt" and request.template_file and request.template_name:
        base += "." + re.sub(r"[^A-Za-z0-9_.-]+", "_", request.template_name).strip("_")
    return base


def plan_task(context: RegistryContext, request: TaskRequest, *, to_register: bool = True) -> TaskPlan:
    """Check everything about a task request without writing anything.

    With ``to_register`` False the data is only evaluated (an unseen task), so its name may be a registered
    task's.

    The training options are checked by the kind's config class (``registry.kinds``) here, so every way a task
    is created (CLI, API, manifests, the scheduler's nightly ingestion) validates them.

    Raises:
        UserError: (TaskSpecError, AlreadyExistsError, ConfigurationError) what is wrong, and how to fix it.
    """
    if request.kind not in trainable_kinds():
        raise TaskSpecError(
            f"unknown expert kind '{request.kind}'; choose one of {', '.join(trainable_kinds())}"
        )
    if request.level not in LEVELS:
        raise TaskSpecError(f"unknown level '{request.level}'; choose 'prompt' or 'dataset'")
    if request.max_examples is not None and request.max_examples < 1:
        raise TaskSpecError(f"--max-examples must be at least 1, got {request.max_examples}")
    if request.task_type not in (None, "classification", "generative"):
        raise TaskSpecError("--task-type must be 'classification' or 'generative'")
    if request.metric not in (None, *METRICS):
        raise TaskSpecError(f"unknown metric '{request.metric}'; choose one of {', '.join(METRICS)}")
    if request.name is not None:
        check_task_name(request.name)
    if request.name is not None and to_register:
        _ensure_free(context, request.name)
    get_expert_kind(request.kind).make_config(request.training)
    tags = merged_tags({}, request.tags)
    if request.description is not None:
        check_description(request.description)

    spec = DatasetSpec(request.dataset, request.subset, request.split)
    cache = context.settings.cache_path
    seed = int(request.training.get("seed", 0))
    loaded = load_dataset_rows(spec, cache_dir=cache, seed=seed)
    templates = _templates(request, spec, loaded.rows)
    for template in templates:
        template.validate_against(loaded.columns, spec.label())
    sample = loaded.rows[:_VALIDATION_ROWS]
    examples = render_examples(sample, templates, seed=seed)
    if not examples:
        raise TaskSpecError(
            f"the template renders no example from the first {len(sample)} rows of {spec.label()} "
            "(empty input or target); check the template against the data"
        )
    task_type = request.task_type or infer_task_type(examples)
    if task_type == "classification":
        check_classification(examples, request.name or request.dataset)
    name = request.name or default_task_name(request)
    if request.name is None:
        try:
            check_task_name(name)
        except InvalidNameError:
            raise TaskSpecError(f"cannot derive a task name from '{request.dataset}'; give --name") from None
        if to_register:
            _ensure_free(context, name)
    backbone_name = request.backbone or context.settings.backbone
    family = backbone_family(backbone_name)
    fields = {
        "name": name,
        "dataset": request.dataset,
        "subset": request.subset,
        "split": request.split,
        "level": request.level,
        "task_type": task_type,
        "metric": request.metric or default_metric(task_type),
        "templates": [t.to_dict() for t in templates],
        "max_examples": request.max_examples or DEFAULT_MAX_EXAMPLES[task_type],
        "expert_kind": request.kind,
        "training_config": dict(request.training),
        "tags": tags,
        "description": request.description or None,
    }
    return TaskPlan(
        fields, backbone_name, family, rows_available=loaded.total, examples_checked=len(examples)
    )


def _ensure_free(context: RegistryContext, name: str) -> None:
    try:
        context.catalogue.get_task(name)
    except NotFoundError:
        return
    raise AlreadyExistsError(f"a task named '{name}' already exists; choose another --name")


def add_task(
    context: RegistryContext, request: TaskRequest, *, enqueue: bool = True
) -> tuple[Task, Job | None]:
    """Validate a task request, then register the task and queue its training job in one transaction.

    Raises:
        UserError: The request is invalid; nothing was written.
    """
    plan = plan_task(context, request)
    backbone = context.catalogue.get_or_create_backbone(plan.backbone, plan.backbone_family)
    return context.catalogue.create_task(enqueue_training=enqueue, backbone_id=backbone.id, **plan.fields)


# -- nightly ingestion of manifests -----------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestReport:
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def read_manifests(folder: Path) -> list[tuple[str, TaskRequest | UserError]]:
    """Task requests from every ``*.yaml``/``*.yml`` in ``folder`` (each a YAML list of add-task specs), each
    labelled ``file#entry``; an unreadable file or entry comes back as its error, so that the others still count."""
    requests: list[tuple[str, TaskRequest | UserError]] = []
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            requests.append((path.name, TaskSpecError(f"not valid YAML: {first_line(exc)}")))
            continue
        if not isinstance(entries, list):
            requests.append((path.name, TaskSpecError("must be a YAML list of tasks")))
            continue
        for i, entry in enumerate(entries):
            where = f"{path.name}#{i + 1}"
            if not isinstance(entry, dict):
                requests.append((where, TaskSpecError("not a mapping of add-task options")))
                continue
            try:
                requests.append((where, TaskRequest.from_mapping(entry, f"{path.name} entry {i + 1}")))
            except UserError as exc:
                requests.append((where, exc))
    return requests


def ingest_manifests(context: RegistryContext, folder: Path | None = None) -> IngestReport:
    """Register every manifest task that is not registered yet; one bad entry does not stop the others."""
    folder = folder or Path(context.settings.manifest_dir or context.settings.home / "manifests").expanduser()
    if not folder.is_dir():
        return IngestReport()
    existing = {t.name for t in context.catalogue.list_tasks()}
    report = IngestReport()
    for where, request in read_manifests(folder):
        if isinstance(request, UserError):
            report.failed.append((where, str(request)))
            continue
        name = request.name or default_task_name(request)
        if name in existing:
            report.skipped.append(name)
            continue
        try:
            task, _ = add_task(context, request)
        except AlreadyExistsError:  # registered meanwhile by someone else
            report.skipped.append(name)
            continue
        except UserError as exc:
            report.failed.append((where, str(exc)))
            continue
        existing.add(task.name)
        report.added.append(task.name)
    return report
