"""Routers beyond RoE: each decision names the router that made it, votes can carry weights or point at an
expert's centroid, and every expert keeps one centroid per embedder.

- ``routing_decisions.router`` / ``router_params``: which routing method chose (``roe``, ``roe-knn``,
  ``centroid``, ...) and with which parameters; decisions made before this revision were RoE's.
- ``routing_votes.weight``: how much a vote counted (1 for RoE; the similarity for a similarity-weighted kNN), so
  summing it per expert in SQL gives the router's own tally. ``library_entry_id`` becomes nullable: a centroid
  router's vote matches an expert's mean embedding, not a library sample.
- ``expert_centroids``: the normalised mean of each expert's library embeddings per embedder, kept when entries
  are written (and backfilled here).

Revision ID: 0006_routers
Revises: 0005_audit_scale
Create Date: 2026-11-30
"""

from __future__ import annotations

import json

import numpy as np
import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_routers"
down_revision = "0005_audit_scale"
branch_labels = None
depends_on = None

AUDITOR_ROLE = "elmreg_auditor"

# Columns are only appended, so CREATE OR REPLACE keeps the views' grants.
AUDIT_DECISIONS = """
    SELECT d.id AS decision_id, d.created_at, d.caller_label, t.name AS task, e.name AS chosen_expert,
           e.kind AS chosen_kind, d.library_version, d.q, d.top_k, round(d.latency_ms::numeric, 2) AS latency_ms,
           d.winner_votes, coalesce(d.runner_up_votes, 0) AS runner_up_votes,
           d.winner_votes - coalesce(d.runner_up_votes, 0) AS vote_margin, r.name AS runner_up_expert,
           d.router, d.router_params
    FROM routing_decisions d
    LEFT JOIN tasks t ON t.id = d.task_id
    LEFT JOIN experts e ON e.id = d.chosen_expert_id
    LEFT JOIN experts r ON r.id = d.runner_up_expert_id
"""

AUDIT_VOTES = """
    SELECT v.decision_id, v.query_index, v.rank, e.name AS expert, v.score, le.sample_index,
           le.text AS sample_text, v.weight
    FROM routing_votes v
    JOIN experts e ON e.id = v.expert_id
    LEFT JOIN library_entries le ON le.id = v.library_entry_id
"""

# 0005's definitions, restored on downgrade (dropping columns needs DROP + CREATE, and grants again).
PREVIOUS_VIEWS = {
    "audit_decisions": """
        SELECT d.id AS decision_id, d.created_at, d.caller_label, t.name AS task, e.name AS chosen_expert,
               e.kind AS chosen_kind, d.library_version, d.q, d.top_k, round(d.latency_ms::numeric, 2) AS latency_ms,
               d.winner_votes, coalesce(d.runner_up_votes, 0) AS runner_up_votes,
               d.winner_votes - coalesce(d.runner_up_votes, 0) AS vote_margin, r.name AS runner_up_expert
        FROM routing_decisions d
        LEFT JOIN tasks t ON t.id = d.task_id
        LEFT JOIN experts e ON e.id = d.chosen_expert_id
        LEFT JOIN experts r ON r.id = d.runner_up_expert_id
    """,
    "audit_votes": """
        SELECT v.decision_id, v.query_index, v.rank, e.name AS expert, v.score, le.sample_index, le.text AS sample_text
        FROM routing_votes v
        JOIN experts e ON e.id = v.expert_id
        JOIN library_entries le ON le.id = v.library_entry_id
    """,
}


def _backfill_centroids() -> None:
    """Each existing expert's centroid per embedder: the mean of its entries, normalised in Python (pgvector's
    l2_normalize needs 0.7; a catalogue being migrated may still run an older pgvector)."""
    bind = op.get_bind()
    means = bind.execute(
        sa.text(
            "SELECT expert_id, embedder_id, avg(embedding)::text AS mean, count(*) AS entries "
            "FROM library_entries GROUP BY expert_id, embedder_id"
        )
    ).all()
    for m in means:
        vector = np.asarray(json.loads(m.mean), dtype=np.float64)
        norm = float(np.linalg.norm(vector))
        unit = vector / norm if norm > 0 else vector
        bind.execute(
            sa.text(
                "INSERT INTO expert_centroids (expert_id, embedder_id, embedding, entries) "
                "VALUES (:e, :m, CAST(:v AS vector), :n)"
            ),
            {
                "e": m.expert_id,
                "m": m.embedder_id,
                "v": "[" + ",".join(map(repr, unit.tolist())) + "]",
                "n": m.entries,
            },
        )


def upgrade() -> None:
    op.add_column(
        "routing_decisions",
        sa.Column("router", sa.String(length=32), server_default=sa.text("'roe'"), nullable=False),
    )
    op.add_column(
        "routing_decisions",
        sa.Column(
            "router_params",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
    )
    op.add_column(
        "routing_votes", sa.Column("weight", sa.Float(), server_default=sa.text("1.0"), nullable=False)
    )
    op.alter_column("routing_votes", "library_entry_id", existing_type=sa.BigInteger(), nullable=True)
    op.create_table(
        "expert_centroids",
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("embedder_id", sa.Integer(), nullable=False),
        sa.Column("embedding", pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
        sa.Column("entries", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_expert_centroids_expert_id_experts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["embedder_id"], ["embedders.id"], name=op.f("fk_expert_centroids_embedder_id_embedders")
        ),
        sa.PrimaryKeyConstraint("expert_id", "embedder_id", name=op.f("pk_expert_centroids")),
    )
    _backfill_centroids()
    op.execute(f"CREATE OR REPLACE VIEW audit_decisions AS {AUDIT_DECISIONS}")
    op.execute(f"CREATE OR REPLACE VIEW audit_votes AS {AUDIT_VOTES}")


def downgrade() -> None:
    for view, body in PREVIOUS_VIEWS.items():
        op.execute(f"DROP VIEW {view}")
        op.execute(f"CREATE VIEW {view} AS {body}")
        op.execute(f"GRANT SELECT ON {view} TO {AUDITOR_ROLE}")
    op.drop_table("expert_centroids")
    # Votes that matched a centroid have no library entry to point at under the previous schema.
    op.execute("DELETE FROM routing_votes WHERE library_entry_id IS NULL")
    op.alter_column("routing_votes", "library_entry_id", existing_type=sa.BigInteger(), nullable=False)
    op.drop_column("routing_votes", "weight")
    op.drop_column("routing_decisions", "router_params")
    op.drop_column("routing_decisions", "router")
