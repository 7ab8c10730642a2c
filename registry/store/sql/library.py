"""The library on pgvector: binary COPY of entries, inner-product search, RoE's vote in one statement."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
from pgvector.psycopg import register_vector
from sqlalchemy import delete, func, insert, literal, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from elmreg.registry.entities import (
    ExpertTally,
    LibraryChange,
    LibraryEntry,
    LibraryHit,
    LibrarySearchOptions,
    LibraryStorage,
    PendingDecision,
    RoutingDecisionRecord,
    RoutingVote,
    VoteResult,
)
from elmreg.registry.errors import CatalogueError, NotFoundError, UserError
from elmreg.registry.store.library import LibraryStore
from elmreg.registry.store.models import (
    EmbedderRow,
    ExpertRow,
    LibraryChangeRow,
    LibraryEntryRow,
    RoutingDailyChoiceRow,
    RoutingDecisionRow,
    RoutingVoteRow,
    hnsw_index_name,
)
from elmreg.registry.store.session import ManagedSessions
from elmreg.registry.store.sql import records

INDEX_TYPES = ("vector", "halfvec", "bit")
# "off": queries crowded out of their ef_search candidates go straight to an exact scan.
ITERATIVE_SCANS = ("strict_order", "relaxed_order", "off")
# pgvector's first version with iterative index scans (hnsw.iterative_scan); older servers get exact fallbacks.
ITERATIVE_SCAN_VERSION = (0, 8)
# Serialises library version numbers across every process that publishes or retires experts.
_LIBRARY_VERSION_LOCK = 0x656C6D726567  # "elmreg"


def pgvector_version(session: Session) -> tuple[int, ...]:
    """The installed pgvector extension's version, e.g. ``(0, 8, 1)``; ``()`` when it is not installed."""
    version = session.scalar(text("SELECT extversion FROM pg_extension WHERE extname = 'vector'"))
    return tuple(int(part) for part in version.split(".")) if version else ()


def pgvector_versions(session: Session) -> tuple[str | None, str | None]:
    """The installed pgvector version in this database and the newest one the server could update it to."""
    row = session.execute(
        text("SELECT installed_version, default_version FROM pg_available_extensions WHERE name = 'vector'")
    ).one_or_none()
    return (row.installed_version, row.default_version) if row is not None else (None, None)


def update_pgvector(session: Session) -> None:
    """Bring the database's pgvector up to the server's version (after pg_upgrade or a package update)."""
    session.execute(text("ALTER EXTENSION vector UPDATE"))


def visible_experts_clause(version_param: str = "library_version") -> str:
    """SQL condition on ``experts e``: routable at the library version bound to ``:<version_param>``."""
    return (
        f"e.library_version IS NOT NULL AND e.library_version <= :{version_param}"
        f" AND (e.retired_at_version IS NULL OR e.retired_at_version > :{version_param})"
    )


def routable_filters(kinds: bool, backbone: bool, prefer_alias: bool = False) -> list[str]:
    """SQL conditions on ``experts e`` for a routing search: visible at ``:library_version``, and of ``:kinds`` /
    on ``:backbone_id`` when those filters are given; with ``prefer_alias``, an expert whose task has the alias
    ``:prefer_alias`` only if the alias names it (tasks without that alias, and merges, keep every expert)."""
    filters = [visible_experts_clause()]
    if kinds:
        filters.append("e.kind = ANY(:kinds)")
    if backbone:
        filters.append("e.backbone_id = :backbone_id")
    if prefer_alias:
        filters.append(
            "NOT EXISTS (SELECT 1 FROM expert_aliases ea WHERE ea.task_id = e.task_id"
            " AND ea.alias = :prefer_alias AND ea.expert_id <> e.id)"
        )
    return filters


def vector_cast(index_type: str, dimension: int) -> str:
    """The type an embedder's entries and queries are cast to for its index: ``vector(d)``, ``halfvec(d)`` or
    ``bit(d)`` (the sign bits of ``binary_quantize``)."""
    if index_type not in INDEX_TYPES:
        raise CatalogueError(
            f"unknown library index type '{index_type}'; use one of {', '.join(INDEX_TYPES)}"
        )
    return f"{index_type}({int(dimension)})"


def index_key(index_type: str, dimension: int, value: str) -> str:
    """The expression the embedder's HNSW index orders a ``vector`` value by (a column or a query): its cast for
    ``vector`` / ``halfvec`` (compared by ``<#>``, the negative inner product), its binary quantization for
    ``bit`` (compared by ``<~>``, the Hamming distance). Index and queries must spell it the same way."""
    cast = vector_cast(index_type, dimension)
    if index_type == "bit":
        return f"binary_quantize({value}::vector({int(dimension)}))::{cast}"
    return f"{value}::{cast}"


def index_operator(index_type: str) -> str:
    """The distance operator of the index type's keys (ascending: nearest first)."""
    return "<~>" if index_type == "bit" else "<#>"


