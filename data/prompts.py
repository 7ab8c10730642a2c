"""Prompt templates in promptsource's format (the T0/P3 prompts), rendered in Jinja's sandbox.

A template is Jinja source in which ``|||`` separates the model input from the target, for example
``{{question}} ||| {{answer_choices[label]}}``. ``answer_choices`` is itself a Jinja template whose rendered text
is split on ``|||`` (``"no ||| yes"`` or ``"{{choice1}} ||| {{choice2}}"``); inside the main template it is
available as the list ``answer_choices``. promptsource's ``templates.yaml`` files are read natively (the
promptsource package itself needs Python < 3.10).

Rendering follows promptsource's ``Template.apply`` (checked over every template of the promptsource 0.2.3 sdist
by ``tests/test_promptsource_corpus.py``):

- promptsource's filters ``choice``, ``most_frequent`` and ``highlight`` and its global ``zip`` are available.
  ``choice`` (and Jinja's ``random``, which a few templates use the same way) is *seeded*: promptsource draws from
  Python's global ``random``, elmreg from a generator seeded by the task's seed, the example's content and the
  template source (:func:`choice_seed`), so an example renders the same way for training, for the library sample
  and for evaluation, in any process.
- ``|||`` inside example values is protected while rendering and restored after the split, so data cannot move
  the input/target boundary; a column named ``answer_choices`` is refused; each part is stripped. (One deviation:
  inside the data the answer choices read, ``|||`` separates choices; see ``PromptTemplate._choices``.)
- Templates read from promptsource files cut each ``{{ ... }}`` output to 2048 characters (promptsource's
  ``TEXT_VAR_LENGTH``), as P3 was built; inline prompts and BIG-bench's default template are not cut.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2 import meta
from jinja2.filters import do_truncate
from jinja2.sandbox import SandboxedEnvironment

from elmreg.registry.errors import TaskSpecError, first_line

SEPARATOR = "|||"
# promptsource's TEXT_VAR_LENGTH: Template.apply cuts every {{ ... }} output of a template to this many characters
# (Jinja's truncate: at a word boundary, with "..."). P3, the data T0 and the paper's experts were trained on, was
# rendered that way, so templates read from promptsource files do the same.
PROMPTSOURCE_TEXT_VAR_LENGTH = 2048
# Stands in for each '|' of a '|||' inside example values while a template renders, so that data cannot move the
# input/target split. promptsource puts a 32-character hex string in place of the whole '|||'; one private-use
# character per pipe instead keeps every value its own length (``length``, slicing and truncation see what the
# data holds), a template that cuts through one gets back the pipes it kept, and case filters leave it alone.
_PROTECTED_PIPE = "\ue000"
RESERVED_COLUMN = "answer_choices"


@dataclass(frozen=True)
class _RenderState:
    """What the custom filters and the finalizer need for the one rendering in progress."""

    rng: random.Random
    text_var_length: int | None
    # Range items this rendering has created so far (a one-item list: the dataclass is frozen, the count is not).
    range_items: list[int] = field(default_factory=lambda: [0])


# A context variable rather than a template variable: a template cannot read or shadow it, and renderings in
# other threads or tasks keep their own state.
_STATE: contextvars.ContextVar[_RenderState | None] = contextvars.ContextVar(
    "elmreg_prompt_state", default=None
)


# pass_context keeps Jinja's optimizer from evaluating the filter at compile time on constant input
# (``["Question", "Problem"] | choice``): compiled templates are cached, so a folded draw would be the same for
# every row. promptsource compiles the template again for every example, so there each example draws anew.
@jinja2.pass_context
def _choice(context: jinja2.runtime.Context, sequence: Sequence[Any]) -> Any:
    """promptsource's ``choice`` filter (a random element), drawn from the rendering's seeded generator.

    Jinja's own ``random`` filter (two templates of the collection use it) is replaced by this one too: it draws
    from Python's global generator, which would make those prompts differ from run to run.
    """
    state = _STATE.get()
    # Only a caller bypassing PromptTemplate gets here without state; it still gets a reproducible draw.
    rng = state.rng if state is not None else random.Random(0)
    return rng.choice(sequence)


def _most_frequent(items: Sequence[Any]) -> list[Any] | None:
    """promptsource's ``most_frequent`` filter: every item of the highest count, in order of first appearance
    (None for an empty input)."""
    if not items:
        return None
    counts = Counter(items)
    top = max(counts.values())
    return [item for item, count in counts.items() if count == top]


def _highlight(text: Any) -> str:
    """promptsource's ``highlight`` filter (its browser app colours substituted text)."""
    return f"<span style='color: #F08080'>{text}</span>"


