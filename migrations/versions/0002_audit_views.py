"""Audit views over routing decisions, and a read-only role for auditors.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

AUDITOR_ROLE = "elmreg_auditor"

VIEWS = {
    # One row per routing decision: who asked, what was chosen, at which library version, and by how much.
    "audit_decisions": """
        SELECT d.id AS decision_id, d.created_at, d.caller_label, t.name AS task, e.name AS chosen_expert,
               e.kind AS chosen_kind, d.library_version, d.q, d.top_k, round(d.latency_ms::numeric, 2) AS latency_ms,
               winner.votes AS winner_votes, coalesce(runner_up.votes, 0) AS runner_up_votes,
               winner.votes - coalesce(runner_up.votes, 0) AS vote_margin, runner_up.expert AS runner_up_expert
        FROM routing_decisions d
        LEFT JOIN tasks t ON t.id = d.task_id
        LEFT JOIN experts e ON e.id = d.chosen_expert_id
        LEFT JOIN LATERAL (
            SELECT count(*)::int AS votes FROM routing_votes v
            WHERE v.decision_id = d.id AND v.expert_id = d.chosen_expert_id
        ) winner ON true
        LEFT JOIN LATERAL (
            SELECT count(*)::int AS votes, min(x.name) AS expert FROM routing_votes v JOIN experts x ON x.id = v.expert_id
            WHERE v.decision_id = d.id AND v.expert_id <> d.chosen_expert_id
            GROUP BY v.expert_id ORDER BY count(*) DESC, v.expert_id LIMIT 1
        ) runner_up ON true
    """,
    # Which expert was chosen for each task (or caller label), day by day.
    "audit_choices_by_task": """
        SELECT coalesce(t.name, d.caller_label, '(unlabelled)') AS task, date_trunc('day', d.created_at) AS day,
               e.name AS chosen_expert, count(*)::int AS decisions, min(d.library_version) AS first_version,
               max(d.library_version) AS last_version
        FROM routing_decisions d
        LEFT JOIN tasks t ON t.id = d.task_id
        LEFT JOIN experts e ON e.id = d.chosen_expert_id
        GROUP BY 1, 2, 3
    """,
    # Routable experts that no decision has chosen yet.
    "audit_experts_never_chosen": """
        SELECT e.id AS expert_id, e.name AS expert, e.kind, e.library_version, e.ready_at
        FROM experts e
        WHERE e.status = 'ready'
          AND NOT EXISTS (SELECT 1 FROM routing_decisions d WHERE d.chosen_expert_id = e.id)
    """,
    # Every vote with the library sample it matched.
    "audit_votes": """
        SELECT v.decision_id, v.query_index, v.rank, e.name AS expert, v.score, le.sample_index, le.text AS sample_text
        FROM routing_votes v
        JOIN experts e ON e.id = v.expert_id
        JOIN library_entries le ON le.id = v.library_entry_id
    """,
}


def upgrade() -> None:
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")
    # A cluster-wide role, created once; grant it to people with: GRANT elmreg_auditor TO alice;
    op.execute(
        f"DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{AUDITOR_ROLE}') "
        f"THEN CREATE ROLE {AUDITOR_ROLE} NOLOGIN; END IF; END $$"
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {AUDITOR_ROLE}")
    op.execute(f"GRANT SELECT ON {', '.join(VIEWS)} TO {AUDITOR_ROLE}")


def downgrade() -> None:
    # The role may hold grants in other databases of the cluster, so it stays; its grants here go.
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {AUDITOR_ROLE}")
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
