"""The filter grammar of ``elmreg experts list --filter`` and ``Registry.search_experts``.

A tokenizer and a recursive-descent parser turn a filter such as
``task = 'strategyqa' and tags.owner = 'nlp' and metrics.accuracy > 0.6`` into a small tree of
:class:`Comparison`, :class:`And`, :class:`Or` and :class:`Not`; the SQL store compiles the tree into
parameterised SQLAlchemy expressions. Values are never pasted into SQL and field names are checked against
:data:`FIELDS`, so nothing a user types reaches the database except as a bound parameter.

Grammar (keywords in any case)::

    filter     := or
    or         := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | "(" or ")" | comparison
    comparison := field op value | field "in" "(" value ("," value)* ")" | field "is" ["not"] "null"
    op         := "=" | "!=" | "<>" | "<" | "<=" | ">" | ">=" | "like"
    field      := name | task | kind | status | alias | backbone | description | id | library_version
                | created_at | ready_at | retired_at | tags.KEY | metrics.KEY[.KEY...]
    value      := 'text' (a quote inside doubled: 'it''s') | number
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from elmreg.registry.errors import UserError

# Each field and the kind of value it compares with: 'text', 'number', 'time', or for the JSON fields 'tag'
# (text values) and 'metric' (numbers or text).
FIELDS = {
    "id": "number",
    "name": "text",
    "task": "text",
    "kind": "text",
    "status": "text",
    "alias": "text",
    "backbone": "text",
    "description": "text",
    "library_version": "number",
    "created_at": "time",
    "ready_at": "time",
    "retired_at": "time",
    "tags": "tag",
    "metrics": "metric",
}
ORDER_FIELDS = ("id", "name", "library_version", "created_at", "ready_at", "retired_at", "metrics.KEY")
MAX_FILTER_LENGTH = 4000

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_][A-Za-z0-9_-]*)*)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "is", "null", "like"}


class FilterError(UserError):
    """A filter or order that is not in the grammar; the message names the token."""


@dataclass(frozen=True)
class Token:
    kind: str  # 'string', 'number', 'ident', 'keyword', 'op', 'punct', 'end'
    text: str
    position: int  # 1-based character position in the filter

    def shown(self) -> str:
        if self.kind == "end":
            return "end of the filter"
        quoted = self.text if self.kind == "string" else f"'{self.text}'"
        return f"{quoted} at position {self.position}"


@dataclass(frozen=True)
class Comparison:
    """``field op value``: ``path`` is the field and, for tags and metrics, its keys (``("metrics", "f1")``).
    ``op`` is one of = != < <= > >= like in, 'is null' or 'is not null'; ``value`` a str, float, datetime,
    a tuple of them (for ``in``) or None (for the null tests)."""

    path: tuple[str, ...]
    op: str
    value: object


@dataclass(frozen=True)
class And:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    item: Filter


Filter = Comparison | And | Or | Not


@dataclass(frozen=True)
class ExpertQuery:
    """What :meth:`CatalogueStore.search_experts` looks for: a parsed filter (None: every expert), an order and
    at most ``limit`` experts (None: all)."""

    where: Filter | None = None
    order_by: tuple[str, ...] = ("id",)
    descending: bool = False
    limit: int | None = None


def tokenize(text: str) -> list[Token]:
    """The filter's tokens, ending with an 'end' token. Raises FilterError at the first character that starts
    no token."""
    tokens: list[Token] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position] == "'":
                raise FilterError(f"filter: unterminated string starting at position {position + 1}")
            raise FilterError(f"filter: unexpected character '{text[position]}' at position {position + 1}")
        kind = match.lastgroup
        word = match.group()
        if kind == "ident" and word.lower() in _KEYWORDS:
            kind, word = "keyword", word.lower()
        if kind != "space":
            tokens.append(Token(kind, word, position + 1))
        position = match.end()
    tokens.append(Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.index = 0

    @property
    def token(self) -> Token:
        return self.tokens[self.index]

    def take(self) -> Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def accept(self, kind: str, text: str | None = None) -> Token | None:
        if self.token.kind == kind and (text is None or self.token.text == text):
            return self.take()
        return None

    def fail(self, expected: str) -> FilterError:
        return FilterError(f"filter: unexpected {self.token.shown()}; expected {expected}")

    def parse(self) -> Filter:
        tree = self.parse_or()
        if self.token.kind != "end":
            raise self.fail("'and', 'or' or the end of the filter")
        return tree

    def parse_or(self) -> Filter:
        items = [self.parse_and()]
        while self.accept("keyword", "or"):
            items.append(self.parse_and())
        return items[0] if len(items) == 1 else Or(tuple(items))

    def parse_and(self) -> Filter:
        items = [self.parse_not()]
        while self.accept("keyword", "and"):
            items.append(self.parse_not())
        return items[0] if len(items) == 1 else And(tuple(items))

    def parse_not(self) -> Filter:
        if self.accept("keyword", "not"):
            return Not(self.parse_not())
        if self.accept("punct", "("):
            inner = self.parse_or()
            if not self.accept("punct", ")"):
                raise self.fail("')'")
            return inner
        return self.parse_comparison()

    def parse_comparison(self) -> Comparison:
        token = self.token
        if token.kind != "ident":
            raise self.fail(f"a field ({', '.join(FIELDS)})")
        path = field_path(token)
        self.take()
        if self.accept("keyword", "is"):
            negated = self.accept("keyword", "not") is not None
            if not self.accept("keyword", "null"):
                raise self.fail("'null'")
            return Comparison(path, "is not null" if negated else "is null", None)
        if self.accept("keyword", "in"):
            if not self.accept("punct", "("):
                raise self.fail("'(' after in")
            values = [self.value(path)]
            while self.accept("punct", ","):
                values.append(self.value(path))
            if not self.accept("punct", ")"):
                raise self.fail("',' or ')'")
            return Comparison(path, "in", tuple(values))
        op = self.accept("op") or self.accept("keyword", "like")
        if op is None:
            raise self.fail("an operator (= != < <= > >= like in is)")
        text = "!=" if op.text == "<>" else op.text
        value = self.value(path)
        if text == "like" and not isinstance(value, str):
            raise FilterError(
                f"filter: like needs a quoted pattern, got '{self.tokens[self.index - 1].text}'"
            )
        return Comparison(path, text, value)

    def value(self, path: tuple[str, ...]) -> object:
        token = self.take()
        field, kind = ".".join(path), FIELDS[path[0]]
        if token.kind == "string":
            text = token.text[1:-1].replace("''", "'")
            if kind == "number":
                raise FilterError(f"filter: {field} is a number, got {token.shown()}")
            if kind == "time":
                try:
                    moment = dt.datetime.fromisoformat(text)
                except ValueError:
                    raise FilterError(
                        f"filter: {field} needs an ISO date or time such as '2026-01-31', got {token.shown()}"
                    ) from None
                return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
            return text
        if token.kind == "number":
            if kind in ("text", "tag", "time"):
                raise FilterError(f"filter: {field} takes a quoted value, got {token.shown()}")
            return float(token.text)
        self.index -= 1
        raise self.fail("a quoted 'value' or a number")


def field_path(token: Token) -> tuple[str, ...]:
    """The field a token names, checked against :data:`FIELDS`. Raises FilterError naming the token."""
    path = tuple(token.text.split("."))
    kind = FIELDS.get(path[0])
    if kind is None:
        raise FilterError(f"filter: unknown field {token.shown()}; use one of {', '.join(FIELDS)}")
    if kind in ("tag", "metric"):
        if len(path) < 2 or (kind == "tag" and len(path) > 2):
            raise FilterError(f"filter: {token.shown()} needs a key, e.g. {path[0]}.owner")
    elif len(path) > 1:
        raise FilterError(f"filter: {token.shown()}: {path[0]} has no keys")
    return path


def parse_filter(text: str | None) -> Filter | None:
    """The tree of a filter (None for an empty one). Raises FilterError naming the offending token."""
    if text is None or not text.strip():
        return None
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterError(f"filter of {len(text)} characters is longer than the {MAX_FILTER_LENGTH} allowed")
    return _Parser(text).parse()


def parse_order(text: str | None) -> tuple[tuple[str, ...], bool]:
    """``"created_at desc"`` -> ``(("created_at",), True)``; the default is ``id`` ascending.

    Raises:
        FilterError: Not a field one can order by, or a direction other than asc/desc.
    """
    if text is None or not text.strip():
        return ("id",), False
    words = text.split()
    direction = words[1].lower() if len(words) == 2 else "asc"
    if len(words) > 2 or direction not in ("asc", "desc"):
        raise FilterError(f"order-by: expected 'FIELD [asc|desc]', got '{text}'")
    path = tuple(words[0].split("."))
    allowed = path[0] in ORDER_FIELDS or (path[0] == "metrics" and len(path) > 1 and all(path[1:]))
    if not allowed or (path[0] != "metrics" and len(path) > 1):
        raise FilterError(f"order-by: cannot order by '{words[0]}'; use one of {', '.join(ORDER_FIELDS)}")
    return path, direction == "desc"


def expert_query(
    filter: str | None = None, *, order_by: str | None = None, limit: int | None = None
) -> ExpertQuery:
    """Parse what a user typed into an :class:`ExpertQuery`. Raises FilterError (one line)."""
    if limit is not None and limit < 1:
        raise FilterError(f"limit must be at least 1, got {limit}")
    path, descending = parse_order(order_by)
    return ExpertQuery(parse_filter(filter), path, descending, limit)
