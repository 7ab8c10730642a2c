"""The SQLAlchemy implementations of the stores (PostgreSQL + pgvector). All of elmreg's SQL is here and in
``migrations/``."""

from __future__ import annotations

from elmreg.registry.store.sql.audit import SqlAuditStore
from elmreg.registry.store.sql.catalogue import SqlCatalogueStore
from elmreg.registry.store.sql.evaluations import SqlEvaluationStore
from elmreg.registry.store.sql.jobs import SqlJobStore
from elmreg.registry.store.sql.library import SqlLibraryStore

__all__ = ["SqlAuditStore", "SqlCatalogueStore", "SqlEvaluationStore", "SqlJobStore", "SqlLibraryStore"]
