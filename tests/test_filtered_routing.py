"""Filtered routing never loses a vote: hidden experts crowding the queries' neighbourhood (retired, published
after a pinned version, another kind, another backbone) change nothing but how far the index scan goes.

Each case builds a library on its own database where every query's ef_search nearest entries belong to hidden
experts, and checks that the decision equals exact search over the visible entries, with every query voting.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import lab_environ
from sqlalchemy import text

from elmreg.cli.main import cli
from elmreg.inference.router import Router, rank_tallies
from elmreg.registry.entities import LibraryEntry, LibrarySearchOptions, StoredArtifact
from elmreg.registry.store.models import hnsw_index_name
from elmreg.registry.store.sql.library import INDEX_TYPES, SqlLibraryStore

DIM, Q, EF_SEARCH = 384, 16, 40


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Library:
    """Experts with clustered entries; ``crowd`` puts an expert's entries right around the queries."""

    def __init__(self, context, rng):
        self.context, self.rng = context, rng
        self.embedder = context.catalogue.get_or_create_embedder("crowd-embedder", DIM)
        self.backbones = {
            name: context.catalogue.get_or_create_backbone(name, "causal") for name in ("bb-a", "bb-b")
        }
        self.target = _unit(rng.normal(size=DIM))
        self.entries: list[tuple[int, int, np.ndarray]] = []  # (expert id, entry index, vector)

    def queries(self) -> np.ndarray:
        return _unit(self.target + 0.3 * self.rng.normal(size=(Q, DIM)) / np.sqrt(DIM))

    def publish(self, name, *, crowd=False, count=100, kind="lora", backbone="bb-a"):
        centre = self.target if crowd else _unit(self.target + 1.2 * _unit(self.rng.normal(size=DIM)))
        spread = 0.2 if crowd else 1.0
        vectors = _unit(centre + spread * self.rng.normal(size=(count, DIM)) / np.sqrt(DIM))
        catalogue = self.context.catalogue
        record = catalogue.create_expert(name=name, backbone_id=self.backbones[backbone].id, kind=kind)
        expert = catalogue.publish_expert(
            record.id,
            artifact=StoredArtifact(f"s3://elmreg/test/{name}", "a" * 64, 1),
            embedder_id=self.embedder.id,
            entries=[LibraryEntry(i, f"{name} {i}", v) for i, v in enumerate(vectors)],
        )
        return expert

    def exact(self, queries, visible_ids) -> tuple[list[int], int]:
        """Exact nearest visible expert per query, and RoE's choice over those votes."""
        entries = self.context.library
        vectors, owners = [], []
        for expert_id in visible_ids:
            for entry in entries.entries(expert_id, self.embedder.id):
                vectors.append(np.asarray(entry.embedding, dtype=np.float32))
                owners.append(expert_id)
        similarities = queries @ np.stack(vectors).T
        best = [owners[i] for i in np.argmax(similarities, axis=1)]
        scores = similarities.max(axis=1)
        tallies: dict[int, list[float]] = {}
        for expert_id, score in zip(best, scores, strict=True):
            tallies.setdefault(expert_id, []).append(float(score))
        from elmreg.registry.entities import ExpertTally

        ranked = rank_tallies([ExpertTally(e, "", len(s), sum(s)) for e, s in tallies.items()])
        return best, ranked[0].expert_id


def _assert_nearest(library, found: list[int], best: list[int]) -> None:
    """Per query, the expert of the nearest visible entry: exactly for the float indexes (the graph is exact at
    a few hundred visible entries); for ``bit`` most of them, because the exact nearest entry of a query among
    these far, diffuse experts is often past the 100 Hamming-nearest that are re-ranked (a re-rank as deep as
    the visible entries is exact: ``test_bit_rerank_as_deep_as_the_library_is_exact``)."""
    if library.index_type == "bit":
        assert sum(f == b for f, b in zip(found, best, strict=True)) >= Q - 4, (found, best)
    else:
        assert found == best


@pytest.fixture(params=INDEX_TYPES)
def crowded(request, fresh_registry):
    """The library on a fresh database, its embedder's HNSW index of each type in turn."""
    library = Library(fresh_registry, np.random.default_rng(7))
    store = SqlLibraryStore(fresh_registry.sessions, LibrarySearchOptions(index_type=request.param))
    store.build_index(library.embedder.id, DIM)
    assert store.storage(library.embedder.id).index_type == request.param
    library.index_type = request.param
    return library


def _check(library, result, queries, visible_ids):
    best, choice = library.exact(queries, visible_ids)
    assert sorted({v.query_index for v in result.votes}) == list(range(Q)), "a query lost its vote"
    _assert_nearest(library, [v.expert_id for v in result.votes], best)
    assert rank_tallies(result.tallies)[0].expert_id == choice
    # The crowding hid every candidate of the first ef_search: the scan went further for those queries.
    assert result.scanned_past_ef_search


