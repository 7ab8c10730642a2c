"""``elmreg serve`` on a real loopback port: the official ``openai`` client and raw HTTP against tiny experts.

One server (uvicorn in a thread, its own Registry and backbone copy) serves the whole module; the SIGTERM test
runs the real ``elmreg serve`` command in a subprocess.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from fixtures.bigbench_tree import write_bigbench_cache
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.data.prompts import PromptedExample
from elmreg.registry.store import schema
from elmreg.serve.protocol import Limits
from elmreg.serve.server import bind, build_server
from elmreg.serve.service import ServingService

FAST = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}
COLOURS = ["blue", "green", "white", "yellow", "red", "black"]
LIMITS = Limits(max_body_bytes=20_000, max_prompt_tokens=48, max_new_tokens=64, max_prompts=8)


@dataclass
class Served:
    lab: Registry  # the registry tests compare against (its own backbone copy)
    service: ServingService
    url: str
    key: str

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0, timeout=120)

    def post(self, path: str, body, *, key: str | None = None, **kwargs) -> httpx.Response:
        content = body if isinstance(body, bytes | str) else json.dumps(body)
        headers = {"authorization": f"Bearer {key or self.key}", "content-type": "application/json"}
        return httpx.post(f"{self.url}{path}", content=content, headers=headers, timeout=120, **kwargs)

    def decision_rows(self, decision_id: int) -> tuple[list, int]:
        with self.lab.context.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT caller_label, q, chosen_expert_id FROM routing_decisions WHERE id = :i"),
                {"i": decision_id},
            ).all()
            votes = connection.scalar(
                text("SELECT count(*) FROM routing_votes WHERE decision_id = :i"), {"i": decision_id}
            )
        return rows, votes


@pytest.fixture(scope="module")
def database(registry):
    name = f"elmreg_serve_{uuid.uuid4().hex[:8]}"
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield registry.engine.url.set(database=name).render_as_string(hide_password=False)
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def served(settings, database, tiny_backbones, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    write_bigbench_cache(root / "cache")
    lab_settings = settings.replace(
        database_url=database,
        s3_prefix=f"{root.name}/",
        cache_dir=root / "cache",
        backbone=tiny_backbones["causal"],
        device="cpu",
    )
    lab = Registry(lab_settings)
    schema.upgrade(lab.context.engine)
    lab.add_task("bigbench:colours", max_examples=48, training=FAST)
    lab.add_task("bigbench:moods", max_examples=48, training=FAST)
    lab.add_task("bigbench:echo", max_examples=24, training=FAST, kind="ffn_adapter")
    assert all(j.status == "succeeded" for j in lab.train())
    _, key = lab.create_key("tester")
    # The server gets a registry of its own: one backbone per registry, and the tests use lab's meanwhile.
    server, service = build_server(
        Registry(lab_settings), device="cpu", max_batch=8, pool_capacity=4, limits=LIMITS, log_level="warning"
    )
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield Served(lab, service, f"http://127.0.0.1:{sock.getsockname()[1]}", key)
    server.should_exit = True
    thread.join(60)
    service.registry.close()
    lab.close()


def _prompts(count: int) -> list[str]:
    things = ["sky", "grass", "sun", "snow", "night", "blood"]
    return [f"what colour is the {things[i % len(things)]} ?" for i in range(count)]


def test_models_lists_experts_auto_and_base(served):
    ids = [m.id for m in served.client().models.list()]
    assert ids[:2] == ["auto", "base"] and {"colours", "moods", "echo"} <= set(ids)


@pytest.mark.parametrize("model", ["colours", "echo", "base"])
def test_completions_equal_predict(served, model):
    """A named expert (LoRA, and ffn_adapter from its own queue) or the base backbone: the server's answer
    is the one elmreg predict gives, for generation and for rank classification."""
    client = served.client()
    expert = None if model == "base" else model
    prompt = "what colour is the sky ?"
    raw = client.completions.with_raw_response.create(model=model, prompt=prompt, max_tokens=64)
    generated = raw.parse()
    assert raw.headers["x-elmreg-expert"] == model and "x-elmreg-decision-id" not in raw.headers
    alone = served.lab.predict([PromptedExample(prompt, "", None)], expert=expert)[0]["prediction"]
    assert generated.choices[0].text.strip() == alone
    assert generated.usage.completion_tokens >= 1

    classified = client.completions.create(
        model=model, prompt=_prompts(3), max_tokens=1, extra_body={"choices": COLOURS}
    )
    expected = served.lab.predict(
        [PromptedExample(p, "", tuple(COLOURS)) for p in _prompts(3)], expert=expert
    )
    assert [c.text for c in classified.choices] == [r["prediction"] for r in expected]
    scores = classified.choices[0].model_extra["choice_scores"]
    assert len(scores) == len(COLOURS) and classified.choices[0].text == COLOURS[scores.index(max(scores))]


def test_auto_routes_each_request_once_and_audits_it(served):
    raw = served.client().completions.with_raw_response.create(
        model="auto", prompt=_prompts(4), max_tokens=1, extra_body={"choices": COLOURS}
    )
    assert raw.headers["x-elmreg-expert"] == "colours"
    decision_id = int(raw.headers["x-elmreg-decision-id"])
    assert all(c.model_extra["decision_id"] == decision_id for c in raw.parse().choices)
    assert served.service.writer.flush()
    rows, votes = served.decision_rows(decision_id)
    assert rows == [("tester", 4, served.lab.expert("colours").id)] and votes == 4

    per_prompt = served.post(
        "/v1/completions",
        {"model": "auto", "prompt": ["i really love this movie .", "what colour is the sky ?"], "max_tokens": 1,
         "choices": ["positive", "negative"], "routing": "per_prompt"},
    )  # fmt: skip
    assert per_prompt.status_code == 200, per_prompt.text
    assert per_prompt.headers["x-elmreg-expert"] == "moods,colours"
    assert len(per_prompt.headers["x-elmreg-decision-id"].split(",")) == 2


def test_streaming_gives_the_same_text(served):
    client = served.client()
    prompt = "the grass is"
    whole = client.completions.create(model="moods", prompt=prompt, max_tokens=12).choices[0].text
    pieces = list(client.completions.create(model="moods", prompt=prompt, max_tokens=12, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == whole
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(
        model="colours", messages=[{"role": "user", "content": prompt}], max_tokens=8
    )
    streamed = client.chat.completions.create(
        model="colours", messages=[{"role": "user", "content": prompt}], max_tokens=8, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_stop_strings_and_logprobs(served):
    client = served.client()
    free = client.completions.create(model="base", prompt="the sky is", max_tokens=10).choices[0]
    words = free.text.split()
    assert len(words) >= 3
    stopped = client.completions.create(model="base", prompt="the sky is", max_tokens=10, stop=[words[2]])
    assert stopped.choices[0].text == free.text[: free.text.index(words[2])]
    assert stopped.choices[0].finish_reason == "stop"
    scored = client.completions.create(model="base", prompt="the sky is", max_tokens=3, logprobs=2).choices[0]
    assert len(scored.logprobs.tokens) == 3 and all(len(t) == 2 for t in scored.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in scored.logprobs.token_logprobs)


def test_concurrent_mixed_expert_requests_get_their_experts_answers(served):
    models = ["colours", "moods", "base", "echo", "moods", "colours", "base", "colours"]
    prompts = _prompts(len(models))  # same length: batch padding leaves greedy answers unchanged
    client = served.client()

    def ask(pair):
        model, prompt = pair
        return client.completions.create(model=model, prompt=prompt, max_tokens=6).choices[0].text

    alone = [ask(pair) for pair in zip(models, prompts, strict=True)]
    batches_before = _metric(served, "elmreg_batch_size_count")
    for _ in range(2):
        with ThreadPoolExecutor(len(models)) as pool:
            together = list(pool.map(ask, zip(models, prompts, strict=True)))
        assert together == alone
    assert len(set(alone)) > 1
    # Requests shared batches (fewer batches than requests), across experts.
    assert _metric(served, "elmreg_batch_size_count") - batches_before < 2 * len(models)
    assert _metric(served, 'elmreg_batch_experts_bucket{le="1.0"}') < _metric(
        served, "elmreg_batch_experts_count"
    )


def _metric(served, name: str) -> float:
    body = httpx.get(f"{served.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))


def test_api_keys_are_required_and_checked(served):
    with pytest.raises(openai.AuthenticationError):
        served.client(key="elmreg-wrong").models.list()
    missing = httpx.post(f"{served.url}/v1/completions", json={"model": "base", "prompt": "a"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    env = lab_environ(served.lab)
    created = CliRunner().invoke(cli, ["serve", "keys", "create", "carol"], env=env, catch_exceptions=False)
    assert created.exit_code == 0, created.output
    carol = created.output.splitlines()[0]
    assert served.client(key=carol).models.list()
    assert "carol" in CliRunner().invoke(cli, ["serve", "keys", "list"], env=env).output
    CliRunner().invoke(cli, ["serve", "keys", "create", "dave"], env=env)
    dave = served.lab.api_keys()[-1]
    assert CliRunner().invoke(cli, ["serve", "keys", "revoke", dave.name], env=env).exit_code == 0
    assert served.lab.api_keys()[-1].revoked_at is not None
    refused = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--no-auth"], env=env)
    assert refused.exit_code == 2 and "loopback" in refused.output


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "not valid JSON"),
        ([1, 2], 400, "JSON object"),
        ({"prompt": "a"}, 400, "model"),
        ({"model": "nope", "prompt": "a"}, 404, "does not exist"),
        ({"model": "base", "prompt": "the sky " * 40}, 400, "tokens"),
        ({"model": "base", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "base", "prompt": "a", "max_tokens": 10_000}, 400, "max_tokens"),
        ({"model": "base", "prompt": "a", "n": 2}, 400, "n > 1"),
        ({"model": "base", "prompt": "a", "temperature": 7}, 400, "temperature"),
        ({"model": "base", "prompt": ["a"] * 20}, 400, "prompts"),
        ({"model": "base", "prompt": "a", "choices": []}, 400, "choices"),
        ({"model": "base", "prompt": "a", "choices": ["x"], "stream": True}, 400, "stream"),
        ({"model": "base", "prompt": "a" * 30_000}, 413, "larger"),
    ],
)
def test_bad_requests_get_json_errors_and_the_server_keeps_serving(served, body, status, says):
    response = served.post("/v1/completions", body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert served.client().completions.create(model="base", prompt="a", max_tokens=1).choices


def test_sampling_health_and_metrics(served):
    client = served.client()
    sampled = [
        client.completions.create(model="base", prompt="the", max_tokens=5, temperature=1.5, seed=s)
        .choices[0]
        .text
        for s in (1, 1)
    ]
    assert sampled[0] == sampled[1]  # a seed makes a lone request repeatable
    health = httpx.get(f"{served.url}/healthz").json()
    assert health["status"] == "ok" and health["library_version"] >= 3
    body = httpx.get(f"{served.url}/metrics").text
    for name in ("elmreg_requests_total", "elmreg_request_latency_seconds", "elmreg_pool_events_total",
                 "elmreg_routing_latency_seconds", "elmreg_batch_size"):  # fmt: skip
        assert name in body
    assert httpx.get(f"{served.url}/nowhere").json()["error"]["type"] == "not_found_error"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_during_load_loses_no_audit_row(served, tmp_path: Path):
    port = _free_port()
    env = lab_environ(served.lab) | {"ELMREG_LOG_LEVEL": "WARNING"}
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "elmreg"),
            "serve",
            "--port",
            str(port),
            "--no-auth",
            "--device",
            "cpu",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        decided: list[int] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    response = httpx.post(
                        f"{url}/v1/completions",
                        json={"model": "auto", "prompt": _prompts(2), "max_tokens": 4},
                        timeout=60,
                    )
                except httpx.TransportError:
                    return  # the server stopped accepting
                if response.status_code == 200:
                    decided.append(int(response.headers["x-elmreg-decision-id"]))

        clients = [threading.Thread(target=load) for _ in range(4)]
        for client in clients:
            client.start()
        while len(decided) < 6:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        stop.set()
        for client in clients:
            client.join(60)
    finally:
        if process.poll() is None:
            process.kill()
    assert decided
    for decision_id in decided:
        rows, votes = served.decision_rows(decision_id)
        assert len(rows) == 1 and rows[0][0] == "anonymous" and votes == 2, decision_id
    assert not list((served.lab.settings.home / "serve").glob("unwritten-*"))
