"""Aliases, tags and descriptions.

``expert_aliases`` names one expert of a task (``strategyqa@prod``); an alias moves by an update of its row, and
every move (who, when, from, to) is kept in ``expert_alias_moves`` for audit. Tasks and experts gain ``tags``
(string keys to string values) and a Markdown ``description``.

Downgrading drops the aliases, their history, the tags and the descriptions.

Revision ID: 0010_aliases_tags
Revises: 0009_key_limits
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010_aliases_tags"
down_revision = "0009_key_limits"
branch_labels = None
depends_on = None


def upgrade() -> None:
    for table in ("tasks", "experts"):
        op.add_column(
            table,
            sa.Column("tags", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        )
        op.add_column(table, sa.Column("description", sa.Text(), nullable=True))
    op.create_table(
        "expert_aliases",
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_expert_aliases_task_id_tasks"),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], name="fk_expert_aliases_expert_id_experts"),
        sa.PrimaryKeyConstraint("task_id", "alias", name="pk_expert_aliases"),
    )
    op.create_index("ix_expert_aliases_expert_id", "expert_aliases", ["expert_id"])
    op.create_table(
        "expert_alias_moves",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=64), nullable=False),
        sa.Column("from_expert_id", sa.Integer(), nullable=True),
        sa.Column("to_expert_id", sa.Integer(), nullable=True),
        sa.Column("moved_by", sa.String(length=200), nullable=False),
        sa.Column("moved_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_expert_alias_moves_task_id_tasks"),
        sa.ForeignKeyConstraint(
            ["from_expert_id"], ["experts.id"], name="fk_expert_alias_moves_from_expert_id_experts"
        ),
        sa.ForeignKeyConstraint(
            ["to_expert_id"], ["experts.id"], name="fk_expert_alias_moves_to_expert_id_experts"
        ),
        sa.CheckConstraint(
            "from_expert_id IS NOT NULL OR to_expert_id IS NOT NULL", name="ck_expert_alias_moves_moved"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_expert_alias_moves"),
    )
    op.create_index("ix_expert_alias_moves_task_id_alias", "expert_alias_moves", ["task_id", "alias"])


def downgrade() -> None:
    op.drop_index("ix_expert_alias_moves_task_id_alias", table_name="expert_alias_moves")
    op.drop_table("expert_alias_moves")
    op.drop_index("ix_expert_aliases_expert_id", table_name="expert_aliases")
    op.drop_table("expert_aliases")
    for table in ("experts", "tasks"):
        op.drop_column(table, "description")
        op.drop_column(table, "tags")
