"""Routing decisions the server's audit writer could not insert while PostgreSQL was down come back.

The writer reserves ids while the catalogue is up, PostgreSQL is stopped, the writer's shutdown deadline passes
and it spills the rest to files; with PostgreSQL back, ``elmreg audit replay`` writes each spilled decision once
under its reserved id, with its votes and its time, and a file replayed twice (or with a line that does not
parse) adds nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text
from test_filtered_routing import Library, Q, _FixedEmbedder

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.inference.router import Router
from elmreg.registry.audit_spill import read_spill, spill_files
from elmreg.serve.decision_writer import DecisionWriter
from elmreg.serve.service import ServingService
from faults import test_process_faults

# The private PostgreSQL that the process faults restart, and a lab catalogue on it.
own_postgres, restart_lab = test_process_faults.own_postgres, test_process_faults.restart_lab


def _decisions(lab, ids) -> dict[int, tuple]:
    """Per decision id in the catalogue: (rows with that id, its caller label, created_at, its votes in order)."""
    with lab.context.engine.connect() as connection:
        rows = connection.execute(
            text("SELECT id, caller_label, created_at FROM routing_decisions WHERE id = ANY(:ids)"),
            {"ids": list(ids)},
        ).all()
        votes = connection.execute(
            text(
                "SELECT decision_id, query_index, rank, expert_id, score FROM routing_votes "
                "WHERE decision_id = ANY(:ids) ORDER BY decision_id, query_index, rank"
            ),
            {"ids": list(ids)},
        ).all()
    found: dict[int, tuple] = {}
    for row in rows:
        mine = [tuple(v[1:4]) + (round(v[4], 5),) for v in votes if v.decision_id == row.id]
        count = sum(1 for r in rows if r.id == row.id)
        found[row.id] = (count, row.caller_label, row.created_at, mine)
    return found


def _daily(lab) -> list[tuple]:
    with lab.context.engine.connect() as connection:
        return connection.execute(
            text(
                "SELECT day, task_id, caller_label, chosen_expert_id, decisions, first_version, last_version "
                "FROM routing_daily_choices ORDER BY 1, 2, 3, 4"
            )
        ).all()


@pytest.mark.timeout(300)
def test_decisions_spilled_while_postgres_is_down_are_replayed_once(restart_lab, own_postgres, tmp_path):
    lab = restart_lab
    library = Library(lab.context, np.random.default_rng(5))
    for i in range(2):
        library.publish(f"spill-{i}", crowd=i == 0, count=20)
    made = []
    router = Router(lab.context, _FixedEmbedder(library.queries()))
    for _ in range(6):
        router.route(
            [f"q{i}" for i in range(Q)],
            q=None,
            caller_label="spill",
            recorder=lambda record, votes: made.append((record, votes)) or 0,
        )
    spill = tmp_path / "serve"
    writer = DecisionWriter(lab, spill_dir=spill, reserve=16)
    first = writer.record(*made[0])  # reserves a block of ids while the catalogue is up, and is written
    assert writer.flush(30)
    assert own_postgres.stop()
    try:
        spilled = [writer.record(*m) for m in made[1:]]
        writer.close(timeout=2)
        writer._thread.join(30)  # a batch in flight when close gave up is spilled by the thread itself
    finally:
        own_postgres.start()
    files = spill_files(spill)
    assert files
    in_files = {d.decision_id: d for f in files for d in read_spill(f)[0]}
    assert sorted(in_files) == sorted(spilled)
    assert list(_decisions(lab, spilled)) == []  # lost to the catalogue until replayed
    copies = tmp_path / "copies"
    copies.mkdir()
    for f in files:
        shutil.copy(f, copies / f.name)
    env = lab_environ(lab)
    runner = CliRunner()
    args = ["audit", "replay", *map(str, files)]

    dry = runner.invoke(cli, [*args, "--dry-run"], env=env)
    assert dry.exit_code == 0, dry.output
    assert f"would write {len(spilled)} of {len(spilled)}" in dry.output or len(files) > 1
    assert all(f.exists() for f in files) and list(_decisions(lab, spilled)) == []

    done = runner.invoke(cli, args, env=env)
    assert done.exit_code == 0, done.output
    assert "removed the file" in done.output and not any(f.exists() for f in files)
    found = _decisions(lab, [first, *spilled])
    assert sorted(found) == sorted([first, *spilled])
    for decision_id in spilled:
        count, label, created_at, votes = found[decision_id]
        expected = in_files[decision_id]
        assert count == 1 and label == "spill" and created_at == expected.made_at
        assert votes == sorted(
            (v.query_index, v.rank, v.expert_id, round(v.score, 5)) for v in expected.votes
        )
        assert len(votes) == Q
    kept = _daily(lab)
    assert sum(row.decisions for row in kept if row.caller_label == "spill") == 6
    lab.context.library.recount_audit_summary()
    assert _daily(lab) == kept  # the kept per-day counts include the replayed decisions exactly once

    for f in files:  # the same files again: nothing added
        shutil.copy(copies / f.name, f)
    again = runner.invoke(cli, args, env=env)
    assert again.exit_code == 0, again.output
    assert "wrote 0 of" in again.output and "already in the catalogue" in again.output
    assert _decisions(lab, [first, *spilled]) == found and _daily(lab) == kept

    # A file with a line that does not parse: reported with its file and line, kept, nothing of it written.
    [fresh_id] = lab.reserve_decision_ids(1)
    good = json.loads((copies / files[0].name).read_text().splitlines()[0])
    good["decision_id"] = fresh_id
    corrupt = spill / "unwritten-decisions-corrupt.jsonl"
    corrupt.write_text(json.dumps(good) + "\n" + '{"decision_id": 3, "record": \n' + json.dumps(good) + "\n")
    broken = runner.invoke(cli, ["audit", "replay", str(corrupt)], env=env)
    assert broken.exit_code == 2, broken.output
    assert f"{corrupt}:2: not JSON" in broken.output and "Traceback" not in broken.output
    assert broken.output.strip().count("\n") == 0
    assert corrupt.exists() and list(_decisions(lab, [fresh_id])) == []

    # Mended, it goes in: the home's spill folder is what a plain replay (and a server's start) reads.
    corrupt.write_text(json.dumps(good) + "\n")
    home = Path(tmp_path / "home")
    (home / "serve").mkdir(parents=True)
    shutil.move(corrupt, home / "serve" / corrupt.name)
    mended = runner.invoke(cli, ["audit", "replay"], env={**env, "ELMREG_HOME": str(home)})
    assert mended.exit_code == 0, mended.output
    assert "wrote 1 of 1" in mended.output and not spill_files(home / "serve")
    assert _decisions(lab, [fresh_id])[fresh_id][0] == 1

    # A server's start replays what an earlier run spilled, before it serves.
    [started_id] = lab.reserve_decision_ids(1)
    good["decision_id"] = started_id
    (home / "serve" / "unwritten-decisions-earlier-run.jsonl").write_text(json.dumps(good) + "\n")
    service = ServingService(Registry(lab.settings.replace(home=home)), device="cpu")
    try:
        assert not spill_files(home / "serve")
        assert _decisions(lab, [started_id])[started_id][0] == 1
    finally:
        service.close()
        service.registry.close()
