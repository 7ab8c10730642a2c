"""Schema migrations of the catalogue, run through Alembic from the installed ``elmreg.migrations`` package."""

from __future__ import annotations

import re
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Engine

import elmreg.migrations
from elmreg.registry.errors import UserError, first_line


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    """Alembic filter: what the declared schema owns.

    Per-embedder HNSW indexes are created at run time by the store (their dimension is the embedder's): they are
    not part of the declared schema.
    """
    return not (type_ == "index" and name and name.startswith("ix_library_entries_embedding_hnsw_e"))


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config pointing at the shipped revisions (no alembic.ini needed)."""
    config = Config()
    config.set_main_option("script_location", str(Path(elmreg.migrations.__file__).parent))
    if engine is not None:
        config.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return config


def head_revision() -> str:
    """The newest revision this version of elmreg ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "elmreg ships no migrations"
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def revisions() -> list[str]:
    """Every revision this version of elmreg ships, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def _check_revision(revision: str) -> None:
    """Refuse a revision elmreg does not ship before a transaction starts (Alembic's own error is a traceback)."""
    if re.fullmatch(r"[+-]\d+", revision):
        return  # relative steps ('-1'): Alembic checks them against the current revision
    script = ScriptDirectory.from_config(alembic_config())
    try:
        script.get_revisions(revision)
    except (CommandError, RevisionError) as exc:
        raise UserError(
            f"no schema revision '{revision}': use head, base or one of {', '.join(revisions())}"
        ) from exc


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the catalogue up to ``revision``.

    Raises:
        UserError: elmreg ships no such revision, or it is not above the current one.
    """
    _check_revision(revision)
    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        try:
            command.upgrade(config, revision)
        except (CommandError, RevisionError) as exc:  # e.g. "upgrade" to a revision below the current one
            raise UserError(f"cannot upgrade to '{revision}': {first_line(exc)}") from exc


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the catalogue down to ``revision`` ('base' drops every elmreg table).

    Raises:
        UserError: elmreg ships no such revision, or it is not below the current one.
    """
    _check_revision(revision)
    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        try:
            command.downgrade(config, revision)
        except (CommandError, RevisionError) as exc:
            raise UserError(f"cannot downgrade to '{revision}': {first_line(exc)}") from exc
