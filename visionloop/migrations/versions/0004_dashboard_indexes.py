"""dashboard indexes: the queue statistics' counts, the ledger's newest cycles, the newest
events of a kind

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_NOT_NULL = sa.text("sync_error IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table("labeling_queue", schema=None) as batch_op:
        batch_op.create_index(
            "ix_labeling_queue_reason_status", ["flagged_reason", "status"], unique=False
        )
        batch_op.create_index(
            "ix_labeling_queue_sync_error",
            ["id"],
            unique=False,
            sqlite_where=_NOT_NULL,
            postgresql_where=_NOT_NULL,
        )
        batch_op.create_index("ix_labeling_queue_cycle_id", ["cycle", "id"], unique=False)
    with op.batch_alter_table("activity_events", schema=None) as batch_op:
        batch_op.create_index("ix_activity_events_kind_id", ["kind", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("activity_events", schema=None) as batch_op:
        batch_op.drop_index("ix_activity_events_kind_id")
    with op.batch_alter_table("labeling_queue", schema=None) as batch_op:
        batch_op.drop_index("ix_labeling_queue_cycle_id")
        batch_op.drop_index("ix_labeling_queue_sync_error")
        batch_op.drop_index("ix_labeling_queue_reason_status")
