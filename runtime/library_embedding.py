"""The Expert Library: S embedded training samples per expert, the data RoE searches.

The paper keeps S=100 random training instances per expert, each embedded from the text
``Answer Choices: {choices joined by " | "}, Instance: {prompted input}``. Entries record their embedder, so the
same library can be embedded by several encoders side by side (``elmreg library reembed``) and compared.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from elmreg.models.embedder import Embedder
from elmreg.registry.entities import Embedder as EmbedderRecord
from elmreg.registry.entities import LibraryEntry
from elmreg.registry.store.catalogue import CatalogueStore
from elmreg.registry.store.library import LibraryStore

SAMPLES_PER_EXPERT = 100


def sample_indices(population: int, samples: int = SAMPLES_PER_EXPERT, seed: int = 0) -> list[int]:
    """Which training instances go into the library: a seeded sample without replacement, in order."""
    if population <= samples:
        return list(range(population))
    return sorted(random.Random(seed).sample(range(population), samples))


def register_embedder(catalogue: CatalogueStore, embedder: Embedder) -> EmbedderRecord:
    """The catalogue record of a loaded embedder (registered, with its HNSW index, on first use)."""
    return catalogue.get_or_create_embedder(embedder.name, embedder.dimension)


def embed_entries(
    embedder: Embedder, texts: Sequence[str], *, progress: Callable[[int], None] | None = None
) -> list[LibraryEntry]:
    """Library entries for ``texts`` (sample index = position)."""
    vectors = embedder.embed(list(texts), progress=progress)
    return [
        LibraryEntry(i, text, vector) for i, (text, vector) in enumerate(zip(texts, vectors, strict=True))
    ]


@dataclass(frozen=True)
class ReembedReport:
    embedder: str
    experts: int
    entries: int
    skipped: int


def reembed_library(
    catalogue: CatalogueStore,
    library: LibraryStore,
    embedder: Embedder,
    *,
    source_embedder: str,
    progress: Callable[[int], None] | None = None,
) -> ReembedReport:
    """Give every ready or retired expert entries for ``embedder``, from the texts embedded by ``source_embedder``.

    Experts that already have entries for ``embedder`` are skipped, so an interrupted run can simply be repeated.
    """
    target = register_embedder(catalogue, embedder)
    source = catalogue.get_embedder(source_embedder)
    experts = entries = skipped = 0
    for expert in catalogue.list_experts():
        if expert.status not in ("ready", "retired"):
            continue
        if library.texts(expert.id, target.id):
            skipped += 1
            continue
        texts = library.texts(expert.id, source.id)
        vectors = embedder.embed([text for _, text in texts], progress=progress)
        entries += library.add_entries(
            expert.id, target.id, [LibraryEntry(i, t, v) for (i, t), v in zip(texts, vectors, strict=True)]
        )
        experts += 1
    return ReembedReport(embedder=embedder.name, experts=experts, entries=entries, skipped=skipped)