# pass_context makes Jinja call the finalizer at render time only; a plain function would also be applied to
# constant output at compile time, and compiled templates are cached across renderings with different limits.
@jinja2.pass_context
def _finalize(context: jinja2.runtime.Context, value: Any) -> Any:
    state = _STATE.get()
    if state is None or state.text_var_length is None:
        return value
    # promptsource appends "| string | truncate(TEXT_VAR_LENGTH)" to every expression; this is that, applied to
    # the expression's value as a whole (see the notes in tests/test_promptsource_corpus.py).
    text = value if isinstance(value, str) else str(value)
    return do_truncate(context.environment, text, state.text_var_length)


# -- resource limits of the sandbox --------------------------------------------------------------------------------
# Jinja's sandbox stops attribute access (``__class__``, ``__globals__``) but not resource use: a template of a few
# characters (``{{ 'a' * 10**10 }}``, ``{{ range(10**9)|list }}``, ``{{ 10**10**10 }}``) would take a worker's
# memory or CPU, and constant expressions like these are even evaluated while the template compiles. These limits
# are far above what a prompt needs (a rendered prompt of a million characters is ~250k tokens, beyond any
# backbone's context), and a template that crosses one is refused as a TaskSpecError.
MAX_TEMPLATE_SIZE = (
    1_000_000  # characters of a string, items of a sequence or range, characters of the output
)
MAX_TEMPLATE_RANGE_ITEMS = 1_000_000  # items of all ranges of one rendering together (nested loops multiply)
MAX_TEMPLATE_INT_BITS = 4096  # integers an expression may compute


class TemplateTooLargeError(jinja2.exceptions.SecurityError):
    """A template crossed one of the sandbox's resource limits."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset, range)) else 0


def _check_size(value: Any, what: str) -> Any:
    if _size(value) > MAX_TEMPLATE_SIZE:
        raise TemplateTooLargeError(
            f"{what} of {_size(value):,} items or characters (limit {MAX_TEMPLATE_SIZE:,})"
        )
    return value


def _check_int(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_TEMPLATE_INT_BITS:
        raise TemplateTooLargeError(
            f"{what}: a number of {value.bit_length():,} bits (limit {MAX_TEMPLATE_INT_BITS})"
        )


def _check_count(value: Any, what: str) -> None:
    """An integer argument that sets how much is produced (a width, a repetition, a count)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_TEMPLATE_SIZE:
        raise TemplateTooLargeError(f"{what} {value:,} (limit {MAX_TEMPLATE_SIZE:,})")


def _limited_multiply(left: Any, right: Any) -> Any:
    for sequence, count in ((left, right), (right, left)):
        if _size(sequence) and isinstance(count, int) and len(sequence) * max(count, 0) > MAX_TEMPLATE_SIZE:
            raise TemplateTooLargeError(
                f"repeating {len(sequence):,} items {count:,} times (limit {MAX_TEMPLATE_SIZE:,})"
            )
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and left.bit_length() + right.bit_length() > MAX_TEMPLATE_INT_BITS
    ):
        raise TemplateTooLargeError(f"a product of more than {MAX_TEMPLATE_INT_BITS} bits")
    return left * right


