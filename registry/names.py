"""The grammar of the names users give tasks and experts.

Names end up in file names (exports, experiment data, reports), in URLs of the HTTP server (``"model": NAME``),
in shell commands that elmreg prints and in comma-separated options (``--tune-on a,b``), so they are kept to
characters that are safe in all of them: ASCII letters and digits, then also ``.`` ``_`` ``+`` ``-`` (BIG-bench
names such as ``sports_understanding``, subtasks as ``sizes.small_things``, merges as ``a+b``), and for experts
``,`` (a merged expert's default name lists its weights: ``a+b-0.7,0.3``). No path separators, whitespace,
quotes or other SQL punctuation, control characters or non-ASCII letters; not only digits, which would read as
an id. Names stored before this grammar existed stay usable; only new names are checked.
"""

from __future__ import annotations

import re

from elmreg.registry.errors import UserError

TASK_NAME_LENGTH = 200  # tasks.name
EXPERT_NAME_LENGTH = 300  # experts.name
_TASK_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+-]{{0,{TASK_NAME_LENGTH - 1}}}")
_EXPERT_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+,-]{{0,{EXPERT_NAME_LENGTH - 1}}}")
_NOT_IN_EXPERT_NAMES = re.compile(r"[^A-Za-z0-9._+,-]")


class InvalidNameError(UserError):
    """A new task or expert name outside the grammar."""


def check_task_name(name: str) -> str:
    """Return ``name`` if a new task may have it.

    Raises:
        InvalidNameError: It does not follow the grammar (the message says what does).
    """
    if not _TASK_NAME.fullmatch(name) or name.isdigit():
        raise InvalidNameError(
            f"task name {name!r} is not allowed: use 1-{TASK_NAME_LENGTH} ASCII letters, digits and . _ + - "
            "(starting with a letter or digit, not only digits), e.g. --name reviews-v2"
        )
    return name


def check_expert_name(name: str) -> str:
    """Return ``name`` if a new expert may have it.

    Raises:
        InvalidNameError: It does not follow the grammar (the message says what does).
    """
    if not _EXPERT_NAME.fullmatch(name) or name.isdigit():
        raise InvalidNameError(
            f"expert name {name!r} is not allowed: use 1-{EXPERT_NAME_LENGTH} ASCII letters, digits and . _ + - , "
            "(starting with a letter or digit, not only digits), e.g. --name colours+moods"
        )
    return name


def derived_expert_name(text: str) -> str:
    """An expert name built from other names (a merge's parents, an imported adapter's task): names stored before
    the grammar existed may hold other characters, which become '_' so that the derived name is valid."""
    cleaned = _NOT_IN_EXPERT_NAMES.sub("_", text)
    if not cleaned[:1].isalnum() or cleaned.isdigit():
        cleaned = f"x{cleaned}"
    return cleaned[:EXPERT_NAME_LENGTH]


ALIAS_LENGTH = 64  # expert_aliases.alias
_ALIAS = re.compile(rf"[A-Za-z][A-Za-z0-9_-]{{0,{ALIAS_LENGTH - 1}}}")


def check_alias(alias: str) -> str:
    """Return ``alias`` if it may name an expert of a task (``task@alias``).

    Raises:
        InvalidNameError: It does not follow the grammar.
    """
    if not _ALIAS.fullmatch(alias):
        raise InvalidNameError(
            f"alias {alias!r} is not allowed: use 1-{ALIAS_LENGTH} ASCII letters, digits, _ and - "
            "starting with a letter, e.g. prod"
        )
    return alias


def split_alias_ref(key: str) -> tuple[str, str] | None:
    """``"strategyqa@prod"`` -> ``("strategyqa", "prod")``; None for a key that is not ``task@alias`` (task
    and expert names never hold '@')."""
    task, sep, alias = key.partition("@")
    return (task, alias) if sep else None
