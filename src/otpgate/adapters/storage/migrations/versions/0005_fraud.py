"""SMS-pumping defence: deployment-wide blocks, each account's safe and deny lists, and the
index the detector counts a prefix's verifications with

Revision ID: 0005_fraud
Revises: 0003
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_fraud"
down_revision = "0004_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fraud_blocks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.String(length=16), nullable=False),
        sa.Column("country", sa.String(length=2), nullable=True),
        sa.Column("reason", sa.String(length=300), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("automatic", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("lifted_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("uq_fraud_blocks_value_seq", "fraud_blocks", ["value", "seq"], unique=True)
    op.create_index("ix_fraud_blocks_expires", "fraud_blocks", ["expires_at"], unique=False)
    op.create_table(
        "destination_lists",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("list", sa.String(length=8), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("value", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        "uq_destination_lists_entry",
        "destination_lists",
        ["account_id", "list", "value"],
        unique=True,
    )
    op.create_index(
        "ix_verifications_to_created", "verifications", ["to", "created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_verifications_to_created", table_name="verifications")
    op.drop_index("uq_destination_lists_entry", table_name="destination_lists")
    op.drop_table("destination_lists")
    op.drop_index("ix_fraud_blocks_expires", table_name="fraud_blocks")
    op.drop_index("uq_fraud_blocks_value_seq", table_name="fraud_blocks")
    op.drop_table("fraud_blocks")