def _limited_power(left: Any, right: Any) -> Any:
    if (
        isinstance(left, int)
        and isinstance(right, int)
        and abs(left) > 1
        and right * math.log2(abs(left)) > MAX_TEMPLATE_INT_BITS
    ):
        raise TemplateTooLargeError(f"{left} ** {right} has more than {MAX_TEMPLATE_INT_BITS} bits")
    return left**right


def _limited_add(left: Any, right: Any) -> Any:
    if _size(left) + _size(right) > MAX_TEMPLATE_SIZE:
        raise TemplateTooLargeError(f"a concatenation longer than {MAX_TEMPLATE_SIZE:,}")
    return left + right


def _limited_modulo(left: Any, right: Any) -> Any:
    if isinstance(left, str):  # printf-style formatting: '%*d' and '%09999999d' pad to any width
        for value in right if isinstance(right, tuple) else (right,):
            _check_count(value, "a formatting width")
        _check_format_string(left)
    return left % right


def _check_format_string(template: str) -> None:
    # A width in the format string itself ('{:>999999999}', '%0999999999d'): digits runs beyond the size limit.
    for digits in re.findall(r"\d+", template):
        if len(digits) > len(str(MAX_TEMPLATE_SIZE)) or int(digits) > MAX_TEMPLATE_SIZE:
            raise TemplateTooLargeError(f"a formatting width of {digits} (limit {MAX_TEMPLATE_SIZE:,})")


def _replace_size(text: Any, old: Any, new: Any) -> None:
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        grows = (len(text) + 1 if not old else text.count(old)) * (len(new) - len(old))
        if len(text) + grows > MAX_TEMPLATE_SIZE:
            raise TemplateTooLargeError(f"a replacement longer than {MAX_TEMPLATE_SIZE:,} characters")


def _join_size(separator: Any, items: Any) -> None:
    if isinstance(items, (list, tuple)):
        total = len(str(separator)) * len(items) + sum(len(i) if isinstance(i, str) else 8 for i in items)
        if total > MAX_TEMPLATE_SIZE:
            raise TemplateTooLargeError(f"a join longer than {MAX_TEMPLATE_SIZE:,} characters")


# str methods whose integer arguments say how much they produce, and those that grow text by their arguments.
_PADDING_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})


def _limited_range(*args: int) -> range:
    for value in args:
        _check_count(value, "a range bound")
    numbers = range(*args)
    _check_size(numbers, "a range")
    state = _STATE.get()
    if state is not None:
        # Each range counts against the rendering's budget: nested loops multiply, one range alone does not show it.
        state.range_items[0] += len(numbers)
        if state.range_items[0] > MAX_TEMPLATE_RANGE_ITEMS:
            raise TemplateTooLargeError(
                f"loops over more than {MAX_TEMPLATE_RANGE_ITEMS:,} range items in one rendering"
            )
    return numbers


class _LimitedNamespace(jinja2.utils.Namespace):
    """``namespace()`` whose attributes cannot hold more than the size limit (``{% set ns.s = ns.s ~ ns.s %}`` in
    a loop doubles a string at every step)."""

    def __setitem__(self, name: str, value: Any) -> None:
        _check_size(value, f"namespace attribute '{name}'")
        super().__setitem__(name, value)


