"""RoE latency: elmreg's SQL path (pgvector HNSW) vs exact in-process search (numpy) vs FAISS HNSW, same vectors.

For each library size, a scratch database on the configured (or embedded) PostgreSQL is filled with synthetic
experts (100 entries each, clustered around a per-expert centre, like the samples of one task) through elmreg's
own store; Q=32 queries are drawn near random experts. Reported per method: median latency of one routing
decision (vectors already embedded), per-query top-1 agreement with exact search, and whether the vote (the chosen
expert) agrees with exact search.

    .venv/bin/python benchmarks/roe_latency.py --sizes 30000,300000

faiss-cpu is optional (``pip install faiss-cpu``); without it that column is skipped.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import numpy as np
from scratch import DIM, PER_EXPERT, queries_near, scratch_context, synthetic_experts

from elmreg.registry.entities import LibraryEntry, StoredArtifact
from elmreg.registry.settings import load_settings
from elmreg.runtime.context import RegistryContext

HEADER = f"{'entries':>8} {'method':<28} {'ms':>8} {'top-1 agree':>12} {'vote agrees':>12}"


def fill(context: RegistryContext, owners: np.ndarray, vectors: np.ndarray) -> tuple[int, dict[int, int]]:
    backbone = context.catalogue.get_or_create_backbone("bench-backbone", "causal")
    embedder = context.catalogue.get_or_create_embedder(f"bench-{DIM}", DIM)
    expert_ids = {}
    # Bulk load, then build the index once (as after a large import).
    with context.library.index_built_after(embedder.id):
        for expert in range(int(owners.max()) + 1):
            record = context.catalogue.create_expert(
                name=f"bench-{expert}", backbone_id=backbone.id, kind="lora"
            )
            rows = np.flatnonzero(owners == expert)
            context.catalogue.publish_expert(
                record.id,
                artifact=StoredArtifact(f"s3://bench/{expert}", "0" * 64, 1),
                embedder_id=embedder.id,
                entries=[LibraryEntry(i, f"sample {i}", vectors[r]) for i, r in enumerate(rows)],
            )
            expert_ids[record.id] = expert
        started = time.perf_counter()
    print(f"  HNSW build: {time.perf_counter() - started:.1f} s")
    return embedder.id, expert_ids


def timed(fn, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def vote(owner_of_hit: list[int]) -> int:
    counts = Counter(owner_of_hit)
    return max(counts, key=lambda e: (counts[e], -e))


def bench_size(context: RegistryContext, size: int, rng: np.random.Generator, args, faiss) -> None:
    """Fill one scratch catalogue with ``size`` entries and print a row per method."""
    print(f"\nlibrary of {size} entries ({size // PER_EXPERT} experts):")
    centres, owners, vectors = synthetic_experts(rng, size // PER_EXPERT)
    embedder_id, expert_ids = fill(context, owners, vectors)
    targets = rng.integers(0, len(centres), size=args.q)
    queries = np.concatenate([queries_near(rng, centres[t], 1) for t in targets])

    exact_ms, exact_hits = timed(lambda: np.argmax(vectors @ queries.T, axis=0), args.repeats)
    exact_vote = vote([int(owners[h]) for h in exact_hits])
    exact_scores = np.einsum("qd,qd->q", vectors[exact_hits], queries)
    print(HEADER)
    print(f"{size:>8} {'numpy exact (in process)':<28} {exact_ms:>8.2f} {'100.0%':>12} {'yes':>12}")

    version = context.library.library_version()
    for ef in (int(e) for e in args.ef_search.split(",")):

        def run_sql(ef=ef):
            # The store's own statement; formatting the query vectors is part of its cost (numpy and FAISS
            # take arrays).
            return context.library.vote(embedder_id, queries, library_version=version, ef_search=ef)

        ms, result = timed(run_sql, args.repeats)
        votes = result.votes
        # A vote found the exact nearest entry when its score is the exact best inner product.
        agree = np.mean([abs(v.score - s) < 1e-4 for v, s in zip(votes, exact_scores, strict=True)])
        same_vote = vote([expert_ids[v.expert_id] for v in votes]) == exact_vote
        print(f"{size:>8} {f'elmreg SQL, ef_search={ef}':<28} {ms:>8.2f} {agree:>11.1%} {str(same_vote):>12}")
        if faiss is not None:
            if ef == int(args.ef_search.split(",")[0]):
                index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = 64
                index.add(vectors)
            index.hnsw.efSearch = ef
            ms, (_, hits) = timed(lambda index=index: index.search(queries, 1), args.repeats)
            agree = np.mean(hits[:, 0] == exact_hits)
            same_vote = vote([int(owners[h]) for h in hits[:, 0]]) == exact_vote
            print(
                f"{size:>8} {f'FAISS HNSW, efSearch={ef}':<28} {ms:>8.2f} {agree:>11.1%} {str(same_vote):>12}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30000,300000", help="Library sizes (entries), comma-separated.")
    parser.add_argument("--q", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--ef-search", default="40,100", help="pgvector/FAISS ef_search values to compare.")
    args = parser.parse_args()
    settings = load_settings()
    rng = np.random.default_rng(0)
    try:
        import faiss
    except ImportError:
        faiss = None

    print(f"RoE latency, Q={args.q}, {DIM}-d, median of {args.repeats}; agreement is with exact search")
    for size in (int(s) for s in args.sizes.split(",")):
        with scratch_context(settings, "elmreg_bench") as context:
            bench_size(context, size, rng, args, faiss)


if __name__ == "__main__":
    main()
