"""Alembic environment for the elmreg catalogue, run from the installed package by ``elmreg db upgrade``."""

from __future__ import annotations

from alembic import context
from pgvector.sqlalchemy import Vector
from sqlalchemy import create_engine, pool

from elmreg.registry.store.models import Base
from elmreg.registry.store.schema import include_object

config = context.config
target_metadata = Base.metadata


def _configure(connection) -> None:
    # Reflection must know pgvector's type to compare models and database without false drift.
    connection.dialect.ischema_names["vector"] = Vector
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_object=include_object,
        compare_type=True,
        transaction_per_migration=True,
    )


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
