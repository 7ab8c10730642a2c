"""The audit views and the catalogue's status, read on PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text

from elmreg.registry.entities import CatalogueSummary
from elmreg.registry.errors import UserError
from elmreg.registry.store import schema
from elmreg.registry.store.audit import AuditStore
from elmreg.registry.store.models import Base
from elmreg.registry.store.session import ManagedSessions
from elmreg.registry.store.sql.library import current_library_version


class SqlAuditStore(AuditStore):
    """:class:`AuditStore` on PostgreSQL."""

    def __init__(self, sessions: ManagedSessions):
        self.sessions = sessions

    def summary(self) -> CatalogueSummary:
        with self.sessions.translating():
            revision = schema.current_revision(self.sessions.engine)
        counts: dict[str, int] = {}
        library_version = 0
        with self.sessions() as session:
            server_version = session.scalar(text("SHOW server_version"))
            pgvector_version = session.scalar(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            )
            if revision is not None:
                for table in Base.metadata.sorted_tables:
                    counts[table.name] = session.scalar(select(func.count()).select_from(table)) or 0
                library_version = current_library_version(session)
        return CatalogueSummary(
            schema_revision=revision,
            head_revision=schema.head_revision(),
            library_version=library_version,
            row_counts=counts,
            pgvector_version=pgvector_version,
            server_version=server_version,
        )

    def audit_rows(
        self,
        view: str,
        *,
        order_by: str | None,
        filters: dict[str, Any],
        limit: int | None,
        descending: bool = True,
    ) -> list[dict[str, Any]]:
        # View and column names come from the fixed AUDIT_VIEWS table and the view's own columns, never from
        # free text; the filter values are bound parameters.
        with self.sessions() as session:
            columns = set(session.execute(text(f"SELECT * FROM {view} LIMIT 0")).keys())
            unknown = sorted(set(filters) - columns)
            if unknown:
                raise UserError(f"audit view {view} has no column {', '.join(unknown)}")
            where = " AND ".join(f"{column} = :{column}" for column in filters) or "true"
            order = f"ORDER BY {order_by} {'DESC' if descending else 'ASC'}" if order_by else ""
            result = session.execute(
                text(f"SELECT * FROM {view} WHERE {where} {order} LIMIT :limit"), {**filters, "limit": limit}
            )
            return [dict(row) for row in result.mappings()]
