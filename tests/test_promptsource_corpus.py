"""Every template of promptsource 0.2.3 (the T0/P3 prompt collection) in elmreg's renderer.

The sdist is downloaded once with pip into elmreg's cache (skipped, with the reason, when the package index cannot
be reached). Every template must load and compile in elmreg's sandbox. Each template then renders synthetic rows,
built from the variables it reads, with elmreg and with a reference renderer written here from promptsource's
documented ``Template.apply`` (promptsource itself cannot be installed on Python 3.11, and is not imported):

1. ``answer_choices`` is rendered from the example with '|||' in its string values replaced by a marker, split on
   '|||', each choice stripped and the marker turned back into '|||'.
2. The template has ``" | string | truncate(2048) }}"`` substituted for every ``}}`` (TEXT_VAR_LENGTH), the example
   (with a column called ``answer_choices`` refused) is protected the same way, the choice list (or None) is added
   as ``answer_choices``, the template renders in a plain Jinja environment (default undefined, filters
   ``highlight``, ``choice``, ``most_frequent``, global ``zip``), the text is split on '|||', and each part has the
   marker turned back and is stripped.
3. As T0's data pipeline did, a result that is not exactly two parts, or has an empty input or target, is no example.

``choice`` is promptsource's random choice; the reference draws it from ``random.Random(choice_seed(...))``, the
generator elmreg documents, so that both renderers make the same draws.

Rows: plain synthetic rows must render identically. Rows with '|||' inside their string values must render
identically or as the reference does with elmreg's two documented deviations (one private-use character per
protected pipe instead of a 32-character marker; '|||' in the data the answer choices read separates choices). Rows with
3000-character values check the 2048-character cut. A difference of another kind fails the test; the counts of each
kind are printed (``pytest -s``). elmreg's strict undefined (a missing field is an error, not "") is why a
synthetic row is only used when the reference renders it with a strict undefined too.
"""

from __future__ import annotations

import functools
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from jinja2 import meta, nodes

from elmreg.data.prompts import PromptTemplate, choice_seed, load_promptsource_templates
from elmreg.data.sources.promptsource import ensure_promptsource, template_files
from elmreg.registry.errors import ServiceError, TaskSpecError
from elmreg.registry.settings import load_settings

SEED = 7


@pytest.fixture(scope="module")
def corpus() -> dict[str, Path]:
    try:
        templates_dir = ensure_promptsource(load_settings().cache_path)
    except ServiceError as exc:
        pytest.skip(f"promptsource's sdist could not be downloaded with pip ({exc}); needs the package index")
    return template_files(templates_dir)


# -- the reference renderer: promptsource's Template.apply, from its documented behaviour ------------------------
REF_MARKER = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's pipe protector
REF_TEXT_VAR_LENGTH = 2048


class _ReferenceRandom:
    """promptsource draws ``choice`` from the global random; here, from the generator elmreg documents."""

    rng = random.Random(0)


@jinja2.pass_context  # drawn at render time, never folded into the compiled template (see elmreg's _choice)
def _ref_choice(context: Any, seq: Any) -> Any:
    return _ReferenceRandom.rng.choice(seq)


def _ref_most_frequent(items: Any) -> Any:
    if not items:
        return None
    counted = Counter(items).most_common()
    return [item for item, count in counted if count == counted[0][1]]


def _reference_env(undefined: type[jinja2.Undefined]) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.BaseLoader(), undefined=undefined)
    env.globals["zip"] = zip
    env.filters.update(
        highlight=lambda text: "<span style='color: #F08080'>" + text + "</span>",
        choice=_ref_choice,
        random=_ref_choice,  # Jinja's own random filter: seeded as well, so both renderers draw the same
        most_frequent=_ref_most_frequent,
    )
    return env


REF_ENV = _reference_env(jinja2.Undefined)  # promptsource's: a missing field renders as ""
# Synthetic rows are only used when they give the template every field it reads (none falls back to "").
STRICT_REF_ENV = _reference_env(jinja2.StrictUndefined)


