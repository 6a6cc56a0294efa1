"""review verdicts: per-box feedback and approval on reviewed labels, an annotation sent back
to its reviewer, frozen held-out versions

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reviewed_labels", schema=None) as batch_op:
        batch_op.add_column(sa.Column("box_feedback", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("approved_by", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("approved_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_reviewed_labels_approved_at", ["approved_at"], unique=False)
    with op.batch_alter_table("labeling_queue", schema=None) as batch_op:
        batch_op.add_column(sa.Column("rejected_annotation", sa.String(length=100), nullable=True))
    with op.batch_alter_table("dataset_snapshots", schema=None) as batch_op:
        batch_op.add_column(sa.Column("holdout_version", sa.Integer(), nullable=True))
        batch_op.create_index(
            "ix_dataset_snapshots_holdout_version", ["holdout_version"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("dataset_snapshots", schema=None) as batch_op:
        batch_op.drop_index("ix_dataset_snapshots_holdout_version")
        batch_op.drop_column("holdout_version")
    with op.batch_alter_table("labeling_queue", schema=None) as batch_op:
        batch_op.drop_column("rejected_annotation")
    with op.batch_alter_table("reviewed_labels", schema=None) as batch_op:
        batch_op.drop_index("ix_reviewed_labels_approved_at")
        batch_op.drop_column("approved_at")
        batch_op.drop_column("approved_by")
        batch_op.drop_column("box_feedback")