class _LimitedSandbox(SandboxedEnvironment):
    """Jinja's sandbox with resource limits on the operators, calls and filters that can build large values.

    Intercepting the operators also keeps Jinja's optimizer from evaluating them while compiling.
    """

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.binop_table.update(
            {"*": _limited_multiply, "**": _limited_power, "+": _limited_add, "%": _limited_modulo}
        )
        self.globals["range"] = _limited_range
        self.globals["namespace"] = _LimitedNamespace

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _check_int(left, f"'{operator}'")
        _check_int(right, f"'{operator}'")
        result = super().call_binop(context, operator, left, right)
        _check_int(result, f"'{operator}'")
        return _check_size(result, f"'{operator}' gave a value")

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        receiver = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        method = getattr(__obj, "__name__", "")
        for value in (*args, *kwargs.values()):
            _check_size(value, "an argument")  # a macro calling itself with a doubled string
            if isinstance(receiver, str) and method in _PADDING_METHODS:
                _check_count(value, f"'{method}' to a width of")
        if isinstance(receiver, str):
            if method in ("format", "format_map"):
                _check_format_string(receiver)
            elif method == "replace" and len(args) >= 2:
                _replace_size(receiver, args[0], args[1])
            elif method == "join" and args:
                _join_size(receiver, args[0])
        if method == "generate_lorem_ipsum" or __obj is __self.globals.get("lipsum"):
            for value in (*args, *kwargs.values()):
                _check_count(value, "lipsum of")
        result = super().call(__context, __obj, *args, **kwargs)
        return _check_size(result, f"'{method or __obj}' gave a value")


