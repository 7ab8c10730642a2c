"""Wires settings to the running parts: endpoints, catalogue store and artifact store, each opened on first use."""

from __future__ import annotations

from functools import cached_property

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from elmreg.registry.artifacts import ArtifactCache, ArtifactRepository, open_artifact_repository
from elmreg.registry.backbones import BackboneCache
from elmreg.registry.errors import SchemaOutOfDateError
from elmreg.registry.services import Endpoints, resolve_endpoints
from elmreg.registry.settings import Settings, load_settings
from elmreg.registry.store import schema
from elmreg.registry.store.session import create_catalogue_engine, translate_error
from elmreg.registry.store.sqlalchemy_store import SqlAlchemyStore


class RegistryContext:
    """The parts one elmreg process talks to. Nothing is started or connected until it is used."""

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or load_settings()

    @cached_property
    def endpoints(self) -> Endpoints:
        return resolve_endpoints(self.settings, start=True)

    @cached_property
    def engine(self) -> Engine:
        return create_catalogue_engine(self.endpoints.database_url)

    @cached_property
    def store(self) -> SqlAlchemyStore:
        """The catalogue, after checking that its schema is the one this elmreg expects."""
        try:
            current = schema.current_revision(self.engine)
        except DBAPIError as exc:
            raise translate_error(exc, self.engine.url.render_as_string(hide_password=True)) from exc
        head = schema.head_revision()
        if current != head:
            state = "empty" if current is None else f"at revision {current}"
            raise SchemaOutOfDateError(
                f"the catalogue is {state}, elmreg needs {head}: run 'elmreg db upgrade'"
            )
        return SqlAlchemyStore(self.engine)

    @cached_property
    def artifacts(self) -> ArtifactRepository:
        return open_artifact_repository(self.endpoints)

    @cached_property
    def artifact_cache(self) -> ArtifactCache:
        return ArtifactCache(self.settings.cache_path / "artifacts", self.artifacts)

    # -- loaded backbones (issue 12, arch-kinds): one copy of each per context, whoever uses it ---------------
    @cached_property
    def backbones(self) -> BackboneCache:
        """Backbones loaded on first use and shared by training, merge tuning and the adapter pools."""
        return BackboneCache(self.settings.cache_path, self.settings.device)

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.dispose()
