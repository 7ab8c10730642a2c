"""The library at scale: ingest, index build, size, routing latency and agreement with exact search, per size.

One scratch database on the configured (or embedded) PostgreSQL grows through the sizes (default 30k, 300k, 1M
entries): each step publishes synthetic experts (100 entries each, clustered around a per-expert centre like the
samples of one task) through elmreg's own publish path (``create_expert`` + ``publish_expert``, a binary COPY of
the entries) with the index dropped (``index_built_after``), then measures at that size:

- ingest rate (entries/s) and HNSW build time: float32 ``vector`` serially (up to ``--serial-max``) and with
  parallel workers, and ``halfvec`` with parallel workers; table and index sizes;
- routing decisions of Q=32 queries (all drawn near one expert, as the instances of one task are): latency p50/p95
  of the SQL vote alone for each index type, ef_search value and connection split, and end to end (embedding the
  32 query texts with the real embedder, then the vote);
- per-query recall@1 and whether the decision (RoE's vote, same tie rule) equals exact numpy search; exact numpy
  and FAISS HNSW (``pip install -e '.[bench]'``) in the same process as the references;
- with ``--graphs 16:64,32:128``: other HNSW graphs (m, ef_construction), their build time, size, and latency
  with recall at every ef_search (a second table).

    ELMREG_HOME=/tmp/elmreg-bench .venv/bin/python benchmarks/library_scale.py --sizes 30000,300000,1000000 \\
        --out benchmarks/results/library_scale.json

Prints one markdown table (the README's); ``--out`` keeps every number as JSON and ``--figure`` draws the growth
curves (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from scratch import DIM, PER_EXPERT, queries_near, scratch_context, synthetic_experts

from elmreg.inference.router import Router, rank_tallies
from elmreg.models.embedder import load_embedder
from elmreg.registry.entities import (
    ExpertTally,
    LibraryEntry,
    LibrarySearchOptions,
    Publication,
    StoredArtifact,
)
from elmreg.registry.settings import load_settings
from elmreg.registry.store.sql.library import SqlLibraryStore
from elmreg.runtime.context import RegistryContext


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def exact_decision(similarities: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact nearest entry per query and RoE's choice over them (router.rank_tallies' rule)."""
    best = np.argmax(similarities, axis=1)
    tallies: dict[int, list[float]] = defaultdict(list)
    for q, b in enumerate(best):
        tallies[int(owners[b])].append(float(similarities[q, b]))
    ranked = rank_tallies([ExpertTally(e, "", len(s), sum(s)) for e, s in tallies.items()])
    return best, ranked[0].expert_id


def sql_choice(votes, expert_index: dict[int, int]) -> int:
    tallies: dict[int, list[float]] = defaultdict(list)
    for v in votes:
        tallies[expert_index[v.expert_id]].append(v.score)
    return rank_tallies([ExpertTally(e, "", len(s), sum(s)) for e, s in tallies.items()])[0].expert_id


