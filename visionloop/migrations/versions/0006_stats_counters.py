"""stats counters: running totals behind the review-queue statistics, and each reviewed
label's share of the per-class box counts

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

from visionloop.settings import get_settings
from visionloop.stats_counters import rebuild

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stats_counters",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("part", sa.String(length=16), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "key", "part"),
    )
    with op.batch_alter_table("reviewed_labels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stats_parts", sa.JSON(), nullable=True))
    # The backfill: the history so far, counted under the deployment's classes (the API's
    # statistics count the boxes again, once, if it asks for another class list).
    rebuild(op.get_bind(), get_settings().class_names)


def downgrade() -> None:
    with op.batch_alter_table("reviewed_labels", schema=None) as batch_op:
        batch_op.drop_column("stats_parts")
    op.drop_table("stats_counters")
