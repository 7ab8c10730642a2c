"""Initial catalogue: backbones, embedders, tasks, experts and lineage, the library (entries and its
version history), jobs, training runs, the routing audit, benchmark runs and evaluations.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The library's vectors need pgvector; left installed on downgrade since other schemas may use it.
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "backbones",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("family", sa.String(length=16), nullable=False),
        sa.Column("fingerprint", sa.String(length=128), nullable=True),
        sa.Column(
            "config",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("family IN ('causal', 'seq2seq')", name=op.f("ck_backbones_family")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backbones")),
        sa.UniqueConstraint("name", name=op.f("uq_backbones_name")),
    )
    op.create_table(
        "benchmark_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'running'"), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "suite",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "summary",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("report_uri", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed')", name=op.f("ck_benchmark_runs_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_benchmark_runs")),
    )
    op.create_table(
        "embedders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("normalized", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("dimension > 0", name=op.f("ck_embedders_dimension_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_embedders")),
        sa.UniqueConstraint("name", name=op.f("uq_embedders_name")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'queued'"), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column("run_after", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("lease_owner", sa.String(length=200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("dedupe_key", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_jobs_status")
        ),
        sa.CheckConstraint("attempts >= 0 AND max_attempts > 0", name=op.f("ck_jobs_attempts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_jobs_dedupe_key")),
    )
    op.create_index(
        "ix_jobs_claimable",
        "jobs",
        ["priority", "run_after"],
        unique=False,
        postgresql_where=sa.text("status = 'queued'"),
    )
    op.create_index(op.f("ix_jobs_status"), "jobs", ["status"], unique=False)
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("dataset", sa.String(length=500), nullable=False),
        sa.Column("subset", sa.String(length=200), nullable=True),
        sa.Column("split", sa.String(length=64), nullable=False),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("task_type", sa.String(length=16), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("templates", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("max_examples", sa.Integer(), nullable=True),
        sa.Column("expert_kind", sa.String(length=32), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column(
            "training_config",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "expert_kind IN ('lora', 'ffn_adapter', 'full')", name=op.f("ck_tasks_expert_kind")
        ),
        sa.CheckConstraint("level IN ('prompt', 'dataset')", name=op.f("ck_tasks_level")),
        sa.CheckConstraint("task_type IN ('classification', 'generative')", name=op.f("ck_tasks_task_type")),
        sa.ForeignKeyConstraint(
            ["backbone_id"], ["backbones.id"], name=op.f("fk_tasks_backbone_id_backbones")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("name", name=op.f("uq_tasks_name")),
    )
    op.create_index(op.f("ix_tasks_backbone_id"), "tasks", ["backbone_id"], unique=False)
    op.create_table(
        "experts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("artifact_uri", sa.Text(), nullable=True),
        sa.Column("artifact_sha256", sa.String(length=64), nullable=True),
        sa.Column("artifact_size", sa.BigInteger(), nullable=True),
        sa.Column(
            "config",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "metrics",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("library_version", sa.Integer(), nullable=True),
        sa.Column("retired_at_version", sa.Integer(), nullable=True),
        sa.Column("merge_method", sa.String(length=32), nullable=True),
        sa.Column("merge_params", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('lora', 'ffn_adapter', 'full', 'merged')", name=op.f("ck_experts_kind")),
        sa.CheckConstraint(
            "status IN ('pending', 'training', 'ready', 'failed', 'retired')", name=op.f("ck_experts_status")
        ),
        sa.CheckConstraint(
            "status NOT IN ('ready', 'retired') OR (artifact_uri IS NOT NULL AND artifact_sha256 IS NOT NULL AND artifact_size IS NOT NULL AND library_version IS NOT NULL)",
            name=op.f("ck_experts_ready_has_verified_artifact"),
        ),
        sa.CheckConstraint(
            "artifact_size IS NULL OR artifact_size >= 0", name=op.f("ck_experts_artifact_size_nonnegative")
        ),
        sa.ForeignKeyConstraint(
            ["backbone_id"], ["backbones.id"], name=op.f("fk_experts_backbone_id_backbones")
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_experts_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experts")),
        sa.UniqueConstraint("library_version", name=op.f("uq_experts_library_version")),
        sa.UniqueConstraint("name", name=op.f("uq_experts_name")),
    )
    op.create_index(op.f("ix_experts_backbone_id"), "experts", ["backbone_id"], unique=False)
    op.create_index(op.f("ix_experts_status"), "experts", ["status"], unique=False)
    op.create_index(op.f("ix_experts_task_id"), "experts", ["task_id"], unique=False)
    op.create_table(
        "evaluations",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=True),
        sa.Column("route", sa.String(length=32), nullable=False),
        sa.Column("split", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("library_version", sa.Integer(), nullable=True),
        sa.Column("benchmark_run_id", sa.Integer(), nullable=True),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["benchmark_run_id"],
            ["benchmark_runs.id"],
            name=op.f("fk_evaluations_benchmark_run_id_benchmark_runs"),
        ),
        sa.ForeignKeyConstraint(["expert_id"], ["experts.id"], name=op.f("fk_evaluations_expert_id_experts")),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_evaluations_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
    )
    op.create_index(
        op.f("ix_evaluations_benchmark_run_id"), "evaluations", ["benchmark_run_id"], unique=False
    )
    op.create_index(op.f("ix_evaluations_expert_id"), "evaluations", ["expert_id"], unique=False)
    op.create_index(op.f("ix_evaluations_task_id"), "evaluations", ["task_id"], unique=False)
    op.create_table(
        "expert_parents",
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_expert_parents_expert_id_experts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["experts.id"], name=op.f("fk_expert_parents_parent_id_experts")
        ),
        sa.PrimaryKeyConstraint("expert_id", "parent_id", name=op.f("pk_expert_parents")),
    )
    op.create_index(op.f("ix_expert_parents_parent_id"), "expert_parents", ["parent_id"], unique=False)
    op.create_table(
        "library_changes",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("change", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("change IN ('added', 'retired')", name=op.f("ck_library_changes_change")),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_library_changes_expert_id_experts")
        ),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_library_changes")),
        sa.UniqueConstraint("expert_id", "change", name=op.f("uq_library_changes_expert_id_change")),
    )
    op.create_table(
        "library_entries",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("embedder_id", sa.Integer(), nullable=False),
        sa.Column("sample_index", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("embedding", pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
        sa.ForeignKeyConstraint(
            ["embedder_id"], ["embedders.id"], name=op.f("fk_library_entries_embedder_id_embedders")
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_library_entries_expert_id_experts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_library_entries")),
        sa.UniqueConstraint(
            "expert_id",
            "embedder_id",
            "sample_index",
            name=op.f("uq_library_entries_expert_id_embedder_id_sample_index"),
        ),
    )
    op.create_index(op.f("ix_library_entries_embedder_id"), "library_entries", ["embedder_id"], unique=False)
    op.create_index(op.f("ix_library_entries_expert_id"), "library_entries", ["expert_id"], unique=False)
    op.create_table(
        "routing_decisions",
        sa.Column("id", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("caller_label", sa.String(length=200), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("embedder_id", sa.Integer(), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=True),
        sa.Column("library_version", sa.Integer(), nullable=False),
        sa.Column("q", sa.Integer(), nullable=False),
        sa.Column("top_k", sa.Integer(), nullable=False),
        sa.Column("kinds", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("chosen_expert_id", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.CheckConstraint("q > 0 AND top_k > 0", name=op.f("ck_routing_decisions_q_top_k_positive")),
        sa.ForeignKeyConstraint(
            ["backbone_id"], ["backbones.id"], name=op.f("fk_routing_decisions_backbone_id_backbones")
        ),
        sa.ForeignKeyConstraint(
            ["chosen_expert_id"], ["experts.id"], name=op.f("fk_routing_decisions_chosen_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["embedder_id"], ["embedders.id"], name=op.f("fk_routing_decisions_embedder_id_embedders")
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_routing_decisions_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_routing_decisions")),
    )
    op.create_index(
        op.f("ix_routing_decisions_caller_label"), "routing_decisions", ["caller_label"], unique=False
    )
    op.create_index(
        op.f("ix_routing_decisions_chosen_expert_id"), "routing_decisions", ["chosen_expert_id"], unique=False
    )
    op.create_index(op.f("ix_routing_decisions_task_id"), "routing_decisions", ["task_id"], unique=False)
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=True),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'running'"), nullable=False),
        sa.Column(
            "config",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "metrics",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'failed')", name=op.f("ck_training_runs_status")
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_training_runs_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_training_runs_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name=op.f("fk_training_runs_task_id_tasks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
    )
    op.create_index(op.f("ix_training_runs_expert_id"), "training_runs", ["expert_id"], unique=False)
    op.create_index(op.f("ix_training_runs_job_id"), "training_runs", ["job_id"], unique=False)
    op.create_index(op.f("ix_training_runs_task_id"), "training_runs", ["task_id"], unique=False)
    op.create_table(
        "routing_votes",
        sa.Column("decision_id", sa.BigInteger(), nullable=False),
        sa.Column("query_index", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("library_entry_id", sa.BigInteger(), nullable=False),
        sa.Column("expert_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["decision_id"],
            ["routing_decisions.id"],
            name=op.f("fk_routing_votes_decision_id_routing_decisions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"], ["experts.id"], name=op.f("fk_routing_votes_expert_id_experts")
        ),
        sa.ForeignKeyConstraint(
            ["library_entry_id"],
            ["library_entries.id"],
            name=op.f("fk_routing_votes_library_entry_id_library_entries"),
        ),
        sa.PrimaryKeyConstraint("decision_id", "query_index", "rank", name=op.f("pk_routing_votes")),
    )
    op.create_index(op.f("ix_routing_votes_expert_id"), "routing_votes", ["expert_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_routing_votes_expert_id"), table_name="routing_votes")
    op.drop_table("routing_votes")
    op.drop_index(op.f("ix_training_runs_task_id"), table_name="training_runs")
    op.drop_index(op.f("ix_training_runs_job_id"), table_name="training_runs")
    op.drop_index(op.f("ix_training_runs_expert_id"), table_name="training_runs")
    op.drop_table("training_runs")
    op.drop_index(op.f("ix_routing_decisions_task_id"), table_name="routing_decisions")
    op.drop_index(op.f("ix_routing_decisions_chosen_expert_id"), table_name="routing_decisions")
    op.drop_index(op.f("ix_routing_decisions_caller_label"), table_name="routing_decisions")
    op.drop_table("routing_decisions")
    op.drop_index(op.f("ix_library_entries_expert_id"), table_name="library_entries")
    op.drop_index(op.f("ix_library_entries_embedder_id"), table_name="library_entries")
    op.drop_table("library_entries")
    op.drop_table("library_changes")
    op.drop_index(op.f("ix_expert_parents_parent_id"), table_name="expert_parents")
    op.drop_table("expert_parents")
    op.drop_index(op.f("ix_evaluations_task_id"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_expert_id"), table_name="evaluations")
    op.drop_index(op.f("ix_evaluations_benchmark_run_id"), table_name="evaluations")
    op.drop_table("evaluations")
    op.drop_index(op.f("ix_experts_task_id"), table_name="experts")
    op.drop_index(op.f("ix_experts_status"), table_name="experts")
    op.drop_index(op.f("ix_experts_backbone_id"), table_name="experts")
    op.drop_table("experts")
    op.drop_index(op.f("ix_tasks_backbone_id"), table_name="tasks")
    op.drop_table("tasks")
    op.drop_index(op.f("ix_jobs_status"), table_name="jobs")
    op.drop_index("ix_jobs_claimable", table_name="jobs", postgresql_where=sa.text("status = 'queued'"))
    op.drop_table("jobs")
    op.drop_table("embedders")
    op.drop_table("benchmark_runs")
    op.drop_table("backbones")