def _limited_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose count arguments (widths, batch sizes) and whose result stay within the size limit."""

    @functools.wraps(function)
    def limited(*args: Any, **kwargs: Any) -> Any:
        # Jinja passes the context, eval context or environment first to some filters; the value follows.
        values = [
            a
            for a in args
            if not isinstance(a, (jinja2.runtime.Context, jinja2.nodes.EvalContext, jinja2.Environment))
        ]
        for value in (*values[1:], *kwargs.values()):
            _check_count(value, f"filter '{name}' with")
        if name == "replace" and len(values) >= 3:
            _replace_size(str(values[0]), values[1], values[2])
        if name == "join" and values:
            items = list(values[0]) if not isinstance(values[0], (list, tuple, str)) else values[0]
            _join_size(values[1] if len(values) > 1 else kwargs.get("d", ""), items)
            args = tuple(items if a is values[0] else a for a in args)
        if name == "format" and values and isinstance(values[0], str):
            _check_format_string(values[0])
        return _check_size(function(*args, **kwargs), f"filter '{name}' gave a value")

    return limited


_ENV = _LimitedSandbox(undefined=jinja2.StrictUndefined, finalize=_finalize)
_ENV.filters.update(choice=_choice, random=_choice, most_frequent=_most_frequent, highlight=_highlight)
_ENV.filters.update({name: _limited_filter(name, f) for name, f in _ENV.filters.items()})
# promptsource's environment has zip() as a global (16 templates of the 0.2.3 collection call it).
_ENV.globals["zip"] = zip


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
    # Cut each {{ ... }} output to this many characters (promptsource's TEXT_VAR_LENGTH for templates read from
    # promptsource files); None cuts nothing. Tasks stored before this field existed read back as None, so
    # their examples render exactly as their experts were trained on.
    text_var_length: int | None = None

    @classmethod
    def inline(cls, jinja: str, answer_choices: str | None = None, name: str = "inline") -> PromptTemplate:
        """A template given on the command line; checked for syntax at once."""
        template = cls(jinja=jinja, name=name, answer_choices=answer_choices or None)
        template.compile()
        return template

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PromptTemplate:
        return cls(**{**data, "metrics": tuple(data.get("metrics") or ())})

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "metrics": list(self.metrics)}

    def compile(self) -> None:
        """Compile the template and its answer choices in elmreg's sandbox (syntax, known filters and tests).

        Raises:
            TaskSpecError: Not valid Jinja, or it uses a filter or test elmreg does not have.
        """
        for source in (self.jinja, self.answer_choices):
            if not source:
                continue
            try:
                _compile(source)
            except (
                jinja2.TemplateSyntaxError
            ) as exc:  # also unknown filters and tests (TemplateAssertionError)
                raise TaskSpecError(
                    f"template '{self.name}' is not valid Jinja: {exc.message} (line {exc.lineno})"
                ) from exc

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
        return names - {RESERVED_COLUMN}

    def validate_against(self, columns: Iterable[str], dataset: str = "the dataset") -> None:
        """Raise TaskSpecError naming the first field the template reads that the dataset lacks, or a column
        named ``answer_choices`` (the name a template reads its answer choices by)."""
        self.compile()
        available = set(columns)
        if RESERVED_COLUMN in available:
            raise TaskSpecError(_reserved_column_message(self.name, dataset))
        missing = sorted(self.required_fields() - available)
        if missing:
            raise TaskSpecError(
                f"template '{self.name}' uses field '{missing[0]}', which is not a column of {dataset} "
                f"(columns: {', '.join(sorted(available))}); fix the template or pick another dataset"
            )

    def choices(self, row: dict[str, Any], *, seed: int = 0) -> tuple[str, ...] | None:
        """The answer choices for one row (None for a template without them).

        Raises:
            TaskSpecError: The row has a column named ``answer_choices``, or the choices fail to render.
        """
        _refuse_reserved_column(row, self.name)
        choices = self._choices(row, seed, _example_key(row))
        return None if choices is None else tuple(choices)

    def _choices(self, row: dict[str, Any], seed: int, key: str) -> list[str] | None:
        if not self.answer_choices:
            return None
        # Unlike promptsource, a '|||' inside the data the answer choices read separates choices: a column may hold
        # a row's choices joined by '|||' (answer choices '{{options}}'; elmreg's experiment harness and existing
        # tasks do that), while a single choice that contains '|||' does not occur in real data.
        # Like promptsource, answer choices are not truncated: they are the labels a target must equal, and
        # BIG-bench's default joins all of them in one expression.
        rendered = _render(self.answer_choices, row, self.name, _state(seed, key, self.answer_choices))
        return [c.strip() for c in rendered.split(SEPARATOR)]

    def render(
        self, row: dict[str, Any], *, require_target: bool = True, seed: int = 0
    ) -> PromptedExample | None:
        """Render one dataset row; None when the template yields no input (or, with ``require_target``, no
        target) for it. Unlabeled instances to route or predict are rendered with ``require_target=False``.

        promptsource templates legitimately skip rows (e.g. a template for rows with a given label, which
        renders nothing at all for the others); such rows are left out of training rather than trained on an
        empty target, as T0's data pipeline left them out. So is a row for which a template renders more than one
        ``|||`` (only the template can put them there: separators inside values are protected).

        Args:
            seed: Seeds promptsource's ``choice`` filter, together with the row's content and the template source
                (:func:`choice_seed`); the task's training seed, so that every rendering of a row agrees.

        Raises:
            TaskSpecError: The template has no ``|||``, reads a field the row lacks, fails to render, or the row
                has a column named ``answer_choices``.
        """
        _refuse_reserved_column(row, self.name)
        key = _example_key(row)
        choices = self._choices(row, seed, key)
        context = _protect(row)
        # promptsource passes answer_choices=None to a template without them. The choices hold no '|||' (they were
        # split on it), so they cannot move the input/target split.
        context[RESERVED_COLUMN] = choices
        state = _state(seed, key, self.jinja, self.text_var_length)
        parts = _render(self.jinja, context, self.name, state).split(SEPARATOR)
        if len(parts) != 2:
            if SEPARATOR not in self.jinja:
                raise TaskSpecError(
                    f"template '{self.name}' has no '{SEPARATOR}' between input and target; write 'input ||| target'"
                )
            return None
        source, target = (_restore(part).strip() for part in parts)
        if not source or (require_target and not target):
            return None
        answer_choices = None if choices is None else tuple(choices)
        return PromptedExample(input=source, target=target, answer_choices=answer_choices)


def choice_seed(seed: int, row: dict[str, Any], source: str) -> int:
    """The seed of the generator that promptsource's ``choice`` filter draws from while ``source`` (a template's
    Jinja, or its answer choices) renders ``row`` under a task's ``seed``.

    It depends on nothing else (not on the process, the row's position or what was rendered before), so
    training, the library sample, evaluation and a later re-rendering all draw the same choices for a row.
    """
    return _seed_from_key(seed, _example_key(row), source)


def _seed_from_key(seed: int, key: str, source: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{key}\0{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _example_key(row: dict[str, Any]) -> str:
    """The row's content as stable text (key order does not matter)."""
    try:
        return json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        # Keys that cannot be sorted or serialised: the row's repr (in insertion order) is still stable.
        return repr(row)


def _state(seed: int, key: str, source: str, text_var_length: int | None = None) -> _RenderState:
    return _RenderState(random.Random(_seed_from_key(seed, key, source)), text_var_length)


def _protect(value: Any) -> Any:
    """A copy of an example value with '|||' replaced inside every string, nested ones included.

    promptsource protects top-level string columns only; nested ones (``answers.text``, dialogue turns) can hold
    a '|||' just as well. The copy also keeps a template that mutates a list (``.append``) off the caller's row.
    """
    if isinstance(value, str):
        return value.replace(SEPARATOR, _PROTECTED_PIPE * len(SEPARATOR))
    if isinstance(value, dict):
        return {k: _protect(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_protect(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_protect(v) for v in value)
    return value


def _restore(text: str) -> str:
    return text.replace(_PROTECTED_PIPE, "|")


def _reserved_column_message(template: str, dataset: str) -> str:
    return (
        f"{dataset} has a column named '{RESERVED_COLUMN}', the name template '{template}' reads its answer "
        "choices by (promptsource refuses it too); rename the column"
    )


def _refuse_reserved_column(row: dict[str, Any], template: str) -> None:
    if RESERVED_COLUMN in row:
        raise TaskSpecError(_reserved_column_message(template, "the row"))


@functools.lru_cache(maxsize=512)
def _compile(source: str) -> jinja2.Template:
    # Compiling costs far more than rendering; a task renders thousands of rows with one or a few templates.
    return _ENV.from_string(source)


def _render(source: str, context: dict[str, Any], name: str, state: _RenderState) -> str:
    token = _STATE.set(state)
    try:
        # Streamed, so that output past the limit stops the rendering instead of being joined first.
        parts, length = [], 0
        for part in _compile(source).generate(**context):
            length += len(part)
            if length > MAX_TEMPLATE_SIZE:
                raise TemplateTooLargeError(f"output longer than {MAX_TEMPLATE_SIZE:,} characters")
            parts.append(part)
        return "".join(parts)
    except TemplateTooLargeError as exc:
        raise TaskSpecError(f"template '{name}' builds something too large: {exc}") from exc
    except (OverflowError, MemoryError, RecursionError) as exc:
        raise TaskSpecError(
            f"template '{name}' builds something too large: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    except jinja2.UndefinedError as exc:
        raise TaskSpecError(
            f"template '{name}' failed on a row: {exc.message}; check the field names"
        ) from exc
    except jinja2.TemplateError as exc:
        raise TaskSpecError(f"template '{name}' failed to render: {exc}") from exc
    except (IndexError, KeyError, TypeError, ValueError) as exc:
        raise TaskSpecError(f"template '{name}' failed to render a row: {type(exc).__name__}: {exc}") from exc
    finally:
        _STATE.reset(token)


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
        document = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_PromptsourceLoader)  # noqa: S506 - SafeLoader subclass
    except OSError as exc:
        raise TaskSpecError(f"cannot read template file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise TaskSpecError(
            f"template file {path} is not UTF-8 (at byte {exc.start}); save it as UTF-8"
        ) from exc
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
                text_var_length=PROMPTSOURCE_TEXT_VAR_LENGTH,
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
    Rows a template skips (empty input or target) are left out. ``seed`` also seeds promptsource's ``choice``
    filter (per row, see :func:`choice_seed`), so the same rows and seed always give the same examples.
    """
    if not templates:
        raise TaskSpecError("a task needs at least one prompt template")
    rng = random.Random(seed)
    examples = []
    for row in rows:
        template = templates[0] if len(templates) == 1 else rng.choice(templates)
        example = template.render(row, seed=seed)
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
