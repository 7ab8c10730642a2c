"""Prompt templates in promptsource's format (the T0/P3 prompts), rendered in Jinja's sandbox.

A template is Jinja source in which ``|||`` separates the model input from the target, for example
``{{question}} ||| {{answer_choices[label]}}``. ``answer_choices`` is itself a Jinja template whose rendered text
is split on ``|||`` (``"no ||| yes"`` or ``"{{choice1}} ||| {{choice2}}"``); inside the main template it is
available as the list ``answer_choices``. promptsource's ``templates.yaml`` files are read natively (the
promptsource package itself needs Python < 3.10).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from elmreg.registry.errors import TaskSpecError

SEPARATOR = "|||"
_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined)


@dataclass(frozen=True)
class PromptedExample:
    """One rendered training or query instance."""

    input: str
    target: str
    answer_choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template (promptsource's fields; ``name`` identifies it within a dataset)."""

    jinja: str
    name: str = "inline"
    answer_choices: str | None = None
    id: str | None = None
    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def inline(cls, jinja: str, answer_choices: str | None = None, name: str = "inline") -> PromptTemplate:
        """A template given on the command line; checked for syntax at once."""
        template = cls(jinja=jinja, name=name, answer_choices=answer_choices or None)
        template.required_fields()
        return template

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        return cls(**{**data, "metrics": tuple(data.get("metrics") or ())})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": list(self.metrics)}

    def required_fields(self) -> set[str]:
        """Dataset columns the template (and its answer choices) read.

        Raises:
            TaskSpecError: The template is not valid Jinja.
        """
        names: set[str] = set()
        for source in (self.jinja, self.answer_choices):
            if not source:
                continue
            try:
                names |= meta.find_undeclared_variables(_ENV.parse(source))
            except jinja2.TemplateSyntaxError as exc:
                raise TaskSpecError(
                    f"template '{self.name}' is not valid Jinja: {exc.message} (line {exc.lineno})"
                ) from exc
        return names - {"answer_choices"}

    def validate_against(self, columns: Iterable[str], dataset: str = "the dataset") -> None:
        """Raise TaskSpecError naming the first field the template reads that the dataset lacks."""
        available = set(columns)
        missing = sorted(self.required_fields() - available)
        if missing:
            raise TaskSpecError(
                f"template '{self.name}' uses field '{missing[0]}', which is not a column of {dataset} "
                f"(columns: {', '.join(sorted(available))}); fix the template or pick another dataset"
            )

    def choices(self, row: dict[str, Any]) -> tuple[str, ...] | None:
        if not self.answer_choices:
            return None
        rendered = _render(self.answer_choices, row, self.name)
        return tuple(c.strip() for c in rendered.split(SEPARATOR))

    def render(self, row: dict[str, Any], *, require_target: bool = True) -> PromptedExample | None:
        """Render one dataset row; None when the template yields no input (or, with ``require_target``, no
        target) for it. Unlabeled instances to route or predict are rendered with ``require_target=False``.

        promptsource templates legitimately skip rows (e.g. a template for rows with a given label);
        such rows are left out of training rather than trained on an empty target.

        Raises:
            TaskSpecError: The template reads a field the row lacks or fails to render.
        """
        choices = self.choices(row)
        context = dict(row)
        if choices is not None:
            context["answer_choices"] = list(choices)
        parts = _render(self.jinja, context, self.name).split(SEPARATOR)
        if len(parts) < 2:
            raise TaskSpecError(
                f"template '{self.name}' has no '{SEPARATOR}' between input and target; write 'input ||| target'"
            )
        source, target = parts[0].strip(), parts[1].strip()
        if not source or (require_target and not target):
            return None
        return PromptedExample(input=source, target=target, answer_choices=choices)


def _render(source: str, context: dict[str, Any], name: str) -> str:
    try:
        return _ENV.from_string(source).render(**context)
    except jinja2.UndefinedError as exc:
        raise TaskSpecError(
            f"template '{name}' failed on a row: {exc.message}; check the field names"
        ) from exc
    except jinja2.TemplateError as exc:
        raise TaskSpecError(f"template '{name}' failed to render: {exc}") from exc
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise TaskSpecError(f"template '{name}' failed to render a row: {type(exc).__name__}: {exc}") from exc


# -- promptsource's templates.yaml --------------------------------------------------------------------------------
class _PromptsourceLoader(yaml.SafeLoader):
    """SafeLoader that understands promptsource's ``!Template`` and ``!TemplateMetadata`` tags."""


