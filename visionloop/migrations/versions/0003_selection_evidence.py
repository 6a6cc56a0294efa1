"""selection evidence: embeddings and sub-threshold candidates, queue arms and score parts

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("below", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("embedding", sa.LargeBinary(), nullable=True))
    with op.batch_alter_table("labeling_queue", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("arm", sa.String(length=16), nullable=False, server_default="selected")
        )
        batch_op.add_column(sa.Column("cycle", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("score_parts", sa.JSON(), nullable=True))
        batch_op.create_index("ix_labeling_queue_arm", ["arm"], unique=False)
        batch_op.create_index("ix_labeling_queue_cycle", ["cycle"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("labeling_queue", schema=None) as batch_op:
        batch_op.drop_index("ix_labeling_queue_cycle")
        batch_op.drop_index("ix_labeling_queue_arm")
        batch_op.drop_column("score_parts")
        batch_op.drop_column("cycle")
        batch_op.drop_column("arm")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_column("embedding")
        batch_op.drop_column("below")
