"""the delivery history of each message (one JSON line per attempt); channel fallback

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 13:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt_log", sa.Text(), nullable=True))
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fallback_email", sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column("fallback_at", sa.DateTime(), nullable=True))
        batch_op.create_index("ix_verifications_fallback", ["fallback_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_index("ix_verifications_fallback")
        batch_op.drop_column("fallback_at")
        batch_op.drop_column("fallback_email")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("attempt_log")
