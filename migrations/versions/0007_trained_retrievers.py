"""Trained retrievers: an embedder can be a sentence encoder fine-tuned by elmreg on the library itself, stored
in the artifact store so that every machine of a deployment loads the same weights by name.

- ``embedders.artifact_uri`` / ``artifact_sha256`` / ``artifact_size``: the packed sentence-transformers folder
  (NULL for encoders loaded from a hub id or a local path, as before).
- ``embedders.trained_from_id``: the embedder it was fine-tuned from, whose library texts it was trained on.
- ``embedders.training``: how it was trained (library version, experts, pairs, epochs, batch size, seed, ...).

Revision ID: 0007_trained_retrievers
Revises: 0006_routers
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007_trained_retrievers"
down_revision = "0006_routers"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("embedders", sa.Column("artifact_uri", sa.Text(), nullable=True))
    op.add_column("embedders", sa.Column("artifact_sha256", sa.String(length=64), nullable=True))
    op.add_column("embedders", sa.Column("artifact_size", sa.BigInteger(), nullable=True))
    op.add_column("embedders", sa.Column("trained_from_id", sa.Integer(), nullable=True))
    op.add_column("embedders", sa.Column("training", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.create_foreign_key(
        op.f("fk_embedders_trained_from_id_embedders"), "embedders", "embedders", ["trained_from_id"], ["id"]
    )
    # An artifact is all three or none: a loader must never fetch bytes it cannot verify.
    op.create_check_constraint(
        op.f("ck_embedders_artifact_complete"),
        "embedders",
        "(artifact_uri IS NULL) = (artifact_sha256 IS NULL) AND (artifact_uri IS NULL) = (artifact_size IS NULL)",
    )


def downgrade() -> None:
    # Entries, centroids and decisions of trained embedders stay: under 0006 they are embedders like any other,
    # only without the weights' address, which a later upgrade cannot restore.
    op.drop_constraint(op.f("ck_embedders_artifact_complete"), "embedders", type_="check")
    op.drop_constraint(op.f("fk_embedders_trained_from_id_embedders"), "embedders", type_="foreignkey")
    op.drop_column("embedders", "training")
    op.drop_column("embedders", "trained_from_id")
    op.drop_column("embedders", "artifact_size")
    op.drop_column("embedders", "artifact_sha256")
    op.drop_column("embedders", "artifact_uri")