def create_hnsw_index_sql(
    embedder_id: int, dimension: int, options: LibrarySearchOptions | None = None
) -> str:
    """The embedder's HNSW index. The column has no fixed dimension; a partial expression index per embedder is
    what lets pgvector serve "ORDER BY embedding::vector(d) <#> q" for that embedder's entries. With
    ``halfvec`` the index holds float16 copies (half the size; the table keeps float32); with ``bit`` one sign
    bit per dimension, searched by Hamming distance (a twelfth of the float16 graph's vectors), whose candidates
    the routing statement re-ranks by the exact inner product from the table."""
    options = options or LibrarySearchOptions()
    index_type = options.index_type
    key = index_key(index_type, dimension, "embedding")
    ops = "bit_hamming_ops" if index_type == "bit" else f"{index_type}_ip_ops"
    return (
        f"CREATE INDEX IF NOT EXISTS {hnsw_index_name(embedder_id)} ON library_entries "
        f"USING hnsw (({key}) {ops}) "
        f"WITH (m = {int(options.hnsw_m)}, ef_construction = {int(options.hnsw_ef_construction)}) "
        f"WHERE embedder_id = {int(embedder_id)}"
    )


def current_library_version(session: Session) -> int:
    """The latest library version (0 for an empty library)."""
    return session.scalar(select(func.max(LibraryChangeRow.version))) or 0


def next_library_version(session: Session) -> int:
    """The version the caller's transaction publishes; later publishers wait for it to commit."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LIBRARY_VERSION_LOCK})
    return current_library_version(session) + 1


def copy_entries(session: Session, expert_id: int, embedder_id: int, entries: Iterable[LibraryEntry]) -> int:
    """Write entries inside the caller's transaction (publishing commits them with the expert)."""
    return copy_experts_entries(session, embedder_id, [(expert_id, entries)])


def copy_experts_entries(
    session: Session, embedder_id: int, experts: Iterable[tuple[int, Iterable[LibraryEntry]]]
) -> int:
    """Write the entries of several experts in one binary COPY inside the caller's transaction."""
    dimension = session.scalar(select(EmbedderRow.dimension).where(EmbedderRow.id == embedder_id))
    if dimension is None:
        raise NotFoundError(f"no embedder '{embedder_id}'")
    connection = session.connection().connection.driver_connection
    register_vector(connection)
    written = 0
    touched: set[int] = set()
    # Binary COPY: one round trip for all rows, vectors sent as float4 arrays rather than text.
    with (
        connection.cursor() as cursor,
        cursor.copy(
            "COPY library_entries (expert_id, embedder_id, sample_index, text, embedding) FROM STDIN (FORMAT BINARY)"
        ) as copy,
    ):
        copy.set_types(["int4", "int4", "int4", "text", "vector"])
        for expert_id, entries in experts:
            for entry in entries:
                vector = np.asarray(entry.embedding, dtype=np.float32)
                if vector.shape != (dimension,):
                    raise CatalogueError(
                        f"library entry {entry.sample_index} has shape {vector.shape}; "
                        f"the embedder has {dimension} dims"
                    )
                copy.write_row((expert_id, embedder_id, entry.sample_index, entry.text, vector))
                written += 1
                touched.add(expert_id)
    _refresh_centroids(session, embedder_id, sorted(touched))
    return written


def _refresh_centroids(session: Session, embedder_id: int, expert_ids: Sequence[int]) -> None:
    """Recompute the centroids of experts whose entries were just written, in the same transaction (so an
    expert is never routable by its entries without its centroid, or the other way round)."""
    if not expert_ids:
        return
    means = session.execute(
        text(
            f"""
            SELECT expert_id, avg(embedding)::text AS mean, count(*) AS entries
            FROM library_entries
            WHERE embedder_id = {int(embedder_id)} AND expert_id = ANY(:experts)
            GROUP BY expert_id
            """
        ),
        {"experts": list(expert_ids)},
    ).all()
    session.execute(
        text(
            """
            INSERT INTO expert_centroids (expert_id, embedder_id, embedding, entries)
            VALUES (:expert_id, :embedder_id, CAST(:embedding AS vector), :entries)
            ON CONFLICT (expert_id, embedder_id)
            DO UPDATE SET embedding = EXCLUDED.embedding, entries = EXCLUDED.entries
            """
        ),
        [
            {
                "expert_id": m.expert_id,
                "embedder_id": embedder_id,
                "embedding": centroid_literal(m.mean),
                "entries": m.entries,
            }
            for m in means
        ],
    )


