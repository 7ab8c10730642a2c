"""In-model routing: ``routing_decisions.embedder_id`` becomes nullable.

Routers such as Arrow (``inference.arrow``) route inside the model, token by token, and search no library, so
their decisions have no embedder. Their votes are already expressible: ``routing_votes.library_entry_id`` is NULL
and ``weight`` is the expert's share of the instance's routing mass (migration 0006).

Downgrading deletes those decisions (their votes go with them), since the old schema cannot hold them.

Revision ID: 0008_in_model_routing
Revises: 0007_trained_retrievers
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_in_model_routing"
down_revision = "0007_trained_retrievers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column("routing_decisions", "embedder_id", existing_type=sa.Integer(), nullable=True)


def downgrade() -> None:
    op.execute("DELETE FROM routing_decisions WHERE embedder_id IS NULL")
    op.alter_column("routing_decisions", "embedder_id", existing_type=sa.Integer(), nullable=False)
