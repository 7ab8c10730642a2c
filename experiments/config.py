"""Experiment configurations: a preset name from ``benchmarks/paper/`` or a YAML file of the same shape.

A configuration names the seen tasks (one expert each), the new tasks added for the continual-learning section,
the held-out (unseen) tasks, and the options every task shares (expert kind, K, training). Task entries are
``add-task`` specifications: a dataset string, or a mapping of ``TaskRequest`` fields; shared options fill in
what an entry leaves out, so an entry reads exactly like ``registry.add_task(dataset, **options)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from elmreg.data.prompts import load_promptsource_templates
from elmreg.inference.routers import make_router
from elmreg.registry.errors import UserError, first_line
from elmreg.runtime.tasks import TaskRequest, default_task_name

SECTIONS = ("routing", "multitask", "continual", "unseen", "ablation", "routers")
# "routers" compares routing methods and is opt-in: run when a config lists it in 'sections' or lists routers.
DEFAULT_SECTIONS = SECTIONS[:5]
# The paper's Table 10: what the retrieval text of a library sample / query holds.
TEXT_FORMATS = ("both", "instance", "choices")
# Presets live with the benchmarks, not in the package: they are documentation as much as configuration.
PRESET_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "paper"


@dataclass(frozen=True)
class TaskSpec:
    """One task of an experiment: its name and the ``add_task`` options that register it."""

    name: str
    dataset: str
    options: dict[str, Any]
    eval_split: str = "validation"

    def request(self) -> TaskRequest:
        return TaskRequest(dataset=self.dataset, name=self.name, **self.options)


@dataclass(frozen=True)
class RouterSpec:
    """One router of the 'routers' section: a registered routing method with its options."""

    router: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.router
        return f"{self.router}({', '.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"


DEFAULT_ROUTERS = (
    RouterSpec("roe"),
    RouterSpec("roe-knn"),
    RouterSpec("centroid"),
    RouterSpec("per-instance"),
)


@dataclass(frozen=True)
class ExperimentConfig:
    """What ``elmreg experiment run`` runs; see ``benchmarks/paper/README.md`` for every key."""

    name: str
    seen: tuple[TaskSpec, ...]
    new: tuple[TaskSpec, ...] = ()
    unseen: tuple[TaskSpec, ...] = ()
    description: str = ""
    backbone: str | None = None
    q: int = 32
    eval_limit: int | None = 32
    # Validation examples per cell of the seen experts x seen tasks matrix (it picks the seen-side oracle and the
    # best single expert); smaller than eval_limit where the N x N matrix would dominate the run's time.
    matrix_limit: int | None = 32
    seed: int = 0
    rehearsal: int = 64
    sections: tuple[str, ...] = SECTIONS
    formats: tuple[str, ...] = TEXT_FORMATS
    embedders: tuple[str, ...] = ()
    routers: tuple[RouterSpec, ...] = DEFAULT_ROUTERS
    source: str = ""
    shared: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A short hash of everything that decides what gets trained (names of derived tasks use it)."""
        spec = {
            "seen": [(t.name, t.dataset, t.options) for t in self.seen],
            "new": [(t.name, t.dataset, t.options) for t in self.new],
            "seed": self.seed,
            "rehearsal": self.rehearsal,
            "backbone": self.backbone,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:10]


