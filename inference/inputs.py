"""Instances to route or predict: JSON lines from a file, or rows of a dataset rendered with a template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elmreg.registry.errors import UserError
from elmreg.registry.prompts import PromptedExample, PromptTemplate


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Objects of a JSON-lines file (blank lines skipped).

    Raises:
        UserError: Missing or empty file, or a line that is not a JSON object (with its line number).
    """
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from exc
    rows = []
    for number, line in enumerate(lines, start=1):
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
