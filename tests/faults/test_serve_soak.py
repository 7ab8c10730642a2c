"""A real ``elmreg serve`` under 8 concurrent clients while its PostgreSQL is stopped and started twice.

Requests that arrive while the catalogue is away are refused with 503 (routing votes in SQL); every request that
was answered names its routing decision, and at the end every one of those decisions is in ``routing_decisions``
once, with a vote for each of its prompts: queued decisions wait out the outage in the audit writer.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter

import httpx
import pytest
from conftest import lab_environ
from sqlalchemy import text

from elmreg.registry.audit_spill import spill_files
from faults import test_process_faults
from faults.test_clean_stops import ELMREG, _free_port

own_postgres, restart_lab = test_process_faults.own_postgres, test_process_faults.restart_lab
_wait_for = test_process_faults._wait_for

CLIENTS, PROMPTS = 8, 2


@pytest.mark.timeout(600)
def test_serve_under_load_across_two_postgres_outages_loses_no_decision(restart_lab, own_postgres, tmp_path):
    lab = restart_lab
    for name in ("colours", "moods"):
        lab.add_task(f"bigbench:{name}", max_examples=16, training=test_process_faults.QUICK)
    assert all(job.status == "succeeded" for job in lab.train())
    port, log = _free_port(), tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [ELMREG, "serve", "--port", str(port), "--no-auth", "--device", "cpu"],
            env=lab_environ(lab) | {"ELMREG_LOG_LEVEL": "WARNING"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    answered: list[tuple[int, str, str | None]] = []  # status, body, decision ids
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        f"{url}/v1/completions",
                        json={
                            "model": "auto",
                            "prompt": ["what colour is the sky ?"] * PROMPTS,
                            "max_tokens": 2,
                        },
                    )
                except httpx.TransportError as error:  # the server must never drop a connection
                    answered.append((0, repr(error), None))
                    continue
                answered.append(
                    (response.status_code, response.text, response.headers.get("x-elmreg-decision-id"))
                )

    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(healthy, 240, "the server to start", alive=[server])
        clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for _ in range(2):
            time.sleep(4)
            assert own_postgres.stop()
            time.sleep(3)
            down = httpx.get(f"{url}/healthz", timeout=10)
            assert down.status_code == 503 and "unavailable" in down.text
            own_postgres.start()
        time.sleep(4)
        stop.set()
        for thread in clients:
            thread.join(120)
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
    statuses = Counter(status for status, _, _ in answered)
    assert statuses[200] > CLIENTS and statuses[503] > 0, statuses
    for status, body, _ in answered:
        assert status == 200 or (status == 503 and "cannot reach the catalogue" in body), (status, body)
    ids = [int(i) for status, _, header in answered if status == 200 for i in header.split(",")]
    assert len(ids) == len(set(ids))
    with lab.context.engine.connect() as connection:
        rows = dict(
            connection.execute(
                text(
                    "SELECT d.id, count(DISTINCT v.query_index) FROM routing_decisions d "
                    "JOIN routing_votes v ON v.decision_id = d.id WHERE d.id = ANY(:ids) GROUP BY d.id"
                ),
                {"ids": ids},
            ).all()
        )
    assert sorted(rows) == sorted(ids), (
        f"{len(set(ids) - set(rows))} answered decisions are not in the catalogue"
    )
    assert set(rows.values()) == {PROMPTS}
    assert not spill_files(lab.settings.home / "serve"), log.read_text()
    assert "Traceback" not in log.read_text()
