"""SQLAlchemy Core tables. The Alembic migrations create exactly these
(``tests/contract/test_schema.py`` compares them).

No column ever holds a plain code: ``code_digest`` is an HMAC, ``code_sealed`` an AES-GCM
ciphertext that is set to NULL when the verification leaves ``pending``, and messages keep
only ``body_masked`` (for a plain SMS, which carries no code, that is its text). Credits are
whole units of 1/10,000 credit (``domain.billing``), so debits and refunds are exact.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in Python, naive UTC in the database (SQLite keeps no zone)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # SQLite hands back text for aggregates such as MIN()
            value = datetime.fromisoformat(value)
        stamp: datetime = value.replace(tzinfo=UTC)
        return stamp


metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("username", String(254), nullable=False, unique=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("billing", String(16), nullable=False, server_default="unlimited"),
    Column("balance_units", BigInteger, nullable=False, server_default="0"),
    #: The most the account's messages may count in one UTC day, in units; NULL: no cap.
    Column("daily_spend_cap", BigInteger, nullable=True),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
)

services = Table(
    "services",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("policy", JSON, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    #: The webhook signing secret, sealed (AES-GCM under a key outside the database, the
    #: service id as associated data); NULL until one is issued. Never in plain text.
    Column("webhook_secret_sealed", LargeBinary, nullable=True),
    Index("ix_services_account_created", "account_id", "created_at", "id"),
)

verifications = Table(
    "verifications",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("service_id", String(36), ForeignKey("services.id"), nullable=False),
    Column("to", String(320), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("status", String(32), nullable=False),
    Column("code_digest", LargeBinary(32), nullable=False),
    Column("code_sealed", LargeBinary, nullable=True),
    Column("locale", String(16), nullable=False),
    Column("context", JSON, nullable=True),
    Column("metadata", JSON, nullable=False),
    Column("check_attempts", Integer, nullable=False),
    Column("max_check_attempts", Integer, nullable=False),
    Column("send_attempts", Integer, nullable=False),
    Column("max_send_attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("last_sent_at", UTCDateTime, nullable=False),
    # A message template of this verification's own (LabsMobile's sendCode ``message``),
    # used instead of the service's; and its own sender.
    Column("template", Text, nullable=True),
    Column("sender_id", String(15), nullable=True),
    # Channel fallback: the address an e-mail fallback goes to, and when the next channel is
    # due if no check has arrived (NULL: no timed fallback pending).
    Column("fallback_email", String(320), nullable=True),
    Column("fallback_at", UTCDateTime, nullable=True),
    # A verification of one of its service's test numbers: its messages are never sent.
    Column("test", Boolean, nullable=False, server_default=false()),
    Index("ix_verifications_account_created", "account_id", "created_at", "id"),
    Index("ix_verifications_fallback", "fallback_at"),
    Index("ix_verifications_service_to_created", "service_id", "to", "created_at"),
    # The SMS-pumping detector counts a number prefix's verifications deployment-wide: a range
    # of ``to`` (all numbers of the prefix), then the recent ones.
    Index("ix_verifications_to_created", "to", "created_at"),
    # At most one pending verification per (service, destination): concurrent starts cannot
    # create two live codes for one number.
    Index(
        "uq_verifications_pending",
        "service_id",
        "to",
        unique=True,
        sqlite_where=text("status = 'pending'"),
        postgresql_where=text("status = 'pending'"),
    ),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("verification_id", String(36), ForeignKey("verifications.id"), nullable=True),
    Column("channel", String(16), nullable=False),
    Column("to", String(320), nullable=False),
    Column("status", String(16), nullable=False),
    Column("locale", String(16), nullable=False),
    Column("body_masked", Text, nullable=False),
    Column("segments", Integer, nullable=False),
    Column("encoding", String(8), nullable=False),
    Column("provider", String(32), nullable=True),
    Column("provider_ref", String(64), nullable=True),
    #: What the message costs, in units; NULL when no price applies (no price table loaded).
    Column("price_units", BigInteger, nullable=True),
    Column("error", String(500), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    # A plain SMS: its sender, the caller's own reference (LabsMobile ``subid``), a label, and
    # the URL its delivery reports are forwarded to.
    Column("sender_id", String(15), nullable=True),
    Column("client_ref", String(20), nullable=True),
    Column("label", String(255), nullable=True),
    Column("ack_url", Text, nullable=True),
    #: One JSON line per delivery attempt (provider, time, outcome, error): the message's
    #: history, appended by the statement that records each outcome. See ``domain.model``.
    Column("attempt_log", Text, nullable=True),
    #: A message to a test number: stored as sent by provider ``test``, never sent.
    Column("test", Boolean, nullable=False, server_default=false()),
    #: What the message counted against the daily spend caps named in ``spend_caps`` (their
    #: keys, space-separated), so a refund gives it back to the same counters; NULL: none.
    Column("spend_units", BigInteger, nullable=True),
    Column("spend_caps", String(100), nullable=True),
    Index("ix_messages_verification", "verification_id"),
    Index("ix_messages_account_created", "account_id", "created_at", "id"),
    Index("ix_messages_client_ref", "account_id", "client_ref"),
    Index("ix_messages_provider_ref", "provider", "provider_ref"),
    Index("ix_messages_due", "status", "next_attempt_at"),
)

destination_failures = Table(
    "destination_failures",
    metadata,
    Column("service_id", String(36), primary_key=True),
    Column("to", String(320), primary_key=True),
    Column("consecutive_failures", Integer, nullable=False),
    Column("locked_until", UTCDateTime, nullable=True),
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("account_id", String(36), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("state", String(16), nullable=False),
    Column("response_status", Integer, nullable=True),
    Column("response_body", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
)

prices = Table(
    "prices",
    metadata,
    #: ISO 3166-1 alpha-2, or ``*`` for the price of every country without a row.
    Column("country", String(2), primary_key=True),
    Column("unit_price", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    #: Signed units: a top-up or refund adds, a debit takes away.
    Column("amount", BigInteger, nullable=False),
    #: The account's balance right after this entry.
    Column("balance", BigInteger, nullable=False),
    Column("message_id", String(36), nullable=True),
    Column("note", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_ledger_account_created", "account_id", "created_at", "id"),
    Index("ix_ledger_message", "message_id"),
)

#: Outbound calls owed to a caller (LabsMobile ``ackurl`` delivery reports), sent from this
#: outbox like messages, so that a restart loses none.
callbacks = Table(
    "callbacks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("message_id", String(36), nullable=True),
    Column("url", Text, nullable=False),
    Column("params", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    Column("error", String(500), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_callbacks_due", "status", "next_attempt_at"),
)

#: Events owed to a service's webhook (``domain.events``), sent from this outbox like messages;
#: the row id is the ``webhook-id`` of every attempt. ``payload`` holds ids, statuses and counts.
events = Table(
    "events",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("service_id", String(36), nullable=True),
    Column("type", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("payload", JSON, nullable=False),
    #: ``pending``, ``delivered`` or ``failed`` (given up)
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    Column("last_error", String(500), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("delivered_at", UTCDateTime, nullable=True),
    Index("ix_events_due", "status", "next_attempt_at"),
    Index("ix_events_account_created", "account_id", "created_at", "id"),
    Index("ix_events_created", "created_at", "id"),
)

#: Security-relevant actions: who (an API key id, or ``cli``), on which account, what, on
#: which object, and its state before and after (never a secret).
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(255), nullable=False),
    Column("before", JSON, nullable=True),
    Column("after", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_audit_account_created", "account_id", "created_at", "id"),
    Index("ix_audit_created", "created_at", "id"),
)

#: Deployment-wide refusals of a number prefix or a whole country (the SMS-pumping defence):
#: made by the detector or an operator, lifted by an operator or by time. Rows are kept after
#: they end: a prefix's history makes each repeat block last twice as long.
fraud_blocks = Table(
    "fraud_blocks",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("kind", String(16), nullable=False),
    #: ``+63917555`` (a prefix) or ``PH`` (a country).
    Column("value", String(16), nullable=False),
    Column("country", String(2), nullable=True),
    Column("reason", String(300), nullable=False),
    #: The block's number among those of its value: two processes that detect the same prefix
    #: at once both try the same (value, seq), and one insert wins.
    Column("seq", Integer, nullable=False),
    Column("automatic", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("lifted_at", UTCDateTime, nullable=True),
    Index("uq_fraud_blocks_value_seq", "value", "seq", unique=True),
    Index("ix_fraud_blocks_expires", "expires_at"),
)

#: Each account's safe list (numbers and prefixes that bypass the detector and the blocks) and
#: deny list (countries and prefixes it never sends to).
destination_lists = Table(
    "destination_lists",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("account_id", String(36), ForeignKey("accounts.id"), nullable=False),
    Column("list", String(8), nullable=False),
    Column("kind", String(8), nullable=False),
    Column("value", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Index("uq_destination_lists_entry", "account_id", "list", "value", unique=True),
)

#: What each daily spend cap (``account:ID`` or ``service:ID``) has counted on each UTC day
#: (``YYYY-MM-DD``), and when a send was first refused by it that day (its event is raised once).
spend_counters = Table(
    "spend_counters",
    metadata,
    Column("cap", String(48), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("spent_units", BigInteger, nullable=False),
    Column("reached_at", UTCDateTime, nullable=True),
)
