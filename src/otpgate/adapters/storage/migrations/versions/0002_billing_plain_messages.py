"""prices, prepaid credit and its ledger, plain messages, per-verification templates, callbacks

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 10:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Accounts made before billing existed keep working as they did: unlimited.
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("billing", sa.String(length=16), nullable=False, server_default="unlimited")
        )
        batch_op.add_column(
            sa.Column("balance_units", sa.BigInteger(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.add_column(sa.Column("template", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("sender_id", sa.String(length=15), nullable=True))
    # The old ``price`` column held a provider's price text and was never read; a message's
    # price is now otpgate's own, in units.
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_column("price")
        batch_op.add_column(sa.Column("price_units", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("sender_id", sa.String(length=15), nullable=True))
        batch_op.add_column(sa.Column("client_ref", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("label", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("ack_url", sa.Text(), nullable=True))
        batch_op.create_index(
            "ix_messages_account_created", ["account_id", "created_at", "id"], unique=False
        )
        batch_op.create_index("ix_messages_client_ref", ["account_id", "client_ref"], unique=False)
    op.create_table(
        "prices",
        sa.Column("country", sa.String(length=2), nullable=False),
        sa.Column("unit_price", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("country"),
    )
    op.create_table(
        "ledger",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=True),
        sa.Column("note", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ledger", schema=None) as batch_op:
        batch_op.create_index(
            "ix_ledger_account_created", ["account_id", "created_at", "id"], unique=False
        )
        batch_op.create_index("ix_ledger_message", ["message_id"], unique=False)
    op.create_table(
        "callbacks",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("account_id", sa.String(length=36), nullable=False),
        sa.Column("message_id", sa.String(length=36), nullable=True),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("callbacks", schema=None) as batch_op:
        batch_op.create_index("ix_callbacks_due", ["status", "next_attempt_at"], unique=False)


def downgrade() -> None:
    op.drop_table("callbacks")
    op.drop_table("ledger")
    op.drop_table("prices")
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_client_ref")
        batch_op.drop_index("ix_messages_account_created")
        batch_op.drop_column("ack_url")
        batch_op.drop_column("label")
        batch_op.drop_column("client_ref")
        batch_op.drop_column("sender_id")
        batch_op.drop_column("price_units")
        batch_op.add_column(sa.Column("price", sa.String(length=32), nullable=True))
    with op.batch_alter_table("verifications", schema=None) as batch_op:
        batch_op.drop_column("sender_id")
        batch_op.drop_column("template")
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_column("balance_units")
        batch_op.drop_column("billing")