def test_retired_expert_nearest_to_every_query(crowded):
    visible = [crowded.publish(f"far-{i}").id for i in range(3)]
    retired = crowded.publish("retired-crowd", crowd=True, count=150)
    crowded.context.catalogue.retire_expert(retired.id)
    queries = crowded.queries()
    version = crowded.context.library.library_version()
    result = crowded.context.library.vote(
        crowded.embedder.id, queries, library_version=version, ef_search=EF_SEARCH
    )
    _check(crowded, result, queries, visible)


def test_pinned_version_with_newer_experts_crowding(crowded):
    visible = [crowded.publish(f"old-{i}").id for i in range(3)]
    pinned = crowded.context.library.library_version()
    for i in range(2):
        crowded.publish(f"new-crowd-{i}", crowd=True, count=120)
    queries = crowded.queries()
    result = crowded.context.library.vote(
        crowded.embedder.id, queries, library_version=pinned, ef_search=EF_SEARCH
    )
    _check(crowded, result, queries, visible)


def test_kind_filter_where_the_other_kind_dominates(crowded):
    visible = [crowded.publish(f"ffn-{i}", kind="ffn_adapter").id for i in range(3)]
    for i in range(2):
        crowded.publish(f"lora-crowd-{i}", crowd=True, count=120, kind="lora")
    queries = crowded.queries()
    result = crowded.context.library.vote(
        crowded.embedder.id,
        queries,
        library_version=crowded.context.library.library_version(),
        ef_search=EF_SEARCH,
        kinds=["ffn_adapter"],
    )
    _check(crowded, result, queries, visible)


def test_backbone_filter(crowded):
    visible = [crowded.publish(f"on-b-{i}", backbone="bb-b").id for i in range(3)]
    crowded.publish("on-a-crowd", crowd=True, count=150, backbone="bb-a")
    queries = crowded.queries()
    result = crowded.context.library.vote(
        crowded.embedder.id,
        queries,
        library_version=crowded.context.library.library_version(),
        ef_search=EF_SEARCH,
        backbone_id=crowded.backbones["bb-b"].id,
    )
    _check(crowded, result, queries, visible)


def test_exact_scan_answers_crowded_queries_without_iterative_scans(crowded):
    """As on a server with pgvector < 0.8 (or iterative scans turned off): crowded-out queries get an exact scan."""
    visible = [crowded.publish(f"far-{i}").id for i in range(2)]
    retired = crowded.publish("retired-crowd", crowd=True, count=150)
    crowded.context.catalogue.retire_expert(retired.id)
    store = SqlLibraryStore(crowded.context.sessions, LibrarySearchOptions(iterative_scan="off"))
    queries = crowded.queries()
    result = store.vote(
        crowded.embedder.id,
        queries,
        library_version=crowded.context.library.library_version(),
        ef_search=EF_SEARCH,
    )
    best, choice = crowded.exact(queries, visible)
    # The exact scan compares float32 inner products whatever the index type: exact for every query.
    assert [v.expert_id for v in result.votes] == best
    assert rank_tallies(result.tallies)[0].expert_id == choice
    assert result.exact_search == list(range(Q)) and not result.scanned_past_ef_search


def test_split_over_connections_gives_the_same_votes(crowded):
    for i in range(4):
        crowded.publish(f"e-{i}")
    queries = crowded.queries()
    version = crowded.context.library.library_version()
    one = crowded.context.library.vote(crowded.embedder.id, queries, library_version=version)
    split = SqlLibraryStore(crowded.context.sessions, LibrarySearchOptions(parallel_connections=3)).vote(
        crowded.embedder.id, queries, library_version=version
    )
    assert split.votes == one.votes and split.tallies == one.tallies


def test_every_index_type_routes_like_exact_search(crowded):
    visible = [crowded.publish(f"e-{i}").id for i in range(4)]
    queries = crowded.queries()
    version = crowded.context.library.library_version()
    result = SqlLibraryStore(crowded.context.sessions).vote(
        crowded.embedder.id, queries, library_version=version
    )
    best, choice = crowded.exact(queries, visible)
    _assert_nearest(crowded, [v.expert_id for v in result.votes], best)
    assert rank_tallies(result.tallies)[0].expert_id == choice
    assert result.index_type == crowded.index_type and not result.exact_search
    assert result.rerank == (100 if crowded.index_type == "bit" else None)
    # Scores are float32 inner products whatever the index compares (float16 copies, sign bits): each one is
    # the exact similarity of some visible entry, the best one's wherever the expert is the exact one.
    vectors = np.stack(
        [e.embedding for i in visible for e in crowded.context.library.entries(i, crowded.embedder.id)]
    )
    similarities = queries @ vectors.T
    for vote in result.votes:
        assert np.abs(similarities[vote.query_index] - vote.score).min() <= 1e-6
        if crowded.index_type != "bit":
            assert vote.score == pytest.approx(similarities[vote.query_index].max(), abs=1e-6)