def _mapping(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    return loader.construct_mapping(node, deep=True)


_PromptsourceLoader.add_constructor("!Template", _mapping)
_PromptsourceLoader.add_constructor("!TemplateMetadata", _mapping)


def load_promptsource_templates(path: Path) -> list[PromptTemplate]:
    """Every template of a promptsource ``templates.yaml``.

    Raises:
        TaskSpecError: The file is missing, not YAML, or holds no templates.
    """
    try:
        document = yaml.load(Path(path).read_text(), Loader=_PromptsourceLoader)  # noqa: S506 - SafeLoader subclass
    except OSError as exc:
        raise TaskSpecError(f"cannot read template file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise TaskSpecError(f"{path} is not valid YAML: {exc}") from exc
    raw = (document or {}).get("templates") if isinstance(document, dict) else None
    if not raw:
        raise TaskSpecError(f"{path} has no 'templates' section; is it a promptsource templates.yaml?")
    templates = []
    for key, entry in raw.items():
        metadata = entry.get("metadata") or {}
        templates.append(
            PromptTemplate(
                jinja=entry["jinja"],
                name=entry.get("name") or str(key),
                answer_choices=entry.get("answer_choices"),
                id=str(entry.get("id") or key),
                original_task=metadata.get("original_task"),
                choices_in_prompt=metadata.get("choices_in_prompt"),
                metrics=tuple(metadata.get("metrics") or ()),
            )
        )
    return templates


def select_template(
    templates: Sequence[PromptTemplate], name: str, path: Path | str = "the file"
) -> PromptTemplate:
    """The template called ``name`` (raises TaskSpecError listing the available names)."""
    for template in templates:
        if template.name == name:
            return template
    names = ", ".join(sorted(t.name for t in templates))
    raise TaskSpecError(f"no template '{name}' in {path}; available: {names}")


# -- from rows to prompted examples --------------------------------------------------------------------------------
# The retrieval texts of the paper's Table 10 ablation; "both" is the library's own format.
LIBRARY_TEXT_FORMATS = ("both", "instance", "choices")


def library_text(example: PromptedExample, text_format: str = "both") -> str:
    """The paper's retrieval text for a library sample or a routing query (``text_format``: its ablation's
    variants, for experiments; the library itself always uses "both")."""
    choices = " | ".join(example.answer_choices) if example.answer_choices else "None"
    if text_format == "instance":
        return f"Instance: {example.input}"
    if text_format == "choices":
        return f"Answer Choices: {choices}"
    return f"Answer Choices: {choices}, Instance: {example.input}"


def render_examples(
    rows: Sequence[dict[str, Any]], templates: Sequence[PromptTemplate], *, seed: int = 0
) -> list[PromptedExample]:
    """Prompted examples for a task.

    With one template (a prompt-level task: one Prompt Expert) every row is rendered with it. With several (a
    dataset-level task: one Dataset Expert over all prompts of the dataset) each row is rendered with one
    template drawn by a seeded RNG, so the expert sees every prompt without multiplying the data.
    Rows a template skips (empty input or target) are left out.
    """
    if not templates:
        raise TaskSpecError("a task needs at least one prompt template")
    rng = random.Random(seed)
    examples = []
    for row in rows:
        template = templates[0] if len(templates) == 1 else rng.choice(templates)
        example = template.render(row)
        if example is not None:
            examples.append(example)
    return examples


def infer_task_type(examples: Sequence[PromptedExample]) -> str:
    """'classification' when the rendered examples carry answer choices, else 'generative'."""
    with_choices = sum(1 for e in examples if e.answer_choices)
    return "classification" if examples and with_choices == len(examples) else "generative"


def default_metric(task_type: str) -> str:
    return "accuracy" if task_type == "classification" else "rouge_l"


def check_classification(examples: Sequence[PromptedExample], task_name: str) -> None:
    """A classification task must give every example its answer choices, and the target must be one of them."""
    for i, example in enumerate(examples):
        if not example.answer_choices:
            raise TaskSpecError(
                f"task '{task_name}' is classification but example {i} has no answer choices; "
                "give --answer-choices (e.g. 'no ||| yes') or use --task-type generative"
            )
        if example.target not in example.answer_choices:
            raise TaskSpecError(
                f"task '{task_name}': the target '{example.target}' of example {i} is not one of its answer "
                f"choices {list(example.answer_choices)}; fix the template or the answer choices"
            )
