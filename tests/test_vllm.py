"""The vLLM engine against a real vLLM server (started by elmreg from .venv-vllm) on a tiny Gemma 3: its answers
equal the built-in engine's, for the base backbone, one LoRA expert and a batch mixing experts; what vLLM cannot
serve is refused with one line.

The tiny Gemma 3 has 32-dimensional attention heads: vLLM's CPU attention takes no smaller ones.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from fixtures.bigbench_tree import write_bigbench_cache
from fixtures.tiny_models import build_tiny_gemma3
from sqlalchemy import text

from elmreg.api import Registry
from elmreg.cli.main import cli
from elmreg.data.prompts import PromptedExample
from elmreg.inference.assignment import Answerer, Mixture, assign_each
from elmreg.inference.engine import GenerationParams, Prompt, answer
from elmreg.inference.vllm_engine import VllmEngine
from elmreg.inference.vllm_server import vllm_python
from elmreg.registry.errors import UserError
from elmreg.registry.store import schema
from elmreg.serve.server import bind, build_server

pytestmark = pytest.mark.vllm

FAST = {"epochs": 2, "learning_rate": 5e-3, "batch_size": 8}
COLOURS = ["blue", "green", "white", "yellow", "red", "black"]
THINGS = ["sky", "grass", "sun", "snow", "night", "blood"]


def _prompts(count: int) -> list[str]:
    return [f"what colour is the {THINGS[i % len(THINGS)]} ?" for i in range(count)]


@pytest.fixture(scope="module")
def database(registry):
    name = f"elmreg_vllm_{uuid.uuid4().hex[:8]}"
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    yield registry.engine.url.set(database=name).render_as_string(hide_password=False)
    with registry.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def engines(settings, database, tmp_path_factory):
    """(peft, vllm): two registries on the same catalogue and experts, one per engine."""
    try:
        vllm_python(settings)
    except UserError as error:
        pytest.skip(str(error))
    root = tmp_path_factory.mktemp("vllm")
    write_bigbench_cache(root / "cache")
    backbone = build_tiny_gemma3(root / "gemma3", head_dim=32)
    lab_settings = settings.replace(
        database_url=database,
        s3_prefix=f"{root.name}/",
        cache_dir=root / "cache",
        backbone=str(backbone),
        device="cpu",
    )
    peft = Registry(lab_settings)
    schema.upgrade(peft.context.engine)
    peft.add_task("bigbench:colours", max_examples=48, training=FAST)
    peft.add_task("bigbench:moods", max_examples=48, training=FAST)
    peft.add_task("bigbench:echo", max_examples=24, training=FAST, kind="ffn_adapter")
    assert all(j.status == "succeeded" for j in peft.train())
    # vLLM's start takes ~1 min on 2 idle cores, and several times that while other suites load them.
    vllm = Registry(lab_settings.replace(engine="vllm", vllm_start_timeout=1200))
    vllm.engine()  # starts vLLM here, so that a failure to start is this fixture's, with vLLM's own error
    yield peft, vllm
    vllm.close()
    peft.close()


def _generations(registry: Registry, experts, prompts: list[str], max_tokens: int = 8) -> list[str]:
    rows = [PromptedExample(p, "", None) for p in prompts]
    work = [
        Prompt(Answerer(e), row, params=GenerationParams(max_tokens=max_tokens), classify_as=False)
        for e, row in zip(experts, rows, strict=True)
    ]
    return [a.text for a in answer(registry.engine(), work)]


@pytest.mark.parametrize("model", ["base", "colours"])
def test_greedy_generations_equal_the_built_in_engine(engines, model):
    peft, vllm = engines
    expert = None if model == "base" else peft.expert(model)
    prompts = _prompts(3) + ["the grass is", "i really love this movie ."]
    expected = _generations(peft, [expert] * len(prompts), prompts)
    assert _generations(vllm, [expert] * len(prompts), prompts) == expected
    assert any(t.strip() for t in expected)


def test_rank_classification_equals_the_built_in_engine(engines):
    peft, vllm = engines
    rows = [PromptedExample(p, "", tuple(COLOURS)) for p in _prompts(6)]
    for expert in (None, "colours"):
        expected = peft.predict(rows, expert=expert)
        got = vllm.predict(rows, expert=expert)
        assert [r["prediction"] for r in got] == [r["prediction"] for r in expected]
    work = [Prompt(Answerer(peft.expert("colours")), row) for row in rows]
    peft_scores = [a.choice_scores for a in answer(peft.engine(), work)]
    vllm_scores = [a.choice_scores for a in answer(vllm.engine(), work)]
    for a, b in zip(peft_scores, vllm_scores, strict=True):
        assert a == pytest.approx(b, abs=1e-3)


def test_a_batch_mixing_experts_gets_each_experts_answers(engines):
    peft, vllm = engines
    experts = [peft.expert(n) if n else None for n in ["colours", "moods", None, "colours", "moods", None]]
    prompts = _prompts(len(experts))
    assert _generations(vllm, experts, prompts) == _generations(peft, experts, prompts)
    rows = [PromptedExample(p, "", tuple(COLOURS)) for p in prompts]
    assignment = assign_each(experts)
    assert [r["prediction"] for r in vllm.answer(rows, assignment)] == [
        r["prediction"] for r in peft.answer(rows, assignment)
    ]


def test_concurrent_calls_share_the_server(engines):
    """Threads asking at once (as the server's requests do) each get their own expert's answer."""
    peft, vllm = engines
    experts = [peft.expert(n) if n else None for n in ["colours", "moods", None, "moods"]] * 2
    prompts = _prompts(len(experts))
    expected = _generations(peft, experts, prompts)
    engine = vllm.engine()

    def ask(index: int) -> str:
        return _generations(vllm, [experts[index]], [prompts[index]])[0]

    runs = engine.runs
    with ThreadPoolExecutor(len(experts)) as pool:
        assert list(pool.map(ask, range(len(experts)))) == expected
    assert engine.runs - runs == len(experts)


def test_what_vllm_cannot_serve_is_refused_with_one_line(engines):
    peft, vllm = engines
    row = [PromptedExample("what colour is the sky ?", "", None)]
    with pytest.raises(UserError, match=r"'echo' is a ffn_adapter expert.*--engine peft") as refused:
        vllm.predict(row, expert="echo")
    assert "\n" not in str(refused.value)
    mixture = Answerer(
        peft.expert("colours"), Mixture((peft.expert("colours"), peft.expert("moods")), 1, 1.0)
    )
    with pytest.raises(UserError, match="Arrow mixture of 2 experts.*--engine peft"):
        answer(vllm.engine(), [Prompt(mixture, row[0])])
    # A server that takes smaller ranks than the expert's: refused before vLLM sees the adapter.
    served = vllm.engine()
    narrow = VllmEngine(vllm.context, served.backbone, served.endpoint, max_lora_rank=4)
    try:
        with pytest.raises(UserError, match="LoRA rank 8, above the vLLM server's --max-lora-rank 4"):
            answer(narrow, [Prompt(Answerer(peft.expert("moods")), row[0])])
    finally:
        narrow.close()


def test_cli_predict_with_the_vllm_engine(engines):
    peft, vllm = engines
    env = lab_environ(peft)
    url = vllm.engine().endpoint.url
    runner = CliRunner()
    ok = runner.invoke(
        cli,
        [
            "predict",
            "--dataset",
            "bigbench:colours",
            "--limit",
            "3",
            "--expert",
            "colours",
            "--vllm-url",
            url,
        ],
        env=env,
    )
    assert ok.exit_code == 0, ok.output
    refused = runner.invoke(
        cli, ["predict", "--dataset", "bigbench:colours", "--limit", "3", "--expert", "echo", "--vllm-url", url],
        env=env,
    )  # fmt: skip
    assert refused.exit_code == 2 and "ffn_adapter" in refused.output and "Traceback" not in refused.output
    assert refused.output.strip().count("\n") == 0
    bad = runner.invoke(cli, ["predict", "--expert", "colours", "--vllm-url", "localhost:1"], env=env)
    assert bad.exit_code == 2 and "--vllm-url" in bad.output


def test_serve_in_front_of_vllm_streams_routes_and_refuses(engines):
    """``elmreg serve --engine vllm``: named and routed requests, streaming token by token, the headers; an
    expert vLLM cannot serve is a 400 naming the built-in engine."""
    peft, vllm = engines
    server, service = build_server(vllm, device="cpu", no_auth=True, log_level="warning")
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0, timeout=300
    )
    try:
        prompt = "what colour is the grass ?"
        expected = _generations(peft, [peft.expert("moods")], [prompt], max_tokens=10)[0]
        raw = client.completions.with_raw_response.create(model="moods", prompt=prompt, max_tokens=10)
        assert raw.headers["x-elmreg-expert"] == "moods" and raw.parse().choices[0].text == expected
        pieces = list(client.completions.create(model="moods", prompt=prompt, max_tokens=10, stream=True))
        assert "".join(p.choices[0].text for p in pieces) == expected
        assert len([p for p in pieces if p.choices[0].text]) > 1  # token by token, not one final chunk
        routed = client.completions.with_raw_response.create(
            model="auto", prompt=_prompts(4), max_tokens=1, extra_body={"choices": COLOURS}
        )
        assert routed.headers["x-elmreg-expert"] == "colours" and "x-elmreg-decision-id" in routed.headers
        rows = [PromptedExample(p, "", tuple(COLOURS)) for p in _prompts(4)]
        assert [c.text for c in routed.parse().choices] == [
            r["prediction"] for r in peft.predict(rows, expert="colours")
        ]
        with pytest.raises(openai.BadRequestError, match="ffn_adapter.*--engine peft"):
            client.completions.create(model="echo", prompt=prompt, max_tokens=4)
    finally:
        server.should_exit = True
        thread.join(60)
        service.close()
