"""Prometheus metrics of one server (its own registry, so that servers in one process do not share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServeMetrics:
    """Requests, latencies, batches, the adapter pool, routing and the audit writer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "elmreg_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "elmreg_request_latency_seconds",
            "Time from request to complete response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "elmreg_batch_size", "Prompts per engine batch", ["operation"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_experts = Histogram(
            "elmreg_batch_experts", "Distinct experts per engine batch", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "elmreg_batch_seconds",
            "Engine time per batch",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pool = Counter(
            "elmreg_pool_events",
            "Adapter pool hits, misses (fetched and loaded) and evictions",
            ["event"],
            registry=r,
        )
        self.tokens = Counter("elmreg_tokens", "Prompt and completion tokens", ["type"], registry=r)
        self.routing_latency = Histogram(
            "elmreg_routing_latency_seconds",
            "RoE per request: embed, vote in SQL",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decisions_written = Counter(
            "elmreg_audit_decisions_written", "Routing decisions written to the catalogue", registry=r
        )
        self.limited = Counter(
            "elmreg_requests_limited",
            "Requests refused with HTTP 429 by their key's limit",
            ["key", "limit"],
            registry=r,
        )
        self.audit_pending = Gauge("elmreg_audit_pending", "Routing decisions not yet written", registry=r)
        self.queue_depth = Gauge("elmreg_engine_pending", "Prompts waiting for or in the engine", registry=r)

    # EngineObserver
    def batch(self, operation: str, rows: int, experts: int, seconds: float) -> None:
        self.batch_size.labels(operation).observe(rows)
        self.batch_experts.observe(experts)
        self.batch_seconds.labels(operation).observe(seconds)

    def pool_change(self, hits: int, misses: int, evictions: int) -> None:
        for event, count in (("hit", hits), ("miss", misses), ("eviction", evictions)):
            if count:
                self.pool.labels(event).inc(count)

    def tokens_used(self, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("completion").inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
