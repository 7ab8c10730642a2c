"""Wires settings to the running parts: endpoints, the catalogue's stores and the artifact store, each opened on
first use."""

from __future__ import annotations

from functools import cached_property

from sqlalchemy import Engine

from elmreg.models.backbones import BackboneCache
from elmreg.registry.artifacts import ArtifactCache, ArtifactRepository, open_artifact_repository
from elmreg.registry.endpoints import Endpoints
from elmreg.registry.entities import CatalogueSummary, LibrarySearchOptions
from elmreg.registry.errors import SchemaOutOfDateError
from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.store import schema
from elmreg.registry.store.audit import AuditStore
from elmreg.registry.store.catalogue import CatalogueStore
from elmreg.registry.store.evaluations import EvaluationStore
from elmreg.registry.store.jobs import JobStore
from elmreg.registry.store.keys import KeyStore
from elmreg.registry.store.library import LibraryStore
from elmreg.registry.store.session import ManagedSessions, create_catalogue_engine
from elmreg.registry.store.sql.audit import SqlAuditStore
from elmreg.registry.store.sql.catalogue import SqlCatalogueStore
from elmreg.registry.store.sql.evaluations import SqlEvaluationStore
from elmreg.registry.store.sql.jobs import SqlJobStore
from elmreg.registry.store.sql.keys import SqlKeyStore
from elmreg.registry.store.sql.library import (
    ITERATIVE_SCAN_VERSION,
    SqlLibraryStore,
    pgvector_versions,
    update_pgvector,
)
from elmreg.services import resolve_endpoints


class RegistryContext:
    """The parts one elmreg process talks to. Nothing is started or connected until it is used.

    The catalogue is reached through one store per responsibility (``catalogue``, ``library``, ``jobs``,
    ``evaluations``, ``audit``); the first one used checks that the schema is the one this elmreg expects.
    """

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or load_settings()

    @cached_property
    def endpoints(self) -> Endpoints:
        return resolve_endpoints(self.settings, start=True)

    @cached_property
    def engine(self) -> Engine:
        return create_catalogue_engine(self.endpoints.database_url)

    @cached_property
    def sessions(self) -> ManagedSessions:
        return ManagedSessions(self.engine)

    @cached_property
    def _migrated(self) -> ManagedSessions:
        """The sessions, once the schema is known to be at the head revision."""
        current = self.schema_revision()
        head = schema.head_revision()
        if current != head:
            state = "empty" if current is None else f"at revision {current}"
            raise SchemaOutOfDateError(
                f"the catalogue is {state}, elmreg needs {head}: run 'elmreg db upgrade'"
            )
        return self.sessions

    # -- the stores ----------------------------------------------------------------------------------------
    @cached_property
    def catalogue(self) -> CatalogueStore:
        return SqlCatalogueStore(self._migrated, library_options=self.library_options)

    @cached_property
    def library_options(self) -> LibrarySearchOptions:
        """How the library's index is built and searched, from the ``library_*`` / ``routing_*`` settings."""
        s = self.settings
        return LibrarySearchOptions(
            index_type=s.library_index_type,
            rerank=s.routing_rerank,
            iterative_scan=s.routing_iterative_scan,
            max_scan_tuples=s.routing_max_scan_tuples,
            parallel_connections=s.routing_parallel_connections,
            build_memory=s.library_build_memory,
            build_workers=s.library_build_workers,
            hnsw_m=s.library_hnsw_m,
            hnsw_ef_construction=s.library_hnsw_ef_construction,
        )

    @cached_property
    def library(self) -> LibraryStore:
        return SqlLibraryStore(self._migrated, self.library_options)

    @cached_property
    def jobs(self) -> JobStore:
        return SqlJobStore(self._migrated)

    @cached_property
    def evaluations(self) -> EvaluationStore:
        return SqlEvaluationStore(self._migrated)

    @cached_property
    def audit(self) -> AuditStore:
        return SqlAuditStore(self._migrated)

    @cached_property
    def keys(self) -> KeyStore:
        """API keys of the HTTP server (``elmreg serve``)."""
        return SqlKeyStore(self._migrated)

    # -- the schema (these work on an empty or out-of-date catalogue) --------------------------------------
    def summary(self) -> CatalogueSummary:
        """What ``elmreg status`` shows, whatever state the schema is in."""
        return SqlAuditStore(self.sessions).summary()

    def schema_revision(self) -> str | None:
        with self.sessions.translating():
            return schema.current_revision(self.engine)

    def upgrade_schema(self, revision: str = "head") -> None:
        with self.sessions.translating():
            schema.upgrade(self.engine, revision)
        self.__dict__.pop("_migrated", None)

    def check_pgvector(self, *, update: bool = False) -> str | None:
        """Compare the database's pgvector with what elmreg needs; with ``update``, first update the extension to
        the newest version the server has (``ALTER EXTENSION vector UPDATE``).

        Returns:
            None when pgvector is recent enough, else one line saying what to do.
        """
        with self.sessions() as session:
            installed, available = pgvector_versions(session)
            if update and installed and available and _version(installed) < _version(available):
                update_pgvector(session)
                installed = available
        if installed is None:
            return None  # not installed yet: the first migration creates it
        if _version(installed) >= ITERATIVE_SCAN_VERSION:
            return None
        needed = ".".join(map(str, ITERATIVE_SCAN_VERSION))
        if available and _version(available) >= ITERATIVE_SCAN_VERSION:
            return f"pgvector {installed} is older than {needed}, which elmreg needs for filtered routing: run 'elmreg db upgrade' (ALTER EXTENSION vector UPDATE)"
        return (
            f"pgvector {installed} is older than {needed}, which elmreg needs for filtered routing (until then crowded-out "
            f"queries fall back to exact scans): install pgvector >= {needed} on the server "
            "(e.g. the pgvector/pgvector:pg18 image), then run 'elmreg db upgrade'"
        )

    def downgrade_schema(self, revision: str) -> None:
        self.__dict__.pop("_migrated", None)
        with self.sessions.translating():
            schema.downgrade(self.engine, revision)

    # -- weights -------------------------------------------------------------------------------------------
    @cached_property
    def artifacts(self) -> ArtifactRepository:
        return open_artifact_repository(self.endpoints)

    @cached_property
    def artifact_cache(self) -> ArtifactCache:
        return ArtifactCache(self.settings.cache_path / "artifacts", self.artifacts)

    # -- loaded backbones: one copy of each per context, whoever uses it (a backbone takes seconds to load) --
    @cached_property
    def backbones(self) -> BackboneCache:
        """Backbones loaded on first use and shared by training, merge tuning and the adapter pools."""
        return BackboneCache(self.settings.cache_path, self.settings.device)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())
