"""Instances to route or predict: JSON lines from a file, or rows of a dataset rendered with a template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elmreg.data.prompts import PromptedExample, PromptTemplate
from elmreg.registry.errors import UserError

# One instance is a prompt for a backbone whose context holds a few thousand tokens; a line of megabytes is a
# wrong file (a data dump, a binary), and embedding or tokenizing it would take minutes before failing.
MAX_LINE_BYTES = 1024 * 1024


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file in UTF-8 (blank lines skipped).

    Raises:
        UserError: Missing or empty file, a line that is not UTF-8, longer than ``MAX_LINE_BYTES`` or not a JSON
            object (with its line number).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    rows = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if len(raw) > MAX_LINE_BYTES:
            raise UserError(
                f"{path} line {number} is {len(raw) / 1024 / 1024:.1f} MB; one instance may be at most "
                f"{MAX_LINE_BYTES // 1024 // 1024} MB"
            )
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path} line {number} is not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                "save the file as UTF-8"
            ) from exc
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path} line {number} is not valid JSON ({exc.msg}); one JSON object per line"
            ) from exc
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object; one object per line")
        rows.append(row)
    if not rows:
        raise UserError(f'{path} holds no instances; one JSON object per line, e.g. {{"input": "..."}}')
    return rows


def to_instances(
    rows: list[dict[str, Any]], templates: list[PromptTemplate] | None = None
) -> list[PromptedExample]:
    """Prompted instances: rows rendered with ``templates``, or rows that already carry ``input``
    (and optionally ``answer_choices`` and ``target``)."""
    if templates:
        # Unlabeled rows lack the target's fields; they render as empty, since only the input is needed.
        missing = dict.fromkeys(templates[0].required_fields(), "")
        rendered = [templates[0].render({**missing, **row}, require_target=False) for row in rows]
        return [r for r in rendered if r is not None]
    instances = []
    for i, row in enumerate(rows):
        if "input" not in row:
            raise UserError(f"instance {i + 1} has no 'input' field; give one, or --task to render raw rows")
        choices = row.get("answer_choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
        ):
            raise UserError(f"instance {i + 1}: 'answer_choices' must be a list of strings")
        instances.append(
            PromptedExample(
                str(row["input"]), str(row.get("target", "")), tuple(choices) if choices else None
            )
        )
    return instances