def test_bit_rerank_as_deep_as_the_library_is_exact(fresh_registry):
    """The bit index's candidates are re-ranked by float32 inner products under the same filters: with a re-rank
    as deep as the library (450 entries), each query gets its exact nearest visible entry."""
    library = Library(fresh_registry, np.random.default_rng(7))
    store = SqlLibraryStore(fresh_registry.sessions, LibrarySearchOptions(index_type="bit", rerank=450))
    store.build_index(library.embedder.id, DIM)
    visible = [library.publish(f"far-{i}").id for i in range(3)]
    retired = library.publish("retired-crowd", crowd=True, count=150)
    fresh_registry.catalogue.retire_expert(retired.id)
    queries = library.queries()
    result = store.vote(
        library.embedder.id, queries, library_version=store.library_version(), ef_search=EF_SEARCH
    )
    best, choice = library.exact(queries, visible)
    assert [v.expert_id for v in result.votes] == best
    assert rank_tallies(result.tallies)[0].expert_id == choice
    assert result.rerank == 450 and result.index_type == "bit"


def test_nearest_entries_of_every_index_type(crowded):
    visible = [crowded.publish(f"e-{i}").id for i in range(2)]
    retired = crowded.publish("retired-crowd", crowd=True, count=150)
    crowded.context.catalogue.retire_expert(retired.id)
    query = crowded.queries()[0]
    hits = crowded.context.library.nearest_entries(crowded.embedder.id, query, k=3)
    vectors = [
        (np.asarray(e.embedding, dtype=np.float32) @ query, expert_id)
        for expert_id in visible
        for e in crowded.context.library.entries(expert_id, crowded.embedder.id)
    ]
    expected = sorted(vectors, key=lambda x: -x[0])[:3]
    assert [h.expert_id for h in hits] == [e for _, e in expected]
    assert [h.score for h in hits] == pytest.approx([float(s) for s, _ in expected], abs=1e-6)


class _FixedEmbedder:
    """Returns prepared vectors: the router's bookkeeping is under test here, not the embedding."""

    name, dimension = "crowd-embedder", DIM

    def __init__(self, vectors):
        self.vectors = vectors

    def embed(self, texts):
        return self.vectors[: len(texts)]


def test_decision_records_queries_that_scanned_past_ef_search(crowded):
    crowded.publish("far-0")
    retired = crowded.publish("retired-crowd", crowd=True, count=150)
    crowded.context.catalogue.retire_expert(retired.id)
    router = Router(crowded.context, _FixedEmbedder(crowded.queries()), ef_search=EF_SEARCH)
    decision = router.route([f"q{i}" for i in range(Q)], q=None)
    assert decision.chosen_expert_name == "far-0" and len(decision.votes) == Q
    details = crowded.context.audit.audit_rows(
        "audit_decisions", order_by=None, filters={"decision_id": decision.decision_id}, limit=1
    )
    assert details  # recorded
    with crowded.context.engine.connect() as c:
        from sqlalchemy import text

        recorded = c.execute(
            text("SELECT details FROM routing_decisions WHERE id = :d"), {"d": decision.decision_id}
        ).scalar_one()
    assert recorded["scanned_past_ef_search"] == list(range(Q))
    assert recorded["ef_search"] == EF_SEARCH
    assert recorded["index_type"] == crowded.index_type
    assert recorded.get("rerank") == (100 if crowded.index_type == "bit" else None)


def test_hnsw_graph_settings_apply_when_the_index_is_rebuilt(lab):
    """m and ef_construction are settings; 'elmreg library reindex' rebuilds with them, nothing else changes."""
    embedder = lab.context.catalogue.get_or_create_embedder(lab.settings.embedder, DIM)
    index = hnsw_index_name(embedder.id)

    def definition() -> str:
        with lab.context.engine.begin() as c:
            return c.scalar(text("SELECT indexdef FROM pg_indexes WHERE indexname = :i"), {"i": index})

    assert "m='16'" in definition() and "ef_construction='64'" in definition()  # pgvector's defaults
    env = {
        **lab_environ(lab),
        "ELMREG_LIBRARY_HNSW_M": "8",
        "ELMREG_LIBRARY_HNSW_EF_CONSTRUCTION": "40",
        "ELMREG_LIBRARY_INDEX_TYPE": "halfvec",
    }
    result = CliRunner().invoke(cli, ["library", "reindex"], env=env)
    assert result.exit_code == 0, result.output
    assert "rebuilt the index of 0 entries" in result.output and "halfvec" in result.output
    assert "m='8'" in definition() and "ef_construction='40'" in definition() and "halfvec" in definition()
    switched = CliRunner().invoke(
        cli, ["library", "reindex"], env={**env, "ELMREG_LIBRARY_INDEX_TYPE": "bit"}
    )
    assert switched.exit_code == 0 and "bit" in switched.output, switched.output
    assert "binary_quantize" in definition() and "bit_hamming_ops" in definition()
    bad_type = CliRunner().invoke(
        cli, ["library", "reindex"], env={**env, "ELMREG_LIBRARY_INDEX_TYPE": "int8"}
    )
    assert bad_type.exit_code == 2 and "Traceback" not in bad_type.output
    assert "bit_hamming_ops" in definition()  # nothing rebuilt
    bad = CliRunner().invoke(cli, ["library", "reindex"], env={**env, "ELMREG_LIBRARY_HNSW_M": "1"})
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "library_hnsw_m" in bad.output.lower()
