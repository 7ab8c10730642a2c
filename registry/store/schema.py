"""Schema migrations of the catalogue, run through Alembic from the installed ``elmreg.migrations`` package."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import elmreg.migrations


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


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the catalogue up to ``revision``."""
    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Migrate the catalogue down to ``revision`` ('base' drops every elmreg table)."""
    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