def centroid_literal(mean: str) -> str:
    """The unit-length direction of a mean embedding (pgvector's text form in and out). Normalised here rather
    than with pgvector's l2_normalize, which servers before pgvector 0.7 lack."""
    vector = np.asarray(json.loads(mean), dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    return "[" + ",".join(repr(float(x)) for x in (vector / norm if norm > 0 else vector)) + "]"


@lru_cache(maxsize=8)
def _element_format(dimension: int) -> str:
    return '"[' + ",".join(["%.7g"] * dimension) + ']"'


def vector_array_literal(vectors: np.ndarray) -> str:
    """A PostgreSQL ``vector[]`` literal for a batch of query vectors, sent as one text parameter.

    ``%``-formatting a whole vector at once is about 3x faster than formatting its floats one by one (2.4 vs
    6.6 ms for 32 x 384), and text beats psycopg's per-element adaptation of numpy arrays here (12 ms).
    Seven significant digits keep float32 values exact enough for ranking.
    """
    element = _element_format(vectors.shape[1])
    return "{" + ",".join(element % tuple(v.tolist()) for v in vectors) + "}"


def vote_sql(
    dimension: int,
    embedder_id: int,
    kinds: bool,
    backbone: bool,
    *,
    filter_in_scan: bool = False,
    index_type: str = "vector",
    prefer_alias: bool = False,
) -> str:
    """RoE's retrieval as one statement: per query its ``:top_k`` nearest visible entries, one row per vote.

    With ``filter_in_scan`` False (the fast path) the embedder's HNSW index yields ``:candidates`` (ef_search)
    entries per query and the visibility filter runs on those: a query whose candidates all belong to hidden
    experts gets no row. With ``filter_in_scan`` True the filter is part of the index scan's own query, so an
    iterative index scan (pgvector 0.8) keeps walking the graph until ``:top_k`` visible entries are found (for
    ``bit``, ``:candidates``: the re-rank needs its candidates); with index scans disabled and ``vector``
    keys the same statement is an exact search over the visible entries.

    With ``bit`` the index yields the ``:candidates`` entries nearest by the Hamming distance of their sign
    bits, and those are re-ranked by the exact float32 inner product read from the table.
    """
    filters = routable_filters(kinds, backbone, prefer_alias)
    d = int(dimension)
    entry_key = index_key(index_type, d, "le.embedding")
    operator = index_operator(index_type)
    # Scores (and the re-rank) are float32 inner products whatever the index compares.
    exact = (
        f"{entry_key} <#> queries.query"
        if index_type == "vector"
        else f"le.embedding::vector({d}) <#> queries.exact_query"
    )
    # The embedder's id is a literal so that the planner can match the partial index's predicate even in a
    # generic plan.
    if filter_in_scan:
        scan = f"""
                SELECT le.id AS entry_id, le.expert_id, {exact} AS distance
                FROM library_entries le JOIN experts e ON e.id = le.expert_id
                WHERE le.embedder_id = {int(embedder_id)} AND {" AND ".join(filters)}
                ORDER BY {entry_key} {operator} queries.query"""
        if index_type != "bit":
            nearest = f"{scan}\n                LIMIT :top_k"
        else:
            nearest = f"""
            SELECT candidate.entry_id, candidate.expert_id, candidate.distance
            FROM ({scan}
                LIMIT :candidates
            ) candidate
            ORDER BY candidate.distance, candidate.entry_id
            LIMIT :top_k"""
    else:
        nearest = f"""
            SELECT candidate.entry_id, candidate.expert_id, candidate.distance
            FROM (
                SELECT le.id AS entry_id, le.expert_id, {exact} AS distance
                FROM library_entries le
                WHERE le.embedder_id = {int(embedder_id)}
                ORDER BY {entry_key} {operator} queries.query
                LIMIT :candidates
            ) candidate
            JOIN experts e ON e.id = candidate.expert_id
            WHERE {" AND ".join(filters)}
            ORDER BY candidate.distance, candidate.entry_id
            LIMIT :top_k"""
    return f"""
    WITH queries AS (
        SELECT (ordinality - 1)::int AS query_index, query AS exact_query, {index_key(index_type, d, "query")} AS query
        FROM unnest(CAST(:queries AS vector({d})[])) WITH ORDINALITY AS q(query, ordinality)
    )
    SELECT queries.query_index, nearest.entry_id, nearest.expert_id, -nearest.distance AS score
    FROM queries CROSS JOIN LATERAL ({nearest}
    ) nearest
    """


# The BIGSERIAL behind routing_decisions.id: nextval() hands each id out once, whoever asks, so ids reserved for a
# batch never collide with those single inserts take.
_DECISION_ID_SEQUENCE = "routing_decisions_id_seq"


def _decision_row(decision: RoutingDecisionRecord, votes: Sequence[RoutingVote]) -> dict[str, Any]:
    return {
        "caller_label": decision.caller_label,
        "task_id": decision.task_id,
        "embedder_id": decision.embedder_id,
        "backbone_id": decision.backbone_id,
        "library_version": decision.library_version,
        "q": decision.q,
        "top_k": decision.top_k,
        "kinds": list(decision.kinds) if decision.kinds else None,
        "chosen_expert_id": decision.chosen_expert_id,
        "latency_ms": decision.latency_ms,
        "details": decision.details,
        "router": decision.router,
        "router_params": decision.router_params,
        **_margin(decision.chosen_expert_id, votes),
    }


def _vote_rows(decision_id: int, votes: Sequence[RoutingVote]) -> list[dict[str, Any]]:
    return [
        {
            "decision_id": decision_id,
            "query_index": v.query_index,
            "rank": v.rank,
            "library_entry_id": v.entry_id,
            "expert_id": v.expert_id,
            "score": v.score,
            "weight": v.weight,
        }
        for v in votes
    ]


_DAILY_CHOICES_KEY = ["day", "task_id", "caller_label", "chosen_expert_id"]


def _count_daily_choices(session: Session, decisions: Sequence[RoutingDecisionRecord]) -> None:
    """Count new decisions in ``routing_daily_choices`` (same transaction, so the counts never drift)."""
    counts: dict[tuple[int | None, str | None, int | None], tuple[int, int, int]] = {}
    for d in decisions:
        key = (d.task_id, d.caller_label, d.chosen_expert_id)
        n, first, last = counts.get(key, (0, d.library_version, d.library_version))
        counts[key] = (n + 1, min(first, d.library_version), max(last, d.library_version))
    table = RoutingDailyChoiceRow.__table__
    # One row per key: ON CONFLICT cannot update the same row twice in one statement.
    statement = pg_insert(table).values(
        [
            {
                "day": func.date_trunc("day", func.now()),
                "task_id": task_id,
                "caller_label": caller_label,
                "chosen_expert_id": chosen_expert_id,
                "decisions": n,
                "first_version": first,
                "last_version": last,
            }
            for (task_id, caller_label, chosen_expert_id), (n, first, last) in counts.items()
        ]
    )
    session.execute(
        statement.on_conflict_do_update(
            index_elements=_DAILY_CHOICES_KEY,
            set_={
                "decisions": table.c.decisions + statement.excluded.decisions,
                "first_version": func.least(table.c.first_version, statement.excluded.first_version),
                "last_version": func.greatest(table.c.last_version, statement.excluded.last_version),
            },
        )
    )


def _daily_choices_of(decisions: Any) -> Any:
    """INSERT ... SELECT of the daily choice counts of the decisions ``decisions`` (a WHERE clause) selects."""
    day = func.date_trunc("day", RoutingDecisionRow.created_at)
    key = (
        day,
        RoutingDecisionRow.task_id,
        RoutingDecisionRow.caller_label,
        RoutingDecisionRow.chosen_expert_id,
    )
    counted = (
        select(
            *key,
            func.count(),
            func.min(RoutingDecisionRow.library_version),
            func.max(RoutingDecisionRow.library_version),
        )
        .where(decisions)
        .group_by(*key)
    )
    return insert(RoutingDailyChoiceRow).from_select(
        [*_DAILY_CHOICES_KEY, "decisions", "first_version", "last_version"], counted
    )


def _recount_daily_choices_of_day(session: Session, moment: dt.datetime) -> None:
    day = func.date_trunc("day", literal(moment))
    session.execute(delete(RoutingDailyChoiceRow).where(RoutingDailyChoiceRow.day == day))
    session.execute(
        _daily_choices_of(
            (RoutingDecisionRow.created_at >= day)
            & (RoutingDecisionRow.created_at < day + text("interval '1 day'"))
        )
    )


def _tallies(votes: Sequence[RoutingVote], names: dict[int, str]) -> list[ExpertTally]:
    """One unweighted tally per expert that got a vote, by expert id (the router ranks them)."""
    scores: dict[int, list[float]] = {}
    for v in votes:
        scores.setdefault(v.expert_id, []).append(v.score)
    return [ExpertTally(e, names[e], len(s), float(sum(s))) for e, s in sorted(scores.items())]


def _margin(chosen_expert_id: int | None, votes: Sequence[RoutingVote]) -> dict[str, int | None]:
    """The winner's and the runner-up's votes, kept with the decision for the audit views. The runner-up has the
    most summed vote weight among the others (the most votes, for unweighted routers), then the lower id."""
    counts: dict[int, int] = {}
    weights: dict[int, float] = {}
    for vote in votes:
        counts[vote.expert_id] = counts.get(vote.expert_id, 0) + 1
        weights[vote.expert_id] = weights.get(vote.expert_id, 0.0) + vote.weight
    others = sorted((-weights[e], e) for e in counts if e != chosen_expert_id)
    runner_up = others[0][1] if others else None
    return {
        "winner_votes": counts.get(chosen_expert_id, 0) if chosen_expert_id is not None else None,
        "runner_up_votes": counts[runner_up] if runner_up is not None else None,
        "runner_up_expert_id": runner_up,
    }


class SqlLibraryStore(LibraryStore):
    """:class:`LibraryStore` on PostgreSQL with pgvector (one partial HNSW index per embedder)."""

    def __init__(self, sessions: ManagedSessions, options: LibrarySearchOptions | None = None):
        self.sessions = sessions
        self.options = options or LibrarySearchOptions()
        # Per embedder: the type its HNSW index compares in (read from the index itself, which any process
        # may have built with other settings); and the server's pgvector version. Both cached per store.
        self._index_types: dict[int, str] = {}
        self._pgvector: tuple[int, ...] | None = None

    def index_type(self, session: Session, embedder_id: int) -> str:
        """The type the embedder's HNSW index compares in; queries must cast to it to use the index."""
        if embedder_id not in self._index_types:
            definition = session.scalar(
                text("SELECT indexdef FROM pg_indexes WHERE indexname = :name"),
                {"name": hnsw_index_name(embedder_id)},
            )
            if definition is None:  # no index (inside index_built_after): the table's own type
                return self.options.index_type
            operator_classes = {"halfvec_ip_ops": "halfvec", "bit_hamming_ops": "bit"}
            self._index_types[embedder_id] = next(
                (t for ops, t in operator_classes.items() if ops in definition), "vector"
            )
        return self._index_types[embedder_id]

    def _iterative_scans(self, session: Session) -> bool:
        if self._pgvector is None:
            self._pgvector = pgvector_version(session)
        return self._pgvector >= ITERATIVE_SCAN_VERSION

    def library_version(self) -> int:
        with self.sessions() as session:
            return current_library_version(session)

    def history(self) -> list[LibraryChange]:
        entry_counts = (
            select(func.count())
            .where(LibraryEntryRow.expert_id == LibraryChangeRow.expert_id)
            .correlate(LibraryChangeRow)
            .scalar_subquery()
        )
        query = (
            select(LibraryChangeRow, ExpertRow.name, ExpertRow.kind, entry_counts)
            .join(ExpertRow, ExpertRow.id == LibraryChangeRow.expert_id)
            .order_by(LibraryChangeRow.version)
        )
        with self.sessions() as session:
            return [
                LibraryChange(c.version, c.change, c.expert_id, name, kind, count, c.created_at)
                for c, name, kind, count in session.execute(query)
            ]

    def add_entries(self, expert_id: int, embedder_id: int, entries: Iterable[LibraryEntry]) -> int:
        with self.sessions() as session:
            records.by_key(session, ExpertRow, expert_id, "expert")
            return copy_entries(session, expert_id, embedder_id, entries)

    @contextmanager
    def index_built_after(self, embedder_id: int) -> Iterator[None]:
        # Building an HNSW index once over all rows is several times faster than growing it row by row.
        with self.sessions() as session:
            dimension = records.by_key(session, EmbedderRow, embedder_id, "embedder").dimension
        self.drop_index(embedder_id)
        yield
        self.build_index(embedder_id, dimension)

    def drop_index(self, embedder_id: int) -> None:
        with self.sessions() as session:
            session.execute(text(f"DROP INDEX IF EXISTS {hnsw_index_name(embedder_id)}"))
        self._index_types.pop(embedder_id, None)

    def storage(self, embedder_id: int) -> LibraryStorage:
        with self.sessions() as session:
            index = hnsw_index_name(embedder_id)
            row = session.execute(
                text(
                    "SELECT (SELECT count(*) FROM library_entries WHERE embedder_id = :e) AS entries, "
                    "pg_total_relation_size('library_entries') - pg_indexes_size('library_entries') AS table_bytes, "
                    "coalesce(pg_relation_size(to_regclass(:index)), 0) AS index_bytes, "
                    "to_regclass(:index) IS NOT NULL AS indexed"
                ),
                {"e": embedder_id, "index": index},
            ).one()
            index_type = self.index_type(session, embedder_id) if row.indexed else None
        return LibraryStorage(int(row.entries), int(row.table_bytes), int(row.index_bytes), index_type)

    def build_index(self, embedder_id: int, dimension: int) -> None:
        """(Re)build the embedder's HNSW index with the configured type, memory and parallel workers."""
        with self.sessions() as session:
            # The graph must fit in maintenance_work_mem, or pgvector finishes the build on disk, far slower.
            session.execute(
                text("SELECT set_config('maintenance_work_mem', :m, true)"), {"m": self.options.build_memory}
            )
            session.execute(
                text("SELECT set_config('max_parallel_maintenance_workers', :w, true)"),
                {"w": str(int(self.options.build_workers))},
            )
            session.execute(text(f"DROP INDEX IF EXISTS {hnsw_index_name(embedder_id)}"))
            session.execute(text(create_hnsw_index_sql(embedder_id, dimension, self.options)))
            session.execute(text("ANALYZE library_entries"))
        self._index_types[embedder_id] = self.options.index_type

    def texts(self, expert_id: int, embedder_id: int) -> list[tuple[int, str]]:
        query = (
            select(LibraryEntryRow.sample_index, LibraryEntryRow.text)
            .where(LibraryEntryRow.expert_id == expert_id, LibraryEntryRow.embedder_id == embedder_id)
            .order_by(LibraryEntryRow.sample_index)
        )
        with self.sessions() as session:
            return [(r.sample_index, r.text) for r in session.execute(query)]

    def entries(self, expert_id: int, embedder_id: int) -> list[LibraryEntry]:
        query = (
            select(LibraryEntryRow.sample_index, LibraryEntryRow.text, LibraryEntryRow.embedding)
            .where(LibraryEntryRow.expert_id == expert_id, LibraryEntryRow.embedder_id == embedder_id)
            .order_by(LibraryEntryRow.sample_index)
        )
        with self.sessions() as session:
            return [LibraryEntry(r.sample_index, r.text, r.embedding) for r in session.execute(query)]

    def nearest_entries(
        self, embedder_id: int, query: Sequence[float], *, k: int = 1, library_version: int | None = None
    ) -> list[LibraryHit]:
        with self.sessions() as session:
            dimension = records.by_key(session, EmbedderRow, embedder_id, "embedder").dimension
            version = library_version if library_version is not None else current_library_version(session)
            vector = "[" + ",".join(repr(float(x)) for x in query) + "]"
            index_type = self.index_type(session, embedder_id)
            if self.options.iterative_scan != "off" and self._iterative_scans(session):
                # The visibility filter is in the index scan's query: keep scanning until k visible entries.
                session.execute(text(f"SET LOCAL hnsw.iterative_scan = {self.options.iterative_scan}"))
            candidates = max(k, self.options.rerank) if index_type == "bit" else k
            if index_type == "bit":
                session.execute(text(f"SET LOCAL hnsw.ef_search = {max(candidates, 40)}"))
            d = int(dimension)
            # <#> is the NEGATIVE inner product, so ascending order is most similar first and score = -distance.
            # The index's candidates (its own order) are re-ranked by the exact inner product.
            sql = text(
                f"""
                SELECT * FROM (
                    SELECT le.id, le.expert_id, le.sample_index, le.text,
                           -(le.embedding::vector({d}) <#> CAST(:query AS vector({d}))) AS score
                    FROM library_entries le JOIN experts e ON e.id = le.expert_id
                    WHERE le.embedder_id = {int(embedder_id)} AND {visible_experts_clause()}
                    ORDER BY {index_key(index_type, d, "le.embedding")} {index_operator(index_type)}
                             {index_key(index_type, d, "CAST(:query AS vector)")}
                    LIMIT :candidates
                ) candidate
                ORDER BY score DESC, id
                LIMIT :k
                """
            )
            rows = session.execute(
                sql,
                {
                    "query": vector,
                    "embedder_id": embedder_id,
                    "library_version": version,
                    "k": k,
                    "candidates": candidates,
                },
            ).all()
        return [LibraryHit(r.id, r.expert_id, r.sample_index, r.text, float(r.score)) for r in rows]

    def vote(
        self,
        embedder_id: int,
        queries: np.ndarray,
        *,
        library_version: int,
        top_k: int = 1,
        ef_search: int = 100,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        prefer_alias: str | None = None,
    ) -> VoteResult:
        with self.sessions() as session:
            dimension = records.by_key(session, EmbedderRow, embedder_id, "embedder").dimension
            index_type = self.index_type(session, embedder_id)
            iterative = self.options.iterative_scan != "off" and self._iterative_scans(session)
        # With a bit index, ef_search is still the graph's candidate list; the nearest `rerank` of its
        # candidates by Hamming distance are re-ranked exactly (an index scan yields at most ef_search rows).
        rerank = max(self.options.rerank, top_k) if index_type == "bit" else None
        candidates = max(ef_search, top_k, rerank or 0)
        params = {
            "library_version": library_version,
            "candidates": rerank or candidates,
            "top_k": top_k,
            "kinds": list(kinds) if kinds else None,
            "backbone_id": backbone_id,
            "prefer_alias": prefer_alias,
        }

        def statement(filter_in_scan: bool, keys: str = index_type) -> str:
            return vote_sql(
                dimension,
                embedder_id,
                bool(kinds),
                backbone_id is not None,
                filter_in_scan=filter_in_scan,
                index_type=keys,
                prefer_alias=prefer_alias is not None,
            )

        # 1. The fast path: ef_search candidates per query from the index, filtered afterwards.
        hits = self._hits(
            statement(False), queries, range(len(queries)), params, [f"hnsw.ef_search = {candidates}"]
        )
        # 2. Queries whose candidates were crowded out by hidden experts: the filter goes into the index scan,
        #    which (pgvector >= 0.8) walks on past ef_search until top_k visible entries or max_scan_tuples.
        short = [i for i in range(len(queries)) if len(hits.get(i, ())) < top_k]
        widened = short if iterative else []
        if widened:
            hits.update(
                self._hits(
                    statement(True),
                    queries,
                    widened,
                    params,
                    [
                        f"hnsw.ef_search = {candidates}",
                        f"hnsw.iterative_scan = {self.options.iterative_scan}",
                        f"hnsw.max_scan_tuples = {int(self.options.max_scan_tuples)}",
                    ],
                )
            )
            short = [i for i in widened if len(hits.get(i, ())) < top_k]
        # 3. Still short (the scan hit its tuple limit, or pgvector < 0.8): an exact scan of the visible entries
        #    by their float32 inner products, so a query never loses its vote while any visible entry exists.
        exact = list(short)
        if exact:
            hits.update(
                self._hits(statement(True, "vector"), queries, exact, params, ["enable_indexscan = off"])
            )

        votes = [
            RoutingVote(query_index, rank, entry_id, expert_id, score)
            for query_index in sorted(hits)
            for rank, (entry_id, expert_id, score) in enumerate(hits[query_index])
        ]
        with self.sessions() as session:
            names = dict(
                session.execute(
                    select(ExpertRow.id, ExpertRow.name).where(ExpertRow.id.in_({v.expert_id for v in votes}))
                ).all()
            )
        return VoteResult(
            votes,
            _tallies(votes, names),
            scanned_past_ef_search=widened,
            exact_search=exact,
            index_type=index_type,
            rerank=rerank,
        )

    def centroid_vote(
        self,
        embedder_id: int,
        queries: np.ndarray,
        *,
        library_version: int,
        top_k: int = 1,
        kinds: Sequence[str] | None = None,
        backbone_id: int | None = None,
        prefer_alias: str | None = None,
    ) -> VoteResult:
        filters = routable_filters(bool(kinds), backbone_id is not None, prefer_alias is not None)
        with self.sessions() as session:
            d = int(records.by_key(session, EmbedderRow, embedder_id, "embedder").dimension)
            # One centroid per expert: an exact scan of a few thousand rows at most, no index needed.
            rows = session.execute(
                text(
                    f"""
                    WITH queries AS (
                        SELECT (ordinality - 1)::int AS query_index, query
                        FROM unnest(CAST(:queries AS vector({d})[])) WITH ORDINALITY AS q(query, ordinality)
                    )
                    SELECT queries.query_index, nearest.expert_id, nearest.name, -nearest.distance AS score
                    FROM queries CROSS JOIN LATERAL (
                        SELECT c.expert_id, e.name, c.embedding::vector({d}) <#> queries.query AS distance
                        FROM expert_centroids c JOIN experts e ON e.id = c.expert_id
                        WHERE c.embedder_id = {int(embedder_id)} AND {" AND ".join(filters)}
                        ORDER BY distance, c.expert_id
                        LIMIT :top_k
                    ) nearest
                    ORDER BY queries.query_index, score DESC, nearest.expert_id
                    """
                ),
                {
                    "queries": vector_array_literal(queries),
                    "library_version": library_version,
                    "top_k": top_k,
                    "kinds": list(kinds) if kinds else None,
                    "backbone_id": backbone_id,
                    "prefer_alias": prefer_alias,
                },
            ).all()
        votes: list[RoutingVote] = []
        names: dict[int, str] = {}
        rank = 0
        for i, r in enumerate(rows):
            rank = rank + 1 if i and rows[i - 1].query_index == r.query_index else 0
            votes.append(RoutingVote(r.query_index, rank, None, r.expert_id, float(r.score)))
            names[r.expert_id] = r.name
        return VoteResult(votes, _tallies(votes, names))

    def _hits(
        self,
        sql: str,
        queries: np.ndarray,
        indexes: Sequence[int],
        params: dict[str, Any],
        settings: Sequence[str],
    ) -> dict[int, list[tuple[int, int, float]]]:
        """Run a vote statement for the queries at ``indexes``: per query index, its hits best first
        (``entry_id, expert_id, score``). Split over ``parallel_connections`` pooled connections when set."""
        indexes = list(indexes)
        if not indexes:
            return {}
        chunks = [
            chunk
            for chunk in np.array_split(
                np.asarray(indexes), min(self.options.parallel_connections, len(indexes))
            )
            if len(chunk)
        ]

        def run(chunk: np.ndarray) -> dict[int, list[tuple[int, int, float]]]:
            with self.sessions() as session:
                for setting in settings:
                    # SET LOCAL: holds for this transaction only, not the pooled connection.
                    session.execute(text(f"SET LOCAL {setting}"))
                rows = session.execute(
                    text(sql), {**params, "queries": vector_array_literal(queries[chunk])}
                ).all()
            found: dict[int, list[tuple[int, int, float]]] = {}
            for r in rows:
                found.setdefault(int(chunk[r.query_index]), []).append(
                    (r.entry_id, r.expert_id, float(r.score))
                )
            # Best first; equal scores by entry id, so a decision is deterministic.
            return {i: sorted(h, key=lambda x: (-x[2], x[0])) for i, h in found.items()}

        if len(chunks) == 1:
            return run(chunks[0])
        merged: dict[int, list[tuple[int, int, float]]] = {}
        with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
            for found in pool.map(run, chunks):
                merged.update(found)
        return merged

    def record_decision(self, decision: RoutingDecisionRecord, votes: Sequence[RoutingVote]) -> int:
        with self.sessions() as session:
            decision_id = session.scalar(
                insert(RoutingDecisionRow)
                .values(**_decision_row(decision, votes))
                .returning(RoutingDecisionRow.id)
            )
            _count_daily_choices(session, [decision])
            if votes:
                session.execute(insert(RoutingVoteRow), _vote_rows(decision_id, votes))
            return decision_id

    def reserve_decision_ids(self, count: int) -> list[int]:
        if count < 1:
            raise UserError(f"reserve at least one decision id, not {count}")
        with self.sessions() as session:
            return list(
                session.scalars(
                    select(func.nextval(_DECISION_ID_SEQUENCE)).select_from(func.generate_series(1, count))
                )
            )

    def record_decisions(self, decisions: Sequence[PendingDecision]) -> None:
        if not decisions:
            return
        decision_rows = [{"id": d.decision_id, **_decision_row(d.record, d.votes)} for d in decisions]
        vote_rows = [row for d in decisions for row in _vote_rows(d.decision_id, d.votes)]
        with self.sessions() as session:
            session.execute(insert(RoutingDecisionRow), decision_rows)
            _count_daily_choices(session, [d.record for d in decisions])
            if vote_rows:
                session.execute(insert(RoutingVoteRow), vote_rows)

    def replay_decisions(self, decisions: Sequence[PendingDecision], *, dry_run: bool = False) -> int:
        unique = list({d.decision_id: d for d in reversed(decisions)}.values())[::-1]
        if not unique:
            return 0
        with self.sessions() as session:
            present = set(
                session.scalars(
                    select(RoutingDecisionRow.id).where(
                        RoutingDecisionRow.id.in_([d.decision_id for d in unique])
                    )
                )
            )
            new = [d for d in unique if d.decision_id not in present]
            if dry_run or not new:
                return len(new)
            now = dt.datetime.now(dt.UTC)
            rows = [
                {"id": d.decision_id, "created_at": d.made_at or now, **_decision_row(d.record, d.votes)}
                for d in new
            ]
            # A replay racing another (a server starting while an operator replays) skips what that one wrote.
            written = set(
                session.scalars(
                    pg_insert(RoutingDecisionRow)
                    .values(rows)
                    .on_conflict_do_nothing(index_elements=["id"])
                    .returning(RoutingDecisionRow.id)
                )
            )
            vote_rows = [
                row for d in new if d.decision_id in written for row in _vote_rows(d.decision_id, d.votes)
            ]
            if vote_rows:
                session.execute(insert(RoutingVoteRow), vote_rows)
            # The kept daily counts of every day the replayed decisions were made on, recounted from the decisions.
            days = session.scalars(
                select(func.min(RoutingDecisionRow.created_at))
                .where(RoutingDecisionRow.id.in_(list(written)))
                .group_by(func.date_trunc("day", RoutingDecisionRow.created_at))
            ).all()
            for day in days:
                _recount_daily_choices_of_day(session, day)
            return len(written)

    def prune_decisions(self, before: dt.datetime, *, dry_run: bool = True) -> tuple[int, int]:
        with self.sessions() as session:
            decisions = session.scalar(select(func.count()).where(RoutingDecisionRow.created_at < before))
            votes = session.scalar(
                select(func.count())
                .select_from(RoutingVoteRow)
                .join(RoutingDecisionRow, RoutingDecisionRow.id == RoutingVoteRow.decision_id)
                .where(RoutingDecisionRow.created_at < before)
            )
            if not dry_run:
                # Votes go with their decision (ON DELETE CASCADE); the daily counts of the days before go too,
                # and the cut-off's own day (partly pruned) is recounted.
                session.execute(delete(RoutingDecisionRow).where(RoutingDecisionRow.created_at < before))
                session.execute(
                    delete(RoutingDailyChoiceRow).where(
                        RoutingDailyChoiceRow.day < func.date_trunc("day", literal(before))
                    )
                )
                _recount_daily_choices_of_day(session, before)
        return int(decisions or 0), int(votes or 0)

    def recount_audit_summary(self) -> None:
        with self.sessions() as session:
            session.execute(delete(RoutingDailyChoiceRow))
            session.execute(_daily_choices_of(literal(True)))

    def annotate_decision(self, decision_id: int, details: dict[str, Any]) -> None:
        with self.sessions() as session:
            updated = session.execute(
                update(RoutingDecisionRow)
                .where(RoutingDecisionRow.id == decision_id)
                .values(details=RoutingDecisionRow.details.op("||")(literal(details, type_=JSONB)))
            )
            if updated.rowcount != 1:
                raise NotFoundError(f"no routing decision {decision_id}")
