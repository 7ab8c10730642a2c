"""Tags (string keys to string values) and Markdown descriptions on tasks and experts, and their limits.

Tag keys follow a grammar that the search filter can name (``tags.owner``); values are free text. The limits
keep a row small enough to list thousands of them in one page and to show whole in ``show``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from elmreg.registry.errors import UserError

TAG_KEY_LENGTH = 64
TAG_VALUE_LENGTH = 256
MAX_TAGS = 32
DESCRIPTION_LENGTH = 16384
_TAG_KEY = re.compile(rf"[A-Za-z][A-Za-z0-9_-]{{0,{TAG_KEY_LENGTH - 1}}}")


def check_tag_key(key: str) -> str:
    """Return ``key`` if a tag may have it. Raises UserError."""
    if not _TAG_KEY.fullmatch(key):
        shown = key if len(key) <= 80 else key[:77] + "..."
        raise UserError(
            f"tag key {shown!r} is not allowed: use 1-{TAG_KEY_LENGTH} ASCII letters, digits, _ and - "
            "starting with a letter, e.g. owner=nlp"
        )
    return key


def parse_tags(pairs: Iterable[str]) -> dict[str, str]:
    """``["owner=nlp", "stage=beta"]`` -> ``{"owner": "nlp", "stage": "beta"}``, each checked.

    Raises:
        UserError: A pair is not KEY=VALUE, or a key or value is outside the limits.
    """
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"tag '{pair[:80]}' is not KEY=VALUE, e.g. --tag owner=nlp")
        tags[key.strip()] = value.strip()
    return check_tags(tags)


def check_tags(tags: Mapping[str, object]) -> dict[str, str]:
    """The tags as strings, if each key and value is within the limits (the whole set is checked by
    :func:`merged_tags`). Raises UserError."""
    checked: dict[str, str] = {}
    for key, value in tags.items():
        check_tag_key(key)
        if not isinstance(value, str):
            raise UserError(f"tag {key}: values are strings, got {type(value).__name__}")
        if len(value) > TAG_VALUE_LENGTH:
            raise UserError(
                f"tag {key}: value of {len(value)} characters is longer than the {TAG_VALUE_LENGTH} allowed"
            )
        checked[key] = value
    return checked


def merged_tags(
    current: Mapping[str, str], add: Mapping[str, str], remove: Iterable[str] = ()
) -> dict[str, str]:
    """``current`` with ``add`` set and ``remove`` dropped, if the result holds at most ``MAX_TAGS``.

    Raises:
        UserError: Too many tags, or a key to remove that is not there.
    """
    tags = dict(current)
    for key in remove:
        if key not in tags:
            raise UserError(f"no tag '{key}' to remove (tags: {', '.join(sorted(tags)) or 'none'})")
        del tags[key]
    tags.update(check_tags(add))
    if len(tags) > MAX_TAGS:
        raise UserError(f"{len(tags)} tags is more than the {MAX_TAGS} allowed on one task or expert")
    return tags


def check_description(description: str) -> str:
    """Return ``description`` (Markdown) if it is within the limit. Raises UserError."""
    if len(description) > DESCRIPTION_LENGTH:
        raise UserError(
            f"description of {len(description)} characters is longer than the {DESCRIPTION_LENGTH} allowed"
        )
    return description
