"""The audit trail at scale: each decision keeps its vote margin, and indexes serve the audit queries.

With 1e5 decisions and 3.2e6 votes, the audit views' per-decision counts over ``routing_votes`` made every query
that filters or sorts on the margin read all votes (seconds). The winner's and runner-up's vote counts are now
columns of ``routing_decisions``, written with the decision (and backfilled here); ``audit_decisions`` reads them.
Likewise ``routing_daily_choices`` counts decisions per day, task (or caller label) and chosen expert as they are
recorded, and ``audit_choices_by_task`` / ``audit_experts_never_chosen`` read it instead of every decision.
Indexes: decisions by time (newest first, pruning) and votes by library entry (deleting entries).

Revision ID: 0005_audit_scale
Revises: 0004_api_keys
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_audit_scale"
down_revision = "0004_api_keys"
branch_labels = None
depends_on = None

AUDITOR_ROLE = "elmreg_auditor"

AUDIT_DECISIONS = """
    SELECT d.id AS decision_id, d.created_at, d.caller_label, t.name AS task, e.name AS chosen_expert,
           e.kind AS chosen_kind, d.library_version, d.q, d.top_k, round(d.latency_ms::numeric, 2) AS latency_ms,
           d.winner_votes, coalesce(d.runner_up_votes, 0) AS runner_up_votes,
           d.winner_votes - coalesce(d.runner_up_votes, 0) AS vote_margin, r.name AS runner_up_expert
    FROM routing_decisions d
    LEFT JOIN tasks t ON t.id = d.task_id
    LEFT JOIN experts e ON e.id = d.chosen_expert_id
    LEFT JOIN experts r ON r.id = d.runner_up_expert_id
"""


# 0002's views, restored on downgrade.
PREVIOUS_VIEWS = {
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
    "audit_choices_by_task": """
        SELECT coalesce(t.name, d.caller_label, '(unlabelled)') AS task, date_trunc('day', d.created_at) AS day,
               e.name AS chosen_expert, count(*)::int AS decisions, min(d.library_version) AS first_version,
               max(d.library_version) AS last_version
        FROM routing_decisions d
        LEFT JOIN tasks t ON t.id = d.task_id
        LEFT JOIN experts e ON e.id = d.chosen_expert_id
        GROUP BY 1, 2, 3
    """,
    "audit_experts_never_chosen": """
        SELECT e.id AS expert_id, e.name AS expert, e.kind, e.library_version, e.ready_at
        FROM experts e
        WHERE e.status = 'ready'
          AND NOT EXISTS (SELECT 1 FROM routing_decisions d WHERE d.chosen_expert_id = e.id)
    """,
}

# One row per kept count (day, task or caller label, expert): no aggregate, so "newest days first, LIMIT n"
# reads n rows through the unique index, which starts with the day.
AUDIT_CHOICES_BY_TASK = """
    SELECT coalesce(t.name, c.caller_label, '(unlabelled)') AS task, c.day, e.name AS chosen_expert,
           c.decisions, c.first_version, c.last_version
    FROM routing_daily_choices c
    LEFT JOIN tasks t ON t.id = c.task_id
    LEFT JOIN experts e ON e.id = c.chosen_expert_id
"""

AUDIT_EXPERTS_NEVER_CHOSEN = """
    SELECT e.id AS expert_id, e.name AS expert, e.kind, e.library_version, e.ready_at
    FROM experts e
    WHERE e.status = 'ready'
      AND NOT EXISTS (SELECT 1 FROM routing_daily_choices c WHERE c.chosen_expert_id = e.id)
"""

# The daily counts of the decisions in a time range (all of them in the migration; one day after pruning).
DAILY_CHOICES_FROM_DECISIONS = """
    INSERT INTO routing_daily_choices (day, task_id, caller_label, chosen_expert_id, decisions, first_version,
                                       last_version)
    SELECT date_trunc('day', created_at), task_id, caller_label, chosen_expert_id, count(*),
           min(library_version), max(library_version)
    FROM routing_decisions
    GROUP BY 1, 2, 3, 4