class Library:
    """The growing synthetic library and its catalogue."""

    def __init__(self, context: RegistryContext, embedder_name: str, rng: np.random.Generator):
        self.context, self.rng = context, rng
        self.backbone = context.catalogue.get_or_create_backbone("bench-backbone", "causal")
        self.embedder = context.catalogue.get_or_create_embedder(embedder_name, DIM)
        self.centres = np.zeros((0, DIM), np.float32)
        self.vectors = np.zeros((0, DIM), np.float32)
        self.owners = np.zeros(0, np.int64)
        self.expert_index: dict[int, int] = {}  # catalogue id -> row of centres

    def grow(self, size: int) -> dict:
        """Publish experts until the library has ``size`` entries; returns the ingest numbers."""
        new_experts = (size - len(self.vectors)) // PER_EXPERT
        first = len(self.centres)
        centres, owners, vectors = synthetic_experts(self.rng, new_experts, first)
        catalogue = self.context.catalogue
        started = time.perf_counter()
        # As index_built_after does, but the caller builds (and times) each index variant afterwards.
        self.context.library.drop_index(self.embedder.id)
        for batch in range(0, new_experts, args_batch := 100):
            ids = [
                catalogue.create_expert(
                    name=f"bench-{first + k}", backbone_id=self.backbone.id, kind="lora"
                ).id
                for k in range(batch, min(batch + args_batch, new_experts))
            ]
            catalogue.publish_experts(
                [
                    Publication(
                        expert_id,
                        StoredArtifact(f"s3://bench/{first + k}", "0" * 64, 1),
                        [
                            LibraryEntry(i, f"sample {i} of bench-{first + k}", v)
                            for i, v in enumerate(vectors[k * PER_EXPERT : (k + 1) * PER_EXPERT])
                        ],
                    )
                    for k, expert_id in zip(range(batch, batch + len(ids)), ids, strict=True)
                ],
                embedder_id=self.embedder.id,
            )
            for k, expert_id in zip(range(batch, batch + len(ids)), ids, strict=True):
                self.expert_index[expert_id] = first + k
        ingest_s = time.perf_counter() - started
        self.centres = np.concatenate([self.centres, centres])
        self.vectors = np.concatenate([self.vectors, vectors])
        self.owners = np.concatenate([self.owners, owners])
        return {"entries_added": len(owners), "ingest_s": ingest_s, "ingest_per_s": len(owners) / ingest_s}

    def decisions(self, count: int, q: int) -> list[tuple[np.ndarray, int]]:
        """``count`` query sets of ``q`` queries, each drawn near one random expert (a task's instances)."""
        targets = self.rng.integers(0, len(self.centres), size=count)
        return [(queries_near(self.rng, self.centres[t], q), int(t)) for t in targets]


def store_with(context: RegistryContext, **options) -> SqlLibraryStore:
    return SqlLibraryStore(context.sessions, LibrarySearchOptions(**options))


def routing_variants(index_type: str, args) -> list[tuple[str, int, dict]]:
    """The searches measured on an index: ``(name, ef_search, store options)``; the first ef_search (and, on a
    bit index, every re-rank depth at it) on 1 and 2 connections. A bit index's search reads
    max(ef_search, rerank) graph candidates and re-ranks the nearest ``rerank`` of them exactly."""
    if index_type != "bit":
        return [
            (f"{index_type} ef={ef}", ef, {"index_type": index_type, "both_splits": ef == args.ef_search[0]})
            for ef in args.ef_search
        ]
    ef = args.ef_search[0]
    return [
        (f"bit rerank={rerank}", ef, {"index_type": "bit", "rerank": rerank, "both_splits": True})
        for rerank in args.rerank
    ]


def measure_sql(store, library: Library, decisions, exact, ef_search: int) -> dict:
    version = library.context.library.library_version()
    latencies, recall, agree = [], [], []
    for (queries, _), (best, choice) in zip(decisions, exact, strict=True):
        started = time.perf_counter()
        result = store.vote(library.embedder.id, queries, library_version=version, ef_search=ef_search)
        latencies.append((time.perf_counter() - started) * 1000)
        best_scores = np.einsum("qd,qd->q", library.vectors[best], queries)
        recall += [abs(v.score - s) <= 1e-5 for v, s in zip(result.votes, best_scores, strict=True)]
        agree.append(sql_choice(result.votes, library.expert_index) == choice)
    return {
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "recall": float(np.mean(recall)),
        "vote_agreement": float(np.mean(agree)),
    }


