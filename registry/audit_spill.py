"""Routing decisions a server could not write: the spill files it leaves, and replaying them into the catalogue.

A server answers with a decision's id before the decision is stored (ids are reserved from the table's
sequence); if the catalogue stays away past its shutdown deadline, the decisions go to JSON-lines files in
``HOME/serve``, one decision with its votes per line. Replaying inserts each decision under its reserved id,
so a file replayed twice (or by two processes at once) adds every decision once. A file is the unit of replay:
one whose lines all parse is written and then removed; one with a line that does not parse is kept untouched
and nothing of it is written, so the reported line numbers stay true until an operator mends or removes the line.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elmreg.registry.entities import PendingDecision, RoutingDecisionRecord, RoutingVote
from elmreg.registry.errors import UserError, first_line

SPILL_PATTERN = "unwritten-decisions-*.jsonl"
# Rows per transaction: a multi-row INSERT stays well under PostgreSQL's 65535 bind parameters.
_CHUNK = 500


def write_spill(folder: Path, decisions: Sequence[PendingDecision]) -> Path:
    """Write ``decisions`` to a new spill file in ``folder``; returns its path.

    Written under a hidden name and renamed when complete, so a replay never reads half a file.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    name = f"unwritten-decisions-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:6]}.jsonl"
    partial = folder / f".{name}.partial"
    with partial.open("w") as out:
        for decision in decisions:
            out.write(json.dumps(_as_json(decision)) + "\n")
        out.flush()
        os.fsync(out.fileno())
    final = folder / name
    os.replace(partial, final)
    return final


def _as_json(decision: PendingDecision) -> dict[str, Any]:
    body = dataclasses.asdict(decision)
    body["made_at"] = decision.made_at.isoformat() if decision.made_at else None
    return body


def _decision(line: str) -> PendingDecision:
    """One spill line as a decision. Raises ValueError/TypeError/KeyError saying what is wrong."""
    body = json.loads(line)
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    record = dict(body["record"])
    if record.get("kinds") is not None:
        record["kinds"] = tuple(record["kinds"])
    made_at = body.get("made_at")
    decision_id = body["decision_id"]
    if not isinstance(decision_id, int) or decision_id < 1:
        raise ValueError(f"decision_id must be a positive integer, not {decision_id!r}")
    return PendingDecision(
        decision_id,
        RoutingDecisionRecord(**record),
        tuple(RoutingVote(**vote) for vote in body["votes"]),
        dt.datetime.fromisoformat(made_at) if made_at else None,
    )


def read_spill(path: Path) -> tuple[list[PendingDecision], list[str]]:
    """The decisions of a spill file, and ``FILE:LINE: what is wrong`` for each line that does not parse."""
    decisions: list[PendingDecision] = []
    problems: list[str] = []
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise UserError(f"cannot read {path}: {error.strerror or error}") from None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            decisions.append(_decision(raw.decode("utf-8")))
        except UnicodeDecodeError:
            problems.append(f"{path}:{number}: not UTF-8 text")
        except json.JSONDecodeError as error:
            problems.append(f"{path}:{number}: not JSON ({error.msg})")
        except KeyError as error:
            problems.append(f"{path}:{number}: no {error.args[0]!r} field")
        except (TypeError, ValueError) as error:
            problems.append(f"{path}:{number}: not a routing decision ({first_line(error)})")
    if not decisions and not problems:
        problems.append(f"{path}: no decisions in it")
    return decisions, problems


@dataclass
class SpillReplay:
    """What replaying one spill file did: its decisions, how many were new to the catalogue, whether the file
    was removed, and what kept it (lines that do not parse, or the catalogue refusing a decision)."""

    path: Path
    decisions: int = 0
    written: int = 0
    removed: bool = False
    problems: list[str] = field(default_factory=list)


def spill_files(folder: Path) -> list[Path]:
    """The spill files in ``folder``, oldest first."""
    return sorted(folder.glob(SPILL_PATTERN)) if folder.is_dir() else []


def replay_spills(store, paths: Iterable[Path], *, dry_run: bool = False) -> list[SpillReplay]:
    """Replay spill files into ``store`` (a library store's ``replay_decisions``); see the module docstring.

    Raises:
        UserError: A named file does not exist.
        ServiceError: The catalogue cannot be reached (nothing of the file being replayed is removed).
    """
    paths = list(paths)
    for path in paths:
        if not path.is_file():
            raise UserError(f"no spill file {path}")
    results = []
    for path in paths:
        result = SpillReplay(path)
        decisions, result.problems = read_spill(path)
        result.decisions = len(decisions)
        if not result.problems:
            try:
                for start in range(0, len(decisions), _CHUNK):
                    result.written += store.replay_decisions(
                        decisions[start : start + _CHUNK], dry_run=dry_run
                    )
            except UserError as error:  # a decision that names what the catalogue no longer has
                result.problems.append(f"{path}: the catalogue refused a decision: {first_line(error)}")
            if not result.problems and not dry_run:
                path.unlink()
                result.removed = True
        results.append(result)
    return results
