"""Limits per API key on a real server: over its rate or its requests in flight, a key gets HTTP 429 with
``Retry-After``, counted in ``/metrics``; other keys and later requests pass. The server serves ``base`` only
(no expert is trained): the limits sit in front of every endpoint."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from click.testing import CliRunner
from conftest import lab_environ

from elmreg.cli.main import cli
from elmreg.serve.server import bind, build_server


@pytest.fixture
def server(lab):
    runner = CliRunner()
    env = lab_environ(lab)
    keys = {}
    for name, *limits in (("slow", "--rate", "1"), ("narrow", "--concurrency", "1"), ("free",)):
        result = runner.invoke(cli, ["serve", "keys", "create", name, *limits], env=env)
        assert result.exit_code == 0, result.output
        keys[name] = result.stdout.strip()
    listed = runner.invoke(cli, ["serve", "keys", "list"], env=env)
    assert listed.exit_code == 0 and "1/s" in listed.output, listed.output
    uvicorn_server, service = build_server(lab, device="cpu", log_level="warning")
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not uvicorn_server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", keys
    uvicorn_server.should_exit = True
    thread.join(60)


def _get(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=60)


def _complete(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": "base", "prompt": "what colour is the sky ?", "max_tokens": 2},
        headers={"authorization": f"Bearer {key}"},
        timeout=120,
    )


def _limited(url: str, key: str, limit: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(
        (
            x
            for x in metrics.splitlines()
            if x.startswith("elmreg_requests_limited_total{")
            and f'key="{key}"' in x
            and f'limit="{limit}"' in x
        ),
        None,
    )
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


@pytest.mark.timeout(300)
def test_a_key_over_its_rate_gets_429_with_retry_after(server):
    url, keys = server
    assert _get(url, keys["slow"]).status_code == 200
    refused = _get(url, keys["slow"])
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert (
        refused.json()["error"]["code"] == "rate_limit_exceeded" and "1 request(s) per second" in refused.text
    )
    assert all(_get(url, keys["free"]).status_code == 200 for _ in range(5))  # other keys are not held back
    assert _limited(url, "slow", "rate") == 1 and _limited(url, "free", "rate") == 0
    time.sleep(1.1)
    assert _get(url, keys["slow"]).status_code == 200


@pytest.mark.timeout(300)
def test_a_key_at_its_concurrency_gets_429_until_its_request_is_answered(server, tmp_path, monkeypatch):
    url, keys = server
    monkeypatch.setenv("ELMREG_TEST_PAUSE", f"serve-request:{tmp_path}")
    held: list[httpx.Response] = []
    first = threading.Thread(target=lambda: held.append(_complete(url, keys["narrow"])))
    first.start()
    deadline = time.monotonic() + 60
    while not (tmp_path / "serve-request.reached").exists():
        assert time.monotonic() < deadline, "the first request did not reach the server"
        time.sleep(0.05)
    refused = _get(url, keys["narrow"])
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
    assert "1 request(s) in flight at once" in refused.text
    assert _get(url, keys["free"]).status_code == 200
    (tmp_path / "serve-request.go").touch()
    first.join(60)
    assert held[0].status_code == 200, held[0].text
    monkeypatch.delenv("ELMREG_TEST_PAUSE")
    assert _get(url, keys["narrow"]).status_code == 200  # its slot came back with the answer
    assert _limited(url, "narrow", "concurrency") == 1
