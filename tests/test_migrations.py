"""Migrations on the real PostgreSQL: up, down, up again, and no drift between models and revisions."""

from __future__ import annotations

import re

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pgvector.sqlalchemy import Vector
from sqlalchemy import inspect, text

from elmreg.registry.kinds import expert_row_kinds, trainable_kinds
from elmreg.registry.store import schema
from elmreg.registry.store.models import Base
from elmreg.registry.store.session import create_catalogue_engine


def test_upgrade_downgrade_upgrade(scratch_database):
    engine = create_catalogue_engine(scratch_database)
    try:
        assert schema.current_revision(engine) is None
        schema.upgrade(engine)
        assert schema.current_revision(engine) == schema.head_revision()
        tables = set(inspect(engine).get_table_names())
        assert {t.name for t in Base.metadata.sorted_tables} <= tables

        schema.downgrade(engine, "base")
        assert schema.current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}

        schema.upgrade(engine)
        assert schema.current_revision(engine) == schema.head_revision()
    finally:
        engine.dispose()


def test_models_and_migrations_agree(scratch_database):
    engine = create_catalogue_engine(scratch_database)
    try:
        schema.upgrade(engine)
        with engine.connect() as connection:
            connection.dialect.ischema_names["vector"] = Vector
            context = MigrationContext.configure(
                connection,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        not (type_ == "index" and name.startswith("ix_library_entries_embedding_hnsw_e"))
                    ),
                },
            )
            diff = compare_metadata(context, Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
    finally:
        engine.dispose()


def test_every_constraint_and_index_is_named(scratch_database):
    engine = create_catalogue_engine(scratch_database)
    try:
        schema.upgrade(engine)
        with engine.connect() as connection:
            # Unnamed constraints get names PostgreSQL invents ('tasks_pkey', 'tasks_name_key'); ours carry
            # the naming convention's prefixes. PostgreSQL 18 also lists NOT NULL as constraints (contype 'n'),
            # which are column properties it names itself.
            names = (
                connection.execute(
                    text(
                        """
                    SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                    WHERE n.nspname = 'public' AND conrelid <> 0 AND conrelid <> 'alembic_version'::regclass
                      AND c.contype <> 'n'
                    UNION ALL
                    SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename <> 'alembic_version'
                    """
                    )
                )
                .scalars()
                .all()
            )
        assert names
        assert [n for n in names if not n.startswith(("pk_", "uq_", "ck_", "fk_", "ix_"))] == []
        for table in Base.metadata.sorted_tables:
            for constraint in table.constraints:
                assert constraint.name, f"unnamed constraint on {table.name}: {constraint}"
            for index in table.indexes:
                assert index.name, f"unnamed index on {table.name}"
    finally:
        engine.dispose()


def test_kind_check_constraints_equal_the_kind_registry(scratch_database):
    """The migrations wrote the list of kinds into CHECK constraints; a kind registered without a migration that
    widens them could be validated and trained, and then fail on insert."""
    engine = create_catalogue_engine(scratch_database)
    try:
        schema.upgrade(engine)
        with engine.connect() as connection:
            definitions = dict(
                connection.execute(
                    text(
                        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conname IN ('ck_tasks_expert_kind', 'ck_experts_kind')"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    # e.g. CHECK (((kind)::text = ANY ((ARRAY['lora'::character varying, ...])::text[])))
    allowed = {name: set(re.findall(r"'([^']*)'", definition)) for name, definition in definitions.items()}
    assert allowed == {
        "ck_tasks_expert_kind": set(trainable_kinds()),
        "ck_experts_kind": set(expert_row_kinds()),
    }
