"""The audit trail at scale: every audit query of the README and ``elmreg audit`` over 1e5 decisions / 3.2e6 votes.

A scratch database gets a small library (``--experts`` experts) and ``--decisions`` routing decisions of Q=32
votes each, written through the library store's own ``record_decision`` (several threads), spread over the last
``--days`` days. Then each query of ``elmreg audit`` (``registry.audit_views.AUDIT_QUERIES``) and each view as the
Python API / ``elmreg audit --view`` reads it is timed (median of 5), and ``audit prune`` counts a month.

    ELMREG_HOME=/tmp/elmreg-bench .venv/bin/python benchmarks/audit_scale.py --decisions 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scratch import scratch_context
from sqlalchemy import text

from elmreg.registry.audit_views import AUDIT_QUERIES, AUDIT_VIEWS
from elmreg.registry.entities import (
    LibraryEntry,
    Publication,
    RoutingDecisionRecord,
    RoutingVote,
    StoredArtifact,
)
from elmreg.registry.settings import load_settings
from elmreg.registry.store import schema
from elmreg.runtime.context import RegistryContext

Q = 32


def timed(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=100_000)
    parser.add_argument("--experts", type=int, default=300)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--explain", action="store_true", help="Print the plan of queries slower than 100 ms."
    )
    args = parser.parse_args()
    settings = load_settings()
    with scratch_context(settings, "elmreg_audit") as context:
        rng = np.random.default_rng(0)
        backbone = context.catalogue.get_or_create_backbone("bench-backbone", "causal")
        embedder = context.catalogue.get_or_create_embedder("bench-384", 384)
        ids = [
            context.catalogue.create_expert(name=f"bench-{k}", backbone_id=backbone.id, kind="lora").id
            for k in range(args.experts)
        ]
        vectors = rng.normal(size=(10, 384)).astype(np.float32)
        context.catalogue.publish_experts(
            [
                Publication(
                    i,
                    StoredArtifact(f"s3://bench/{i}", "0" * 64, 1),
                    [LibraryEntry(j, "s", v) for j, v in enumerate(vectors)],
                )
                for i in ids
            ],
            embedder_id=embedder.id,
        )
        entry_of = {i: (k * 10) + 1 for k, i in enumerate(ids)}  # the first entry id of each expert
        version = context.library.library_version()
        library = context.library

        def record(n: int) -> None:
            local = np.random.default_rng(n)
            winner = int(local.choice(ids))
            voters = [winner if local.random() < 0.7 else int(local.choice(ids)) for _ in range(Q)]
            votes = [RoutingVote(q, 0, entry_of[e], e, 0.5) for q, e in enumerate(voters)]
            library.record_decision(
                RoutingDecisionRecord(
                    embedder_id=embedder.id,
                    library_version=version,
                    q=Q,
                    top_k=1,
                    chosen_expert_id=winner,
                    latency_ms=20.0,
                    caller_label=f"task-{n % 50}",
                ),
                votes,
            )

        started = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(record, range(args.decisions)))
        print(
            f"recorded {args.decisions} decisions ({args.decisions * Q} votes) in {time.perf_counter() - started:.0f} s"
        )
        # Spread the decisions over the last days, as a real audit trail is: a benchmark-only rewrite of the
        # timestamps of its scratch database.
        with context.engine.begin() as c:
            c.execute(
                text(
                    "UPDATE routing_decisions SET created_at = now() - (id % :days) * interval '1 day' - (id % 997) * interval '1 minute'"
                ),
                {"days": args.days},
            )
        library.recount_audit_summary()
        with context.engine.begin() as c:
            c.execute(text("ANALYZE"))

        # The same queries on the previous schema (0004_api_keys: margins counted from the votes), then on head.
        started = time.perf_counter()
        schema.downgrade(context.engine, "0004_api_keys")
        print(f"downgrade to 0004_api_keys: {time.perf_counter() - started:.0f} s")
        before = {title: timed(lambda sql=sql: run(context, sql), 3) for title, sql in AUDIT_QUERIES.items()}
        started = time.perf_counter()
        schema.upgrade(context.engine)
        print(
            f"upgrade to head (backfill of margins and daily counts): {time.perf_counter() - started:.0f} s"
        )
        with context.engine.begin() as c:
            c.execute(text("ANALYZE"))

        print(
            f"\n| query ({args.decisions:,} decisions, {args.decisions * Q:,} votes) | median ms, head "
            "| median ms, schema 0004 |"
        )
        print("|---|---:|---:|")
        for title, sql in AUDIT_QUERIES.items():
            ms = timed(lambda sql=sql: run(context, sql))
            print(f"| {title}: `{sql}` | {ms:.0f} | {before[title]:.0f} |")
            if args.explain and ms > 100:
                with context.engine.connect() as c:
                    plan = c.execute(text(f"EXPLAIN ANALYZE {sql.rstrip(';')}")).scalars().all()
                print("\n".join("    " + line for line in plan))
        for view in AUDIT_VIEWS:
            filters = {"decision_id": args.decisions // 2} if view == "votes" else {}
            ms = timed(lambda view=view, filters=filters: base_audit(context, view, filters))
            print(f"| elmreg audit --view {view}{' --decision N' if filters else ''} | {ms:.0f} | |")
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=args.days - 30)
        ms = timed(lambda: library.prune_decisions(cutoff, dry_run=True))
        decisions, votes = library.prune_decisions(cutoff, dry_run=True)
        print(
            f"| elmreg audit prune --before (oldest month: {decisions:,} decisions, {votes:,} votes), dry run | {ms:.0f} |"
        )
        started = time.perf_counter()
        library.prune_decisions(cutoff, dry_run=False)
        print(f"| elmreg audit prune --yes, same month | {(time.perf_counter() - started) * 1000:.0f} | |")


def run(context: RegistryContext, sql: str) -> None:
    """One of the README's audit queries, as a user runs it in psql."""
    with context.engine.connect() as c:
        c.execute(text(sql)).all()


def base_audit(context: RegistryContext, view: str, filters: dict) -> None:
    table, order_by = AUDIT_VIEWS[view]
    context.audit.audit_rows(table, order_by=order_by, filters=filters, limit=20)


if __name__ == "__main__":
    main()
