"""Load on ``elmreg serve``: concurrent loopback clients over 8 LoRA experts on the default gemma-3-270m.

Trains (once; a rerun reuses them) one small LoRA expert per BIG-bench task (tiny K and one epoch: only the
serving speed is measured, not accuracy), starts the server in this process on a free loopback port, and sends
the same load twice in one run:

- ``baseline``: one request at a time (``max_batch`` 1): each request gets the adapter its expert needs made
  active (the adapters stay resident, so it is PEFT's ``set_adapter`` between requests, what a plain PEFT server
  does at best) and runs alone.
- ``batched``: the server as shipped: concurrent requests for different experts share ``generate`` calls through
  PEFT's per-row ``adapter_names``.

With ``--vllm`` (vLLM installed in ``.venv-vllm``, ``make .venv-vllm``), two more modes on a vLLM server that
elmreg starts on the same backbone folder (fp32, like the built-in engine):

- ``vllm``: bare vLLM, the client naming the adapter itself (``expert-<id>``), as users of vLLM do today.
- ``elmreg+vllm``: ``elmreg serve --engine vllm`` in front of that vLLM, the client naming the expert: what the
  registry (auth, limits, model resolution, the audit writer) costs on top of vLLM.

Each of ``--clients`` clients sends ``--requests`` greedy completions (``--max-tokens`` new tokens each, a
validation prompt of its expert's task), client i starting at expert i and moving round the experts. Printed:
requests/s, generated tokens/s, p50 and p95 latency per mode, and the speed-up.

    .venv/bin/python benchmarks/serve_load.py --home /tmp/elmreg-serve-bench
    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 4 --max-tokens 16
    .venv/bin/python benchmarks/serve_load.py --vllm --clients 32
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from elmreg.api import Registry
from elmreg.data.examples import render_split
from elmreg.data.sources import DatasetSpec
from elmreg.serve.server import bind, build_server

TASKS = (
    "bigbench:strategyqa",
    "bigbench:sports_understanding",
    "bigbench:hyperbaton",
    "bigbench:navigate",
    "bigbench:date_understanding",
    "bigbench:logical_fallacy_detection",
    "bigbench:causal_judgment",
    "bigbench:disambiguation_qa",
)


def _experts(registry: Registry, k: int, epochs: int) -> list[str]:
    """One ready LoRA expert per task (trained here the first time)."""
    registered = {t.dataset for t in registry.tasks()}
    for task in TASKS:
        if task not in registered:
            registry.add_task(task, max_examples=k, training={"epochs": epochs, "max_source_length": 64})
    registry.train()
    names = []
    for task in registry.tasks():
        if task.dataset in TASKS:
            ready = registry.experts(status="ready", task=task.id)
            if ready:
                names.append(ready[-1].name)
    return names


def _prompts(registry: Registry, expert: str, count: int, max_tokens: int) -> list[str]:
    """Validation prompts of the expert's task, the shortest first (long BIG-bench contexts would make the
    benchmark measure prefill rather than serving)."""
    task = registry.task(registry.expert(expert).task_id)
    rows = render_split(
        DatasetSpec(task.dataset, split="validation"), None, cache_dir=registry.settings.cache_path
    )
    tokenizer_words = sorted((len(r.input.split()), r.input) for r in rows)
    return [text for words, text in tokenizer_words if words <= max_tokens][:count] or [rows[0].input[-200:]]


def _load(
    url: str, plan: list[list[tuple[str, str]]], max_tokens: int, *, models: dict[str, str] | None = None
) -> dict[str, float]:
    """``plan``: each client's (expert, prompt) requests; ``models``: the model name to send for each expert
    (default: the expert's name)."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(requests: list[tuple[str, str]]) -> None:
        with httpx.Client(timeout=600) as http:
            for model, prompt in requests:
                started = time.perf_counter()
                response = http.post(
                    f"{url}/v1/completions",
                    json={
                        "model": (models or {}).get(model, model),
                        "prompt": prompt,
                        "max_tokens": max_tokens,
                        "temperature": 0,
                    },
                )
                response.raise_for_status()
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += response.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(len(plan)) as pool:
        list(pool.map(client, plan))
    wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "seconds": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens[0] / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--home", type=Path, default=None, help="elmreg home (default: ELMREG_HOME or ~/.elmreg)"
    )
    parser.add_argument(
        "--backbone", default=None, help="backbone (default: the configured one, gemma-3-270m)"
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=16, help="training examples per expert (speed only)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--vllm", action="store_true", help="also measure bare vLLM and elmreg in front of it"
    )
    args = parser.parse_args()

    overrides = {k: v for k, v in (("home", args.home), ("backbone", args.backbone)) if v is not None}
    registry = Registry(**overrides)
    registry.context.upgrade_schema()
    started = time.perf_counter()
    experts = _experts(registry, args.k, args.epochs)
    print(f"{len(experts)} experts ready in {time.perf_counter() - started:.0f} s: {', '.join(experts)}")
    prompts = {e: _prompts(registry, e, args.requests, 48) for e in experts}
    plan = []
    for c in range(args.clients):
        chosen = [experts[(c + r) % len(experts)] for r in range(args.requests)]
        plan.append([(e, prompts[e][r % len(prompts[e])]) for r, e in enumerate(chosen)])
    server, service = build_server(
        registry,
        max_batch=args.max_batch,
        pool_capacity=len(experts),
        no_auth=True,
        device=registry.settings.device,
        log_level="warning",
    )
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        # Warm-up: every adapter fetched, verified and resident before either measurement.
        _load(url, [[(e, prompts[e][0])] for e in experts], 2)
        results = {}
        for mode, max_batch in (("baseline", 1), ("batched", args.max_batch)):
            service.engine.max_batch = max_batch
            results[mode] = _load(url, plan, args.max_tokens)
    finally:
        server.should_exit = True
        thread.join(120)
    device = service.backbone.device
    if args.vllm:
        results |= _vllm_modes(overrides, experts, prompts, plan, args.max_tokens)
    print(
        f"\n{args.clients} clients x {args.requests} requests, {len(experts)} LoRA experts, "
        f"{args.max_tokens} new tokens, {registry.settings.backbone} on {device}\n"
    )
    print("| mode | requests | seconds | requests/s | tokens/s | p50 (s) | p95 (s) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(
            f"| {mode} | {r['requests']} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} |"
        )
    speedup = results["batched"]["requests_per_s"] / results["baseline"]["requests_per_s"]
    print(
        f"\nthroughput x{speedup:.2f} (goal >= 2 on CPU); "
        f"p95 {results['batched']['p95']:.2f} s vs {results['baseline']['p95']:.2f} s (goal: no worse)"
    )
    registry.close()


def _vllm_modes(overrides, experts, prompts, plan, max_tokens: int) -> dict[str, dict[str, float]]:
    """Bare vLLM and elmreg in front of it, on one vLLM server elmreg starts (stopped at the end)."""
    from elmreg.inference.vllm_engine import lora_name

    registry = Registry(**overrides, engine="vllm")
    server, service = build_server(registry, no_auth=True, log_level="warning")
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    vllm_url = service.engine.engine.endpoint.url
    names = {e: lora_name(registry.expert(e)) for e in experts}
    try:
        # Warm-up through elmreg: every adapter verified, exported and loaded into vLLM before measuring.
        _load(url, [[(e, prompts[e][0])] for e in experts], 2)
        return {
            "vllm": _load(vllm_url, plan, max_tokens, models=names),
            "elmreg+vllm": _load(url, plan, max_tokens),
        }
    finally:
        server.should_exit = True
        thread.join(120)
        registry.close()


if __name__ == "__main__":
    main()
