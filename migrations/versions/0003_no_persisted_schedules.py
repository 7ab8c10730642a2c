"""Drop APScheduler's job table: the scheduler keeps its schedules in memory now.

Earlier schedulers persisted their jobs there as pickles whose arguments held the whole settings object, database
URL and S3 secret key included. Dropping the table removes those copies of the credentials.

Revision ID: 0003_schedules
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0003_schedules"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("DROP TABLE IF EXISTS apscheduler_jobs")


def downgrade() -> None:
    # Nothing to restore: an older scheduler creates its own table when it starts.
    pass