"""


def upgrade() -> None:
    op.add_column("routing_decisions", sa.Column("winner_votes", sa.Integer(), nullable=True))
    op.add_column("routing_decisions", sa.Column("runner_up_votes", sa.Integer(), nullable=True))
    op.add_column("routing_decisions", sa.Column("runner_up_expert_id", sa.Integer(), nullable=True))
    op.create_foreign_key(
        op.f("fk_routing_decisions_runner_up_expert_id_experts"),
        "routing_decisions",
        "experts",
        ["runner_up_expert_id"],
        ["id"],
    )
    # Backfill with the rule the view used: the runner-up has the most votes among the others, then lower id.
    op.execute(
        """
        UPDATE routing_decisions d SET
            winner_votes = (SELECT count(*) FROM routing_votes v
                            WHERE v.decision_id = d.id AND v.expert_id = d.chosen_expert_id),
            runner_up_votes = r.votes, runner_up_expert_id = r.expert_id
        FROM routing_decisions d2 LEFT JOIN LATERAL (
            SELECT v.expert_id, count(*)::int AS votes FROM routing_votes v
            WHERE v.decision_id = d2.id AND v.expert_id <> d2.chosen_expert_id
            GROUP BY v.expert_id ORDER BY count(*) DESC, v.expert_id LIMIT 1
        ) r ON true
        WHERE d2.id = d.id
        """
    )
    op.create_table(
        "routing_daily_choices",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("day", sa.DateTime(timezone=True), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("caller_label", sa.String(length=200), nullable=True),
        sa.Column("chosen_expert_id", sa.Integer(), nullable=True),
        sa.Column("decisions", sa.Integer(), nullable=False),
        sa.Column("first_version", sa.Integer(), nullable=False),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["chosen_expert_id"],
            ["experts.id"],
            name=op.f("fk_routing_daily_choices_chosen_expert_id_experts"),
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_routing_daily_choices_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_daily_choices")),
        sa.UniqueConstraint(
            "day",
            "task_id",
            "caller_label",
            "chosen_expert_id",
            name=op.f("uq_routing_daily_choices_day_task_id_caller_label_chosen_expert_id"),
            postgresql_nulls_not_distinct=True,
        ),
    )
    op.create_index(
        op.f("ix_routing_daily_choices_chosen_expert_id"), "routing_daily_choices", ["chosen_expert_id"]
    )
    op.execute(DAILY_CHOICES_FROM_DECISIONS)
    op.create_index(op.f("ix_routing_decisions_created_at"), "routing_decisions", ["created_at"])
    op.create_index(op.f("ix_routing_votes_library_entry_id"), "routing_votes", ["library_entry_id"])
    for view, body in (
        ("audit_decisions", AUDIT_DECISIONS),
        ("audit_choices_by_task", AUDIT_CHOICES_BY_TASK),
        ("audit_experts_never_chosen", AUDIT_EXPERTS_NEVER_CHOSEN),
    ):
        op.execute(f"DROP VIEW {view}")
        op.execute(f"CREATE VIEW {view} AS {body}")
        op.execute(f"GRANT SELECT ON {view} TO {AUDITOR_ROLE}")


def downgrade() -> None:
    for view, body in PREVIOUS_VIEWS.items():
        op.execute(f"DROP VIEW {view}")
        op.execute(f"CREATE VIEW {view} AS {body}")
        op.execute(f"GRANT SELECT ON {view} TO {AUDITOR_ROLE}")
    op.drop_table("routing_daily_choices")
    op.drop_index(op.f("ix_routing_votes_library_entry_id"), table_name="routing_votes")
    op.drop_index(op.f("ix_routing_decisions_created_at"), table_name="routing_decisions")
    op.drop_constraint(
        op.f("fk_routing_decisions_runner_up_expert_id_experts"), "routing_decisions", type_="foreignkey"
    )
    for column in ("runner_up_expert_id", "runner_up_votes", "winner_votes"):
        op.drop_column("routing_decisions", column)