@dataclass(frozen=True)
class Reference:
    """The reference renderer; the defaults are promptsource's. ``marker`` and ``split_choices`` model elmreg's
    two documented deviations (one character per protected pipe; '|||' in the data the answer choices read
    separates choices)."""

    env: jinja2.Environment = REF_ENV
    marker: str = REF_MARKER
    split_choices: bool = False
    truncate: bool = True

    def _protect(self, example: dict[str, Any]) -> dict[str, Any]:
        return {k: v.replace("|||", self.marker) if isinstance(v, str) else v for k, v in example.items()}

    def _restore(self, text: str) -> str:
        if self.marker == REF_MARKER:
            return text.replace(REF_MARKER, "|||")
        return text.replace(self.marker[0], "|")  # one character per pipe, as elmreg does

    def _compile(self, source: str) -> jinja2.Template:
        return _compiled(self.env, source)

    def choices(self, raw: dict[str, Any], example: dict[str, Any]) -> list[str] | None:
        if raw.get("answer_choices") is None:
            return None
        _ReferenceRandom.rng = random.Random(choice_seed(SEED, example, raw["answer_choices"]))
        context = example if self.split_choices else self._protect(example)
        rendered = self._compile(raw["answer_choices"]).render(**context)
        return [self._restore(c.strip()) for c in rendered.split("|||")]

    def apply(self, raw: dict[str, Any], example: dict[str, Any]) -> list[str]:
        jinja = raw["jinja"]
        if self.truncate:
            jinja = jinja.replace("}}", f" | string | truncate({REF_TEXT_VAR_LENGTH}) }}}}")
        protected = self._protect(example)
        if "answer_choices" in protected:
            raise ValueError("Example contains the restricted key 'answer_choices'.")
        protected["answer_choices"] = self.choices(raw, example)
        _ReferenceRandom.rng = random.Random(choice_seed(SEED, example, raw["jinja"]))
        rendered = self._compile(jinja).render(**protected)
        return [self._restore(part).strip() for part in rendered.split("|||")]

    def example(self, raw: dict[str, Any], example: dict[str, Any]) -> Rendered:
        """What T0's pipeline made of ``Template.apply``: (input, target, choices), or None for no example."""
        parts = self.apply(raw, example)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            return None
        choices = self.choices(raw, example)
        return parts[0], parts[1], None if choices is None else tuple(choices)


Rendered = tuple[str, str, tuple[str, ...] | None] | None


@functools.lru_cache(maxsize=4096)
def _compiled(env: jinja2.Environment, source: str) -> jinja2.Template:
    return env.from_string(source)


PROMPTSOURCE = Reference()
STRICT = Reference(env=STRICT_REF_ENV)
# elmreg's deviations, one at a time and together (for rows with '|||' in their values).
SHORT_MARKER = Reference(marker="\uf8ff" * 3)
SPLIT_CHOICES = Reference(split_choices=True)
ELMREG_DEVIATIONS = Reference(marker="\uf8ff" * 3, split_choices=True)
NO_TRUNCATION = Reference(truncate=False)


# -- synthetic rows from the variables a template reads ---------------------------------------------------------
class _Shape:
    """What a template does with a value: keys it reads, whether it indexes or iterates it, how it uses leaves."""

    def __init__(self) -> None:
        self.keys: dict[str, _Shape] = {}
        self.item: _Shape | None = None  # indexed with a number or a variable, iterated, or joined
        self.length = 3  # elements of a list: more where the template reads a higher index
        self.kind: str | None = None  # "int" or "str" where the template says
        self.const: Any = None  # a value the template looks up in a literal ({"a": ..}[label]: "a")

    def key(self, name: str) -> _Shape:
        return self.keys.setdefault(name, _Shape())

    def element(self) -> _Shape:
        if self.item is None:
            self.item = _Shape()
        return self.item


