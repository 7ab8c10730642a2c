"""Optional limits per API key: requests per second and requests in flight (NULL: unlimited).

Revision ID: 0009_key_limits
Revises: 0008_in_model_routing
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_key_limits"
down_revision = "0008_in_model_routing"
branch_labels = None
depends_on = None

_LIMITS_POSITIVE = (
    "(rate_per_second IS NULL OR rate_per_second > 0) AND (max_concurrent IS NULL OR max_concurrent > 0)"
)


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("rate_per_second", sa.Float(), nullable=True))
    op.add_column("api_keys", sa.Column("max_concurrent", sa.Integer(), nullable=True))
    op.create_check_constraint(op.f("ck_api_keys_limits_positive"), "api_keys", _LIMITS_POSITIVE)


def downgrade() -> None:
    op.drop_constraint(op.f("ck_api_keys_limits_positive"), "api_keys", type_="check")
    op.drop_column("api_keys", "max_concurrent")
    op.drop_column("api_keys", "rate_per_second")
