"""test numbers (verifications and messages marked test) and daily spend caps

Revision ID: 0006_caps
Revises: 0005_fraud
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_caps"
down_revision = "0005_fraud"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("daily_spend_cap", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("test", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("test", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("spend_units", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("spend_caps", sa.String(length=100), nullable=True))
    op.create_table(
        "spend_counters",
        sa.Column("cap", sa.String(length=48), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("spent_units", sa.BigInteger(), nullable=False),
        sa.Column("reached_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("cap", "day"),
    )


def downgrade() -> None:
    op.drop_table("spend_counters")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("spend_caps")
        batch_op.drop_column("spend_units")
        batch_op.drop_column("test")
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_column("test")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("daily_spend_cap")