_LIST_METHODS = {"append", "pop", "count", "extend", "insert", "sort", "index"}
_DICT_METHODS = {"keys", "items", "values", "update", "get"}
_STR_METHODS = {
    "split",
    "lower",
    "upper",
    "strip",
    "replace",
    "startswith",
    "endswith",
    "capitalize",
    "title",
}
_LIST_FILTERS = {
    "join",
    "first",
    "last",
    "choice",
    "map",
    "selectattr",
    "rejectattr",
    "unique",
    "sort",
    "list",
}
_LIST_FILTERS |= {"most_frequent", "random", "batch", "slice", "sum", "min", "max", "reverse"}
_STR_FILTERS = {
    "lower",
    "upper",
    "capitalize",
    "title",
    "trim",
    "replace",
    "truncate",
    "wordcount",
    "striptags",
}
_NUMERIC_OPS = {"gt", "lt", "gteq", "lteq"}


class _ShapeFinder:
    """Walks a template's AST and records, per row variable, the shape its uses imply (loop variables and
    ``set`` names are followed back to the row value they stand for)."""

    def __init__(self, variables: set[str]) -> None:
        self.roots = {name: _Shape() for name in variables}
        self.aliases: dict[str, _Shape] = {}
        self.methods: set[int] = set()  # Getattr nodes that are called: a method, not a key

    def shape_of(self, node: nodes.Node) -> _Shape | None:
        if isinstance(node, nodes.Name):
            return self.aliases.get(node.name) or self.roots.get(node.name)
        if isinstance(node, nodes.Getattr):
            parent = self.shape_of(node.node)
            return None if parent is None or id(node) in self.methods else parent.key(node.attr)
        if isinstance(node, nodes.Getitem):
            parent = self.shape_of(node.node)
            if parent is None or isinstance(node.arg, nodes.Slice):
                return parent
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                return parent.key(node.arg.value)
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, int):
                parent.length = max(parent.length, node.arg.value + 1)
            return parent.element()
        if isinstance(node, nodes.Filter) and node.name in ("list", "sort", "unique", "reverse"):
            return self.shape_of(node.node)
        return None

    def visit(self, node: nodes.Node) -> None:
        if isinstance(node, nodes.For):
            self._bind_loop(node.target, node.iter)
        elif isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
            shape = self.shape_of(node.node)
            if shape is not None:
                self.aliases[node.target.name] = shape
        elif isinstance(node, nodes.Getitem) and not isinstance(node.arg, nodes.Slice | nodes.Const):
            index = self.shape_of(node.arg)
            keys = [item.key.value for item in node.node.items] if isinstance(node.node, nodes.Dict) else []
            if (
                index is not None
                and keys
                and all(isinstance(item.key, nodes.Const) for item in node.node.items)
            ):
                index.const = keys[0]
            elif index is not None and index.kind is None:
                index.kind = "int"
            if self.shape_of(node.node) is not None:
                self.shape_of(node)
        elif isinstance(node, nodes.Getitem | nodes.Getattr):
            self.shape_of(node)
        elif isinstance(node, nodes.Filter):
            self._filter(node)
        elif isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
            self._method(node.node)
        elif isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name) and node.node.name == "range":
            for arg in node.args:
                shape = self.shape_of(arg)
                if shape is not None:
                    shape.kind = "int"
        elif isinstance(node, nodes.Compare):
            self._compare(node)
        elif isinstance(node, nodes.Add | nodes.Sub | nodes.Mul | nodes.Div | nodes.FloorDiv | nodes.Mod):
            for side in (node.left, node.right):
                shape = self.shape_of(side)
                if shape is not None and not shape.keys and shape.item is None:
                    shape.kind = "int"
        for child in node.iter_child_nodes():
            self.visit(child)

    def _bind_loop(self, target: nodes.Node, iterable: nodes.Node) -> None:
        if (
            isinstance(iterable, nodes.Call)
            and isinstance(iterable.node, nodes.Name)
            and iterable.node.name == "zip"
        ):
            if isinstance(target, nodes.Tuple):
                for item, arg in zip(target.items, iterable.args, strict=False):
                    shape = self.shape_of(arg)
                    if shape is not None and isinstance(item, nodes.Name):
                        self.aliases[item.name] = shape.element()
            return
        shape = self.shape_of(iterable)
        if shape is not None and isinstance(target, nodes.Name):
            self.aliases[target.name] = shape.element()

    def _filter(self, node: nodes.Filter) -> None:
        shape = self.shape_of(node.node) if node.node is not None else None
        if shape is None:
            return
        if node.name in _LIST_FILTERS:
            shape.element()
        elif node.name in _STR_FILTERS and shape.kind is None and not shape.keys and shape.item is None:
            shape.kind = "str"

    def _method(self, attribute: nodes.Getattr) -> None:
        self.methods.add(id(attribute))
        owner = self.shape_of(attribute.node)
        if owner is None:
            return
        if attribute.attr in _LIST_METHODS:
            owner.element()
        elif attribute.attr in _DICT_METHODS and not owner.keys:
            owner.key("text")
        elif attribute.attr in _STR_METHODS:
            owner.kind = "str"

    def _compare(self, node: nodes.Compare) -> None:
        operands = [node.expr, *(op.expr for op in node.ops)]
        numeric = any(
            isinstance(o, nodes.Const) and isinstance(o.value, int | float) for o in operands
        ) or any(op.op in _NUMERIC_OPS for op in node.ops)
        for operand in operands:
            shape = self.shape_of(operand)
            if shape is not None and numeric and not shape.keys and shape.item is None and shape.kind is None:
                shape.kind = "int"


WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def _value(shape: _Shape, name: str, number: int) -> Any:
    if shape.keys:
        return {key: _value(sub, key, number) for key, sub in shape.keys.items()}
    if shape.item is not None:
        return [_value(shape.item, f"{name}{i}", number + i) for i in range(shape.length)]
    if shape.const is not None:
        return shape.const
    if shape.kind == "int":
        return number % 2
    return f"{name} {WORDS[number % len(WORDS)]} {WORDS[(number + 3) % len(WORDS)]}"


def synthetic_rows(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """A few candidate rows for a template (both binary labels, then every leaf a string)."""
    variables: set[str] = set()
    finder = _ShapeFinder(set())
    sources = [raw["jinja"], raw.get("answer_choices") or ""]
    for source in sources:
        variables |= meta.find_undeclared_variables(REF_ENV.parse(source))
    variables -= {"answer_choices", "loop"}
    finder = _ShapeFinder(variables)
    for source in sources:
        finder.visit(REF_ENV.parse(source))
    return [{name: _value(shape, name, offset) for name, shape in finder.roots.items()} for offset in (1, 0)]


def _with_pipes(row: dict[str, Any]) -> dict[str, Any]:
    """The row with '|||' inside each top-level string (the values promptsource protects)."""
    return {k: v.replace(" ", " ||| ", 1) if isinstance(v, str) else v for k, v in row.items()}


def _long(row: dict[str, Any]) -> dict[str, Any]:
    """The row with each top-level text 3000 characters long (over promptsource's TEXT_VAR_LENGTH); one-word
    strings are left alone, as the template looks them up (labels such as "SUPPORTS")."""
    return {
        k: (v + " ") * (3000 // (len(v) + 1) + 1) if isinstance(v, str) and " " in v else v
        for k, v in row.items()
    }


def _elmreg(template: PromptTemplate, row: dict[str, Any]) -> Rendered | str:
    try:
        example = template.render(row, seed=SEED)
    except TaskSpecError as exc:
        return f"error: {exc}"
    return None if example is None else (example.input, example.target, example.answer_choices)


def _raw_templates(path: Path) -> list[dict[str, Any]]:
    """The file's templates as plain YAML mappings (the reference reads the YAML on its own)."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!Template", lambda loader, node: loader.construct_mapping(node, deep=True))
    Loader.add_constructor(
        "!TemplateMetadata", lambda loader, node: loader.construct_mapping(node, deep=True)
    )
    document = yaml.load(path.read_text(), Loader=Loader)  # noqa: S506 - SafeLoader subclass
    return list((document.get("templates") or {}).values())


def _adequate_row(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The first synthetic row that gives the template every field it reads (the strict reference renders it),
    preferring one that makes an example over one the template skips."""
    rendered = []
    for row in synthetic_rows(raw):
        try:
            rendered.append((row, STRICT.example(raw, row)))
        except Exception:  # noqa: BLE001 - this synthetic row lacks something the template reads
            continue
    productive = [row for row, example in rendered if example is not None]
    return (productive or [row for row, _ in rendered] or [None])[0]


def _outcome(reference: Reference, raw: dict[str, Any], row: dict[str, Any]) -> Rendered | str:
    try:
        return reference.example(raw, row)
    except Exception as exc:  # noqa: BLE001 - promptsource itself fails on this row
        return f"error: {type(exc).__name__}: {exc}"


def _failed(outcome: Rendered | str) -> bool:
    return isinstance(outcome, str)


def _same(actual: Rendered | str, expected: Rendered | str) -> bool:
    """The same example, or both renderers refuse the row."""
    return actual == expected or (_failed(actual) and _failed(expected))


def test_every_template_compiles_and_renders_like_promptsource(corpus):
    started = time.monotonic()
    assert len(corpus) == 279, "promptsource 0.2.3 ships 279 templates.yaml files"
    counts: Counter[str] = Counter()
    unexplained: list[str] = []
    for dataset, path in corpus.items():
        templates = load_promptsource_templates(path)
        raws = _raw_templates(path)
        assert [t.name for t in templates] == [r["name"] for r in raws]
        for template, raw in zip(templates, raws, strict=True):
            where = f"{dataset}:{template.name}"
            counts["templates"] += 1
            template.compile()  # no unknown filter, test or tag: raises TaskSpecError otherwise
            counts["compile"] += 1
            row = _adequate_row(raw)
            if row is None:
                counts["no adequate synthetic row"] += 1
                continue
            counts["compared"] += 1
            # 1. Plain rows: identical to promptsource.
            expected, actual = PROMPTSOURCE.example(raw, row), _elmreg(template, row)
            if actual != expected:
                if _same(actual, _outcome(NO_TRUNCATION, raw, row)):
                    counts[
                        "differ: promptsource's '| string | truncate' binds to an expression's last operand"
                    ] += 1
                else:
                    unexplained.append(f"{where}: {expected} != {actual}")
                continue
            counts["plain rows rendered identically"] += 1
            counts["of which examples (the others: rows the template skips)"] += expected is not None
            # 2. '|||' inside values: identical, or explained by one of elmreg's two deviations.
            piped = _with_pipes(row)
            actual = _elmreg(template, piped)
            if _failed(_outcome(STRICT, raw, piped)):  # another draw of `choice` reads what the row lacks
                counts["'|||' row lacks a field the template then reads"] += 1
            elif actual == _outcome(PROMPTSOURCE, raw, piped):
                counts["rendered identically"] += 1  # plain rows and rows with '|||' in their values
            elif actual == _outcome(SPLIT_CHOICES, raw, piped):
                counts["differ: '|||' in data the answer choices read separates choices"] += 1
            elif actual == _outcome(SHORT_MARKER, raw, piped):
                counts["differ: promptsource's 32-character marker changes length/truncate"] += 1
            elif actual == _outcome(ELMREG_DEVIATIONS, raw, piped):
                counts["differ: both of the above"] += 1
            else:
                unexplained.append(f"{where} with '|||': {_outcome(PROMPTSOURCE, raw, piped)} != {actual}")
            # 3. Values over 2048 characters: promptsource's textual truncation binds to the last operand.
            long = _long(row)
            actual, expected = _elmreg(template, long), _outcome(PROMPTSOURCE, raw, long)
            if _failed(_outcome(STRICT, raw, long)):
                counts["long row lacks a field the template then reads"] += 1
            elif actual != expected:
                counts["long values: truncated differently (an expression's last operand only)"] += 1
    elapsed = time.monotonic() - started
    summary = "; ".join(f"{key}: {value}" for key, value in counts.items())
    print(f"\npromptsource {len(corpus)} files in {elapsed:.1f} s: {summary}")
    print("\n".join(unexplained[:40]))
    assert counts["compile"] == counts["templates"] == 2085
    assert counts["compared"] >= 1500 and counts["rendered identically"] >= 1500, summary
    assert not unexplained, f"{summary}\n" + "\n".join(unexplained[:40])
