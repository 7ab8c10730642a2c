"""SIGTERM stops the long-running processes cleanly: ``elmreg scheduler`` exits 0 with its lock released and a
standby takes over within its poll interval; ``elmreg serve`` answers the request in flight before it exits (a
pause point holds the request inside the server while the signal arrives)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import lab_environ

from faults.test_process_faults import _wait_for

ELMREG = str(Path(sys.executable).parent / "elmreg")


def _start(lab, log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            [ELMREG, *args],
            env=lab_environ(lab) | {"ELMREG_LOG_LEVEL": "WARNING"} | (env or {}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(*processes: subprocess.Popen | None) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(30)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_scheduler_stops_cleanly_and_a_standby_takes_over(lab, tmp_path, stop_signal):
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _start(lab, first_log, "scheduler", "--standby-poll", "1")
    second = None
    try:
        _wait_for(
            lambda: "scheduler active" in first_log.read_text(), 120, "an active scheduler", alive=[first]
        )
        second = _start(lab, second_log, "scheduler", "--standby-poll", "1")
        _wait_for(lambda: "standing by" in second_log.read_text(), 120, "a standby", alive=[second])
        assert "scheduler active" not in second_log.read_text()
        first.send_signal(stop_signal)
        assert first.wait(30) == 0, first_log.read_text()
        stopped = time.monotonic()
        assert "the lock released" in first_log.read_text() and "Traceback" not in first_log.read_text()
        _wait_for(lambda: "scheduler active" in second_log.read_text(), 10, "the standby", alive=[second])
        # Poll interval 1 s (plus the standby's own start-up slack): it took over at its next poll.
        assert time.monotonic() - stopped < 5
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, second_log.read_text()
    finally:
        _stop(first, second)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(300)
def test_serve_answers_the_request_in_flight_when_sigterm_arrives(lab, tmp_path):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    port = _free_port()
    log = tmp_path / "serve.log"
    server = _start(
        lab,
        log,
        "serve",
        "--port",
        str(port),
        "--no-auth",
        "--device",
        "cpu",
        env={"ELMREG_TEST_PAUSE": f"serve-request:{barrier}"},
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(healthy, 240, "the server to start", alive=[server])
        answered: list[httpx.Response] = []
        request = threading.Thread(
            target=lambda: answered.append(
                httpx.post(
                    f"{url}/v1/completions",
                    json={"model": "base", "prompt": "what colour is the sky ?", "max_tokens": 4},
                    timeout=120,
                )
            )
        )
        request.start()
        _wait_for(lambda: (barrier / "serve-request.reached").exists(), 60, "the request", alive=[server])
        server.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert server.poll() is None, "the server exited with a request in flight"
        with pytest.raises(httpx.TransportError):  # it takes no new requests meanwhile
            httpx.get(f"{url}/healthz", timeout=2)
        (barrier / "serve-request.go").touch()
        request.join(60)
        [response] = answered
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["finish_reason"] in ("length", "stop")
        # After its graceful stop uvicorn ends the process by the signal it caught, as a service manager expects.
        assert server.wait(60) == -signal.SIGTERM, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        _stop(server)
