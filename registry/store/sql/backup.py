"""The catalogue's side of backup and restore: what it references in the object store, whether a database is
empty, and moving references when a backup is restored into another bucket or prefix.

These work on a catalogue at any schema revision (a backup restored from an older elmreg is upgraded afterwards),
so they use plain SQL on the two tables that hold artifact references rather than the stores' ORM models.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import text

from elmreg.registry.entities import StoredArtifact
from elmreg.registry.store.session import ManagedSessions

# Every table with an artifact reference (uri, sha256, size): experts' weights and trained retrievers.
_REFERENCING_TABLES = ("experts", "embedders")


def referenced_artifacts(sessions: ManagedSessions) -> list[StoredArtifact]:
    """Every object the catalogue points to, with the checksum and size it recorded, each once."""
    union = " UNION ".join(
        f"SELECT artifact_uri, artifact_sha256, artifact_size FROM {table} WHERE artifact_uri IS NOT NULL"
        for table in _REFERENCING_TABLES
    )
    with sessions() as session:
        rows = session.execute(text(f"{union} ORDER BY 1")).all()
    return [StoredArtifact(uri=uri, sha256=sha256, size=int(size)) for uri, sha256, size in rows]


def user_tables(sessions: ManagedSessions) -> list[str]:
    """The tables of the database outside PostgreSQL's own schemas (none in an empty database)."""
    with sessions() as session:
        return list(
            session.scalars(
                text(
                    "SELECT schemaname || '.' || tablename FROM pg_tables"
                    " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
                )
            )
        )


def move_artifact_references(sessions: ManagedSessions, moves: Mapping[str, str]) -> None:
    """Point every reference to an old URI at its new one, in one transaction."""
    moves = {old: new for old, new in moves.items() if old != new}
    if not moves:
        return
    with sessions() as session:
        for table in _REFERENCING_TABLES:
            for old, new in moves.items():
                session.execute(
                    text(f"UPDATE {table} SET artifact_uri = :new WHERE artifact_uri = :old"),
                    {"old": old, "new": new},
                )