def bench_size(
    library: Library, size: int, args, faiss, router: Router | None, save=lambda row: None
) -> dict:
    """Grow the library to ``size`` and measure it; ``save(row)`` is called as the row fills in (a long run
    keeps what it measured if it is stopped)."""
    print(f"\n== {size} entries ({size // PER_EXPERT} experts)", flush=True)
    row: dict = {"size": size, **library.grow(size)}
    # The machine may be shared: the load average says how busy it was while this size was measured.
    row["load_average_start"] = os.getloadavg()[0]
    print(f"   ingest {row['ingest_per_s']:.0f} entries/s", flush=True)
    context, embedder_id = library.context, library.embedder.id
    decisions = library.decisions(args.decisions, args.q)

    exact, exact_ms = [], []
    for queries, _ in decisions:
        started = time.perf_counter()
        similarities = queries @ library.vectors.T
        exact.append(exact_decision(similarities, library.owners))
        exact_ms.append((time.perf_counter() - started) * 1000)
    row["numpy"] = {"p50_ms": percentile(exact_ms, 50), "p95_ms": percentile(exact_ms, 95)}

    builds = []
    if size <= args.serial_max:
        builds.append(("vector", 0))
    # vector last: the end-to-end measurement routes on it.
    builds += [(index_type, args.workers) for index_type in args.index_types]
    row["builds"], row["routing"] = {}, {}
    for index_type, workers in builds:
        store = store_with(
            context, index_type=index_type, build_workers=workers, build_memory=args.build_memory
        )
        started = time.perf_counter()
        store.build_index(embedder_id, DIM)
        build_s = time.perf_counter() - started
        storage = store.storage(embedder_id)
        key = f"{index_type}/{workers}w"
        row["builds"][key] = {"build_s": build_s, "index_bytes": storage.index_bytes}
        row["table_bytes"] = storage.table_bytes
        print(f"   build {key}: {build_s:.1f} s, index {storage.index_bytes / 2**20:.0f} MiB", flush=True)
        save(row)
        if workers == 0:
            continue
        for name, ef, options in routing_variants(index_type, args):
            for connections in (1, 2) if options.pop("both_splits") else (1,):
                search = store_with(context, **options, parallel_connections=connections)
                key = f"{name} conn={connections}"
                row["routing"][key] = measure_sql(search, library, decisions, exact, ef)
                r = row["routing"][key]
                save(row)
                print(
                    f"   SQL {key}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, recall {r['recall']:.3f}, "
                    f"vote {r['vote_agreement']:.3f}",
                    flush=True,
                )

    if router is not None:
        texts = [
            f"Answer Choices: yes | no, Instance: is sample {i} of the task relevant?" for i in range(args.q)
        ]
        latencies = []
        for _ in range(args.decisions // 2):
            started = time.perf_counter()
            router.route(texts, q=args.q, record=False)
            latencies.append((time.perf_counter() - started) * 1000)
        row["end_to_end"] = {"p50_ms": percentile(latencies, 50), "p95_ms": percentile(latencies, 95)}
        print(f"   end to end (embed 32 + vote): p50 {row['end_to_end']['p50_ms']:.1f} ms", flush=True)
        save(row)

    if faiss is not None and size <= args.faiss_max:
        index = faiss.IndexHNSWFlat(DIM, 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        started = time.perf_counter()
        index.add(library.vectors)
        build_s = time.perf_counter() - started
        index.hnsw.efSearch = args.ef_search[0]
        latencies, recall, agree = [], [], []
        for (queries, _), (best, choice) in zip(decisions, exact, strict=True):
            started = time.perf_counter()
            _, hits = index.search(queries, 1)
            latencies.append((time.perf_counter() - started) * 1000)
            recall += list(hits[:, 0] == best)
            similarities = np.einsum("qd,qd->q", library.vectors[hits[:, 0]], queries)
            tallies: dict[int, list[float]] = defaultdict(list)
            for h, s in zip(hits[:, 0], similarities, strict=True):
                tallies[int(library.owners[h])].append(float(s))
            ranked = rank_tallies([ExpertTally(e, "", len(s), sum(s)) for e, s in tallies.items()])
            agree.append(ranked[0].expert_id == choice)
        row["faiss"] = {
            "build_s": build_s,
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "recall": float(np.mean(recall)),
            "vote_agreement": float(np.mean(agree)),
        }
        print(f"   FAISS: build {build_s:.1f} s, p50 {row['faiss']['p50_ms']:.2f} ms", flush=True)
        del index
    for m, ef_construction in args.graphs:
        bench_graph(row, library, decisions, exact, args, m, ef_construction)
        save(row)
    row["load_average_end"] = os.getloadavg()[0]
    return row


def bench_graph(row: dict, library: Library, decisions, exact, args, m: int, ef_construction: int) -> None:
    """Another HNSW graph (m, ef_construction) of ``--graph-index-type``, built with the parallel workers and
    routed on with the default split over 2 connections at every ef_search: what a better graph buys in recall
    per millisecond, and what it costs to build."""
    index_type, name = args.graph_index_type, f"m={m} ef_construction={ef_construction}"
    options = {"index_type": index_type, "hnsw_m": m, "hnsw_ef_construction": ef_construction}
    store = store_with(library.context, **options, build_workers=args.workers, build_memory=args.build_memory)
    started = time.perf_counter()
    store.build_index(library.embedder.id, DIM)
    graph = {
        "index_type": index_type,
        "build_s": time.perf_counter() - started,
        "index_bytes": store.storage(library.embedder.id).index_bytes,
        "routing": {},
    }
    print(f"   graph {name} ({index_type}): build {graph['build_s']:.1f} s", flush=True)
    for ef in args.ef_search:
        search = store_with(library.context, **options, parallel_connections=2)
        measured = measure_sql(search, library, decisions, exact, ef)
        graph["routing"][str(ef)] = measured
        print(
            f"   graph {name} ef={ef} conn=2: p50 {measured['p50_ms']:.1f} ms, recall {measured['recall']:.3f}, "
            f"vote {measured['vote_agreement']:.3f}",
            flush=True,
        )
    row.setdefault("graphs", {})[name] = graph


def graph_table(rows: list[dict]) -> str:
    """Per size and graph: build time, index size, and per ef_search the split-connection p50 with recall."""
    lines = [
        "| entries | graph | index | build (s) | index (MiB) | ef_search: p50 ms (recall@1, vote = exact) |",
        "|---:|---|---|---:|---:|---|",
    ]
    for r in rows:
        for name, g in r.get("graphs", {}).items():
            cells = "; ".join(
                f"{ef}: {x['p50_ms']:.0f} ({x['recall']:.3f}, {x['vote_agreement']:.0%})"
                for ef, x in g["routing"].items()
            )
            lines.append(
                f"| {r['size']:,} | {name} | {g['index_type']} | {g['build_s']:.0f} "
                f"| {g['index_bytes'] / 2**20:,.0f} | {cells} |"
            )
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    """Per size, every index type and search side by side (the vector HNSW baseline first): build, index size,
    p50 / p95 on one connection, p50 split over two, per-query recall@1 and decisions equal to exact search;
    then the exact numpy and FAISS references of the same run."""
    lines = [
        "| entries | index, search | build (s) | index (MiB) | p50 / p95 ms, 1 conn | p50 ms, 2 conn "
        "| recall@1 | vote = exact |",
        "|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    order = {"vector": 0, "halfvec": 1, "bit": 2}
    for r in rows:
        singles = sorted(
            (name for name in r["routing"] if name.endswith(" conn=1")),
            key=lambda n: (order.get(n.split()[0], 3), int(n.split()[1].split("=")[1])),
        )
        for name in singles:
            index_type, search = name.split()[0], name.split()[1]
            one, two = r["routing"][name], r["routing"].get(name.replace("conn=1", "conn=2"))
            build = _build(r, index_type) or {}
            lines.append(
                f"| {r['size']:,} | {index_type}, {search.replace('=', ' ')} | {_ms(build or None, 'build_s')} "
                f"| {build.get('index_bytes', 0) / 2**20:,.0f} | {_ms(one)} / {_ms(one, 'p95_ms')} | {_ms(two)} "
                f"| {one['recall']:.3f} | {one['vote_agreement']:.0%} |"
            )
        f = r.get("faiss")
        lines.append(
            f"| {r['size']:,} | numpy exact; FAISS HNSW (m 16, ef 40) | – ; {_ms(f, 'build_s')} | | "
            f"{_ms(r['numpy'], fmt='{:.1f}')} ; {_ms(f, fmt='{:.1f}')} | | 1.000 ; "
            f"{_ms(f, 'recall', '{:.3f}')} | 100% ; {_ms(f, 'vote_agreement', '{:.0%}')} |"
        )
    return "\n".join(lines)


def print_tables(rows: list[dict], args) -> None:
    if any(r.get("routing") for r in rows):
        print("\n" + comparison_table(rows))
    if any(name.startswith("vector ") for r in rows for name in r.get("routing", {})):
        print("\n" + table(rows, args.ef_search[0]))
    if any(r.get("graphs") for r in rows):
        print("\n" + graph_table(rows))


def _build(row: dict, index_type: str, parallel: bool = True) -> dict | None:
    return next(
        (
            v
            for k, v in row["builds"].items()
            if k.startswith(index_type + "/") and k.endswith("/0w") != parallel
        ),
        None,
    )


def _ms(measure: dict | None, key: str = "p50_ms", fmt: str = "{:.0f}") -> str:
    return fmt.format(measure[key]) if measure else "–"


def table(rows: list[dict], ef: int) -> str:
    lines = [
        "| entries | ingest/s | HNSW build (s): vector serial / parallel, halfvec parallel | table + index (MiB) "
        f"| SQL Q=32 p50 / p95 (ms), ef_search={ef} | split over 2 connections, p50 | halfvec p50 | end to end p50 "
        "| recall@1 | vote = exact | numpy exact p50 | FAISS HNSW p50 (recall, vote = exact) |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        serial, vec, half = _build(r, "vector", False), _build(r, "vector"), _build(r, "halfvec")
        main = r["routing"].get(f"vector ef={ef} conn=1")
        split = r["routing"].get(f"vector ef={ef} conn=2")
        halfr = r["routing"].get(f"halfvec ef={ef} conn=1")
        f = r.get("faiss")
        faiss_cell = f"{f['p50_ms']:.1f} ({f['recall']:.3f}, {f['vote_agreement']:.0%})" if f else "–"
        half_size = f" (halfvec {half['index_bytes'] / 2**20:,.0f})" if half else ""
        vec_size = f"{vec['index_bytes'] / 2**20:,.0f}" if vec else "–"
        table_size = f"{r['table_bytes'] / 2**20:,.0f}" if r.get("table_bytes") else "–"
        lines.append(
            f"| {r['size']:,} | {r['ingest_per_s']:,.0f} | {_ms(serial, 'build_s')} / {_ms(vec, 'build_s')}, "
            f"{_ms(half, 'build_s')} | {table_size} + {vec_size}{half_size} "
            f"| {_ms(main)} / {_ms(main, 'p95_ms')} | {_ms(split)} | {_ms(halfr)} | {_ms(r.get('end_to_end'))} "
            f"| {_ms(main, 'recall', '{:.3f}')} | {_ms(main, 'vote_agreement', '{:.0%}')} | {_ms(r['numpy'])} "
            f"| {faiss_cell} |"
        )
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, ef: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def curve(ax, values, style, label):
        points = [(r["size"], v) for r, v in zip(rows, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for key, style, label in (("p50_ms", "o-", "SQL p50"), ("p95_ms", "o--", "SQL p95")):
        curve(axes[0], [r["routing"].get(f"vector ef={ef} conn=1", {}).get(key) for r in rows], style, label)
    curve(axes[0], [(r["numpy"] or {}).get("p50_ms") for r in rows], "s-", "numpy exact p50")
    curve(axes[0], [r.get("faiss", {}).get("p50_ms") for r in rows], "^-", "FAISS HNSW p50")
    axes[0].set(title=f"routing, Q=32, ef_search={ef} (ms)", xscale="log", yscale="log")
    for index_type in ("vector", "halfvec"):
        curve(
            axes[1],
            [(_build(r, index_type) or {}).get("build_s") for r in rows],
            "o-",
            f"{index_type}, parallel",
        )
        curve(
            axes[2],
            [((_build(r, index_type) or {}).get("index_bytes") or 0) / 2**20 or None for r in rows],
            "o-",
            f"{index_type} index",
        )
    curve(axes[1], [r["entries_added"] / r["ingest_per_s"] for r in rows], "s--", "ingest of the step")
    axes[1].set(title="HNSW build and ingest (s)", xscale="log", yscale="log")
    curve(axes[2], [r["table_bytes"] / 2**20 if r["table_bytes"] else None for r in rows], "o-", "table")
    axes[2].set(title="size (MiB)", xscale="log", yscale="log")
    for ax in axes:
        ax.set_xlabel("library entries")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(paths: list[Path], figure_path: Path | None, args) -> None:
    """The table (and figure) of earlier runs' JSON files, rows by size."""
    rows = sorted(
        (row for path in paths for row in json.loads(path.read_text())["rows"]), key=lambda r: r["size"]
    )
    for path in paths:
        meta = json.loads(path.read_text())["meta"]
        print(f"{path}: PostgreSQL {meta['server']}, pgvector {meta['pgvector']}; {meta['machine']}")
    print_tables(rows, args)
    if figure_path:
        figure(rows, figure_path, args.ef_search[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="30000,300000,1000000", help="Library sizes (entries), ascending.")
    parser.add_argument("--q", type=int, default=32)
    parser.add_argument("--decisions", type=int, default=60, help="Routing decisions measured per variant.")
    parser.add_argument("--ef-search", default="40,100", help="ef_search values; the first is the table's.")
    parser.add_argument("--workers", type=int, default=2, help="Parallel maintenance workers for builds.")
    parser.add_argument(
        "--serial-max", type=int, default=300000, help="Also time a serial build up to this size."
    )
    parser.add_argument("--build-memory", default="3GB", help="maintenance_work_mem for the builds.")
    parser.add_argument(
        "--index-types",
        default="bit,halfvec,vector",
        help="Index types to build and route on, vector last ('': none, only the --graphs).",
    )
    parser.add_argument(
        "--rerank",
        default="40,100,200",
        help="Re-rank depths measured on the bit index (at the first ef_search).",
    )
    parser.add_argument("--faiss-threads", type=int, default=1, help="OpenMP threads for FAISS.")
    parser.add_argument(
        "--faiss-max", type=int, default=10**9, help="Build the FAISS reference only up to this size."
    )
    parser.add_argument(
        "--graphs",
        default="",
        help="HNSW graphs to compare besides the default, as m:ef_construction pairs (e.g. 16:64,32:128).",
    )
    parser.add_argument("--graph-index-type", default="halfvec", help="Index type the --graphs are built in.")
    parser.add_argument("--no-embedder", action="store_true", help="Skip the end-to-end measurement.")
    parser.add_argument("--out", type=Path, help="Write every number as JSON here.")
    parser.add_argument("--figure", type=Path, help="Draw the growth curves here (PNG).")
    parser.add_argument(
        "--report", type=Path, nargs="+", help="Only print the table (and figure) of these JSONs."
    )
    args = parser.parse_args()
    args.ef_search = [int(e) for e in args.ef_search.split(",")]
    args.rerank = [int(r) for r in args.rerank.split(",")]
    if args.report:
        return report(args.report, args.figure, args)
    args.index_types = [t for t in args.index_types.split(",") if t]  # none: only the --graphs
    args.graphs = [tuple(int(v) for v in pair.split(":")) for pair in args.graphs.split(",") if pair]
    try:
        import faiss

        # One thread: FAISS's OpenMP threads spin-wait on each other, and on a busy machine the 300k build did
        # not finish in 25 min with two of them.
        faiss.omp_set_num_threads(args.faiss_threads)
    except ImportError:
        faiss = None
    settings = load_settings()
    rows = []
    with scratch_context(settings, "elmreg_scale") as context:
        summary = context.summary()
        embedder = None if args.no_embedder else load_embedder(settings.embedder)
        # The library's embedder carries the real embedder's name, so the router's end-to-end path searches it.
        library = Library(context, embedder.name if embedder else "bench-384", np.random.default_rng(0))
        router = Router(context, embedder) if embedder else None
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        print(
            f"PostgreSQL {summary.server_version}, pgvector {summary.pgvector_version}; {machine}", flush=True
        )
        meta = {"server": summary.server_version, "pgvector": summary.pgvector_version, "machine": machine}

        def save(row: dict | None = None) -> None:
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                settings_used = vars(args) | {
                    "out": str(args.out),
                    "figure": str(args.figure),
                    "report": None,
                }
                done = rows + ([row] if row is not None else [])
                args.out.write_text(json.dumps({"meta": meta, "args": settings_used, "rows": done}, indent=1))

        for size in (int(s) for s in args.sizes.split(",")):
            rows.append(bench_size(library, size, args, faiss, router, save))
            save()
        print_tables(rows, args)
        if args.figure:
            figure(rows, args.figure, args.ef_search[0])


if __name__ == "__main__":
    main()
