"""The read-only auditor role: it reads the audit views and can change or read nothing else."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from elmreg.registry.audit_views import AUDIT_VIEWS

FORBIDDEN = [
    "INSERT INTO tasks (name) VALUES ('x')",
    "UPDATE experts SET status = 'ready'",
    "DELETE FROM routing_votes",
    "TRUNCATE routing_decisions",
    "CREATE TABLE auditor_was_here (id int)",
    "CREATE VIEW auditor_view AS SELECT 1",
    # Tables behind the views: artifact URIs, job payloads and errors, and the raw library are not the auditor's.
    "SELECT artifact_uri FROM experts",
    "SELECT payload, last_error FROM jobs",
    "SELECT text FROM library_entries",
    "SELECT * FROM routing_decisions",
]


def _as_auditor(registry, sql: str):
    with registry.engine.connect() as connection, connection.begin() as transaction:
        connection.execute(text("SET LOCAL ROLE elmreg_auditor"))
        try:
            result = connection.execute(text(sql))
            return result.all() if result.returns_rows else None
        finally:
            transaction.rollback()


@pytest.mark.parametrize("view", [view for view, _ in AUDIT_VIEWS.values()])
def test_auditor_reads_every_audit_view(registry, view):
    _as_auditor(registry, f"SELECT * FROM {view} LIMIT 1")


@pytest.mark.parametrize("sql", FORBIDDEN)
def test_auditor_can_change_nothing_and_read_no_table(registry, sql):
    with pytest.raises(ProgrammingError, match="permission denied"):
        _as_auditor(registry, sql)