def list_presets() -> dict[str, str]:
    """Preset name -> its description, from ``benchmarks/paper/*.yaml``."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        document = yaml.safe_load(path.read_text()) or {}
        presets[path.stem] = str(document.get("description", "")).strip()
    return presets


def load_config(preset_or_path: str, **overrides: Any) -> ExperimentConfig:
    """A preset (``cpu-small``, ``paper``) or a YAML file, with ``overrides`` (e.g. ``eval_limit=8``) applied.

    Raises:
        UserError: Unknown preset, unreadable YAML, or a key that is not understood.
    """
    path = Path(preset_or_path).expanduser()
    if not path.is_file():
        candidate = PRESET_DIR / f"{preset_or_path}.yaml"
        if not candidate.is_file():
            known = ", ".join(list_presets()) or "none found"
            raise UserError(f"'{preset_or_path}' is neither a YAML file nor a preset (presets: {known})")
        path = candidate
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid YAML in UTF-8: {first_line(exc)}") from exc
    if not isinstance(document, dict):
        raise UserError(f"{path} must be a YAML mapping (name, seen, new, unseen, ...)")
    document = {**document, **{k: v for k, v in overrides.items() if v is not None}}
    return config_from_mapping(document, source=str(path), base_dir=path.parent)


_TOP_KEYS = {
    "name",
    "routers",
    "description",
    "backbone",
    "kind",
    "max_examples",
    "training",
    "task_options",
    "seed",
    "q",
    "eval_limit",
    "matrix_limit",
    "rehearsal",
    "sections",
    "seen",
    "new",
    "unseen",
    "ablation",
    "template_root",
}


def config_from_mapping(
    document: dict[str, Any], *, source: str = "", base_dir: Path | None = None
) -> ExperimentConfig:
    """Build and check a configuration from its YAML mapping (see :func:`load_config`)."""
    unknown = sorted(set(document) - _TOP_KEYS)
    if unknown:
        raise UserError(
            f"{source or 'config'}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}"
        )
    name = str(document.get("name") or Path(source).stem or "experiment")
    backbone = document.get("backbone")
    # What every task shares unless its entry says otherwise (the paper: one kind, K and schedule for all).
    shared: dict[str, Any] = {"kind": document.get("kind", "lora")}
    if document.get("max_examples") is not None:
        shared["max_examples"] = int(document["max_examples"])
    if backbone:
        shared["backbone"] = backbone
    shared["training"] = dict(document.get("training") or {})
    if int(document.get("seed", 0)):
        # Seed 0 is the trainers' default: left out, the options stay identical to tasks registered without one.
        shared["training"].setdefault("seed", int(document["seed"]))
    shared.update(document.get("task_options") or {})
    template_root = document.get("template_root")
    roots = [Path(str(template_root)).expanduser()] if template_root else []
    if base_dir is not None:
        roots.append(base_dir)

    def specs(key: str, train: bool) -> tuple[TaskSpec, ...]:
        entries = document.get(key) or []
        if not isinstance(entries, list):
            raise UserError(f"{source}: '{key}' must be a list of tasks")
        out: list[TaskSpec] = []
        for i, entry in enumerate(entries):
            out.extend(_expand(entry, shared if train else _eval_only(shared), roots, f"{key}[{i}]"))
        return tuple(out)

    seen, new, unseen = specs("seen", True), specs("new", True), specs("unseen", False)
    if not seen:
        raise UserError(f"{source}: an experiment needs at least one seen task")
    names = [t.name for t in (*seen, *new, *unseen)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"{source}: task(s) listed twice: {', '.join(duplicates)}")
    sections = tuple(document.get("sections") or (SECTIONS if document.get("routers") else DEFAULT_SECTIONS))
    bad = sorted(set(sections) - set(SECTIONS))
    if bad:
        raise UserError(f"{source}: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    ablation = document.get("ablation") or {}
    formats = tuple(ablation.get("formats") or TEXT_FORMATS)
    if set(formats) - set(TEXT_FORMATS):
        raise UserError(f"{source}: ablation formats must be among {', '.join(TEXT_FORMATS)}")
    routers = _routers(document.get("routers"), source)
    q = int(document.get("q", 32))
    eval_limit = document.get("eval_limit", 32)
    if q < 1 or (eval_limit is not None and int(eval_limit) < 1):
        raise UserError(f"{source}: q and eval_limit must be at least 1")
    return ExperimentConfig(
        name=name,
        description=str(document.get("description", "")).strip(),
        backbone=backbone,
        seen=seen,
        new=new,
        unseen=unseen,
        q=q,
        eval_limit=int(eval_limit) if eval_limit is not None else None,
        matrix_limit=int(document["matrix_limit"])
        if document.get("matrix_limit")
        else (int(eval_limit) if eval_limit is not None else None),
        seed=int(document.get("seed", 0)),
        rehearsal=int(document.get("rehearsal", 64)),
        sections=tuple(s for s in SECTIONS if s in sections),
        formats=formats,
        embedders=tuple(ablation.get("embedders") or ()),
        routers=routers,
        source=source,
        shared=shared,
    )


def _routers(entries: Any, source: str) -> tuple[RouterSpec, ...]:
    """The 'routers' key: names or ``{router: NAME, options: {...}}``, each checked against the registry."""
    if not entries:
        return DEFAULT_ROUTERS
    if not isinstance(entries, list):
        raise UserError(
            f"{source}: 'routers' must be a list of router names or {{router: NAME, options: ...}}"
        )
    specs = []
    for entry in entries:
        spec = RouterSpec(entry) if isinstance(entry, str) else None
        if isinstance(entry, dict) and isinstance(entry.get("router"), str):
            spec = RouterSpec(entry["router"], dict(entry.get("options") or {}))
        if spec is None:
            raise UserError(f"{source}: a router is a name or {{router: NAME, options: ...}}, not {entry!r}")
        make_router(spec.router, spec.options)  # unknown names and options fail here, before anything runs
        specs.append(spec)
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise UserError(f"{source}: a router is listed twice")
    return tuple(specs)


def _eval_only(shared: dict[str, Any]) -> dict[str, Any]:
    # Unseen tasks are only rendered and evaluated, never trained: training options do not apply.
    return {k: v for k, v in shared.items() if k in ("backbone",)}


def _expand(entry: Any, shared: dict[str, Any], roots: list[Path], where: str) -> list[TaskSpec]:
    """One config entry -> task specs; ``prompts: all`` makes one prompt-level task per template of the file
    (the paper's Prompt Experts), ``prompts: original`` only those promptsource marks as the original task."""
    if isinstance(entry, str):
        entry = {"dataset": entry}
    if not isinstance(entry, dict) or "dataset" not in entry:
        raise UserError(f"{where}: a task is a dataset string or a mapping with a 'dataset'")
    entry = dict(entry)
    prompts = entry.pop("prompts", None)
    # The split routed and scored (``split`` is the training split, as for add-task).
    eval_split = str(entry.pop("eval_split", "validation"))
    if entry.get("template_file"):
        entry["template_file"] = str(_resolve(entry["template_file"], roots))
    options = {**shared, **{k: v for k, v in entry.items() if k != "dataset"}}
    if "training" in entry:
        options["training"] = {**shared.get("training", {}), **(entry.get("training") or {})}
    known = set(TaskRequest.__dataclass_fields__) - {"dataset"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown task option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if prompts is None:
        name = options.pop("name", None) or default_task_name(
            TaskRequest(dataset=entry["dataset"], **options)
        )
        return [TaskSpec(name, entry["dataset"], options, eval_split)]
    if prompts not in ("all", "original") or not options.get("template_file"):
        raise UserError(f"{where}: 'prompts' is 'all' or 'original' and needs a 'template_file'")
    templates = load_promptsource_templates(Path(options["template_file"]))
    out = []
    for template in templates:
        if prompts == "original" and template.original_task is False:
            continue
        per_prompt = {**options, "template_name": template.name, "level": "prompt"}
        per_prompt.pop("name", None)
        name = default_task_name(TaskRequest(dataset=entry["dataset"], **per_prompt))
        out.append(TaskSpec(name, entry["dataset"], per_prompt, eval_split))
    return out


def _resolve(value: str, roots: list[Path]) -> Path:
    path = Path(str(value)).expanduser()
    if path.is_absolute():
        return path
    for root in roots:
        if (root / path).exists():
            return root / path
    return (roots[0] / path) if roots else path
