"""The Expert Library: sampling, embedding with the bundled MiniLM, and re-embedding for another encoder."""

from __future__ import annotations

import numpy as np
import pytest

from elmreg.models.embedder import load_embedder
from elmreg.registry.entities import StoredArtifact
from elmreg.runtime.library_embedding import embed_entries, reembed_library, register_embedder, sample_indices


@pytest.fixture(scope="session")
def minilm():
    return load_embedder("sentence-transformers/all-MiniLM-L6-v2")


def test_sample_indices_are_seeded_sorted_and_capped():
    first = sample_indices(1000, 100, seed=3)
    assert first == sample_indices(1000, 100, seed=3) != sample_indices(1000, 100, seed=4)
    assert len(set(first)) == 100 and first == sorted(first) and max(first) < 1000
    assert sample_indices(7, 100) == list(range(7))


def test_minilm_vectors_are_unit_and_semantic(minilm):
    vectors = minilm.embed(
        [
            "Answer Choices: yes | no, Instance: Is the capital of France Paris?",
            "Answer Choices: yes | no, Instance: Is Berlin the capital of Germany?",
            "Answer Choices: None, Instance: Translate 'good morning' into French.",
        ]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_reembed_adds_entries_for_a_second_embedder_and_is_resumable(fresh_registry, minilm):
    backbone = fresh_registry.catalogue.get_or_create_backbone("reembed-backbone", "causal")
    source = register_embedder(fresh_registry.catalogue, minilm)
    texts = [f"Answer Choices: None, Instance: sample number {i}" for i in range(5)]
    expert = fresh_registry.catalogue.create_expert(name="reembed-me", backbone_id=backbone.id, kind="lora")
    fresh_registry.catalogue.publish_expert(
        expert.id,
        artifact=StoredArtifact("s3://b/k", "c" * 64, 1),
        embedder_id=source.id,
        entries=embed_entries(minilm, texts),
    )

    class Truncated:  # a second "embedder": MiniLM's first 128 dimensions, renormalised
        name, dimension = "minilm-128", 128

        def embed(self, batch, progress=None):
            vectors = minilm.embed(batch)[:, :128]
            return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    report = reembed_library(
        fresh_registry.catalogue, fresh_registry.library, Truncated(), source_embedder=source.name
    )
    assert (report.experts, report.entries, report.skipped) == (1, 5, 0)
    target = fresh_registry.catalogue.get_embedder("minilm-128")
    assert target.dimension == 128
    assert [t for _, t in fresh_registry.library.texts(expert.id, target.id)] == texts
    # Each embedder searches its own entries through its own index.
    query = Truncated().embed([texts[3]])[0]
    assert fresh_registry.library.nearest_entries(target.id, query, k=1)[0].sample_index == 3
    again = reembed_library(
        fresh_registry.catalogue, fresh_registry.library, Truncated(), source_embedder=source.name
    )
    assert (again.experts, again.skipped) == (0, 1)
