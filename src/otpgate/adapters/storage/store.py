"""The storage ports, implemented once over an executor (``sqlite.py`` or ``postgres.py``).

Each method says which statements of ``statements.py`` run and which of them share a
transaction; the executor runs them on its driver. Nothing here depends on the backend, so
every backend keeps exactly the same contract, checked by ``tests/contract/test_storage.py``.
This class stores whatever masked message body it is given and never sees a plain code.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from otpgate.adapters.storage import statements as q
from otpgate.adapters.storage.executor import Conflict, Executor, Row, Session
from otpgate.domain.billing import BillingMode, LedgerEntry, LedgerKind
from otpgate.domain.events import (
    AuditRecord,
    DeliveryState,
    EventRecord,
    message_event,
    record_of,
)
from otpgate.domain.fraud import (
    Block,
    BlockKind,
    Conversion,
    EntryKind,
    GuardLevel,
    ListEntry,
    ListName,
)
from otpgate.domain.model import (
    Account,
    ApiKey,
    Attempt,
    AttemptOutcome,
    Channel,
    CodeType,
    Limit,
    Message,
    MessageStatus,
    RateLimits,
    SendReceipt,
    Service,
    ServicePolicy,
    Verification,
    VerificationStatus,
    new_id,
    parse_attempt_log,
)
from otpgate.domain.ports import (
    NO_LOCKOUT,
    Callback,
    ClaimedEvent,
    ClaimedMessage,
    DeliveryReport,
    Lockout,
    Page,
    PlainMessage,
)
from otpgate.domain.spend import SpendCap, spend_day
from otpgate.errors import (
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    InsufficientCredit,
    InvalidRequest,
    SpendCapReached,
)

IDEMPOTENCY_TTL = timedelta(hours=24)
#: A key still "in progress" after this long belongs to a request whose process died; a retry
#: may take it over instead of getting 409 for a day.
IDEMPOTENCY_STALE = timedelta(minutes=5)
_ERROR_LENGTH = 500

# --- rows to the domain ----------------------------------------------------------------------


def policy_to_json(policy: ServicePolicy) -> dict[str, Any]:
    return {
        "name": policy.name,
        "code_length": policy.code_length,
        "code_type": policy.code_type.value,
        "ttl_seconds": policy.ttl_seconds,
        "max_check_attempts": policy.max_check_attempts,
        "max_send_attempts": policy.max_send_attempts,
        "resend_interval_seconds": policy.resend_interval_seconds,
        "channels": [c.value for c in policy.channels],
        "allowed_countries": (
            None if policy.allowed_countries is None else list(policy.allowed_countries)
        ),
        "sender_id": policy.sender_id,
        "templates": dict(policy.templates),
        "default_locale": policy.default_locale,
        "webotp_domain": policy.webotp_domain,
        "android_app_hash": policy.android_app_hash,
        "webhook_url": policy.webhook_url,
        "allow_multipart": policy.allow_multipart,
        "fallback_after_seconds": policy.fallback_after_seconds,
        "test_numbers": dict(policy.test_numbers),
        "daily_spend_cap": policy.daily_spend_cap,
        # Only what the service set: the defaults stay the release's own.
        "rate_limits": rate_limits_to_json(policy.rate_limits),
        "fraud_guard": policy.fraud_guard.value,
        "allow_voip": policy.allow_voip,
        "custom_code_enabled": policy.custom_code_enabled,
    }


def rate_limits_to_json(limits: RateLimits) -> dict[str, Any]:
    stored: dict[str, Any] = {
        name: {"limit": limit.limit, "window_seconds": limit.window_seconds}
        for name, limit in limits.overrides
    }
    if limits.fail_open:
        stored["fail_open"] = True
    return stored


def rate_limits_from_json(data: Mapping[str, Any] | None) -> RateLimits:
    if not data:
        return RateLimits()
    return RateLimits(
        overrides=tuple(
            (name, Limit(entry["limit"], entry["window_seconds"]))
            for name, entry in sorted(data.items())
            if name != "fail_open"
        ),
        fail_open=bool(data.get("fail_open", False)),
    )


def policy_from_json(data: Mapping[str, Any]) -> ServicePolicy:
    countries = data.get("allowed_countries")
    return ServicePolicy(
        name=data["name"],
        code_length=data["code_length"],
        code_type=CodeType(data["code_type"]),
        ttl_seconds=data["ttl_seconds"],
        max_check_attempts=data["max_check_attempts"],
        max_send_attempts=data["max_send_attempts"],
        resend_interval_seconds=data["resend_interval_seconds"],
        channels=tuple(Channel(c) for c in data["channels"]),
        allowed_countries=None if countries is None else tuple(countries),
        sender_id=data.get("sender_id"),
        templates=dict(data.get("templates") or {}),
        default_locale=data.get("default_locale", "en"),
        webotp_domain=data.get("webotp_domain"),
        android_app_hash=data.get("android_app_hash"),
        webhook_url=data.get("webhook_url"),
        # absent from services stored before it existed: the default, one segment
        allow_multipart=bool(data.get("allow_multipart", False)),
        fallback_after_seconds=data.get("fallback_after_seconds"),
        test_numbers=dict(data.get("test_numbers") or {}),
        daily_spend_cap=data.get("daily_spend_cap"),
        # absent from services stored before rate limits existed: the defaults
        rate_limits=rate_limits_from_json(data.get("rate_limits")),
        # absent from services stored before they existed: the defaults
        fraud_guard=GuardLevel(data.get("fraud_guard", GuardLevel.STANDARD.value)),
        allow_voip=bool(data.get("allow_voip", False)),
        custom_code_enabled=bool(data.get("custom_code_enabled", True)),
    )


def block_from_row(row: Row) -> Block:
    return Block(
        id=row["id"],
        kind=BlockKind(row["kind"]),
        value=row["value"],
        country=row["country"],
        reason=row["reason"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        seq=int(row["seq"]),
        automatic=bool(row["automatic"]),
        lifted_at=row["lifted_at"],
    )


def list_entry_from_row(row: Row) -> ListEntry:
    return ListEntry(
        id=row["id"],
        account_id=row["account_id"],
        list=ListName(row["list"]),
        kind=EntryKind(row["kind"]),
        value=row["value"],
        created_at=row["created_at"],
    )


def _conversion(row: Row | None) -> Conversion:
    if row is None:
        return Conversion(0, 0)
    return Conversion(decided=int(row["decided"] or 0), approved=int(row["approved"] or 0))


def account_from_row(row: Row) -> Account:
    return Account(
        id=row["id"],
        name=row["name"],
        username=row["username"],
        is_admin=bool(row["is_admin"]),
        created_at=row["created_at"],
        billing=BillingMode(row["billing"]),
        balance=int(row["balance_units"]),
        daily_spend_cap=_units(row["daily_spend_cap"]),
    )


def _units(value: Any) -> int | None:
    return None if value is None else int(value)


def ledger_from_row(row: Row) -> LedgerEntry:
    return LedgerEntry(
        id=row["id"],
        account_id=row["account_id"],
        kind=LedgerKind(row["kind"]),
        amount=int(row["amount"]),
        balance=int(row["balance"]),
        created_at=row["created_at"],
        message_id=row["message_id"],
        note=row["note"],
    )


def key_from_row(row: Row) -> ApiKey:
    return ApiKey(
        id=row["id"],
        account_id=row["account_id"],
        name=row["name"],
        key_hash=row["key_hash"],
        created_at=row["created_at"],
        revoked_at=row.get("revoked_at"),
    )


def service_from_row(row: Row) -> Service:
    return Service(
        id=row["id"],
        account_id=row["account_id"],
        policy=policy_from_json(row["policy"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def message_from_row(row: Row) -> Message:
    return Message(
        id=row["id"],
        account_id=row["account_id"],
        verification_id=row["verification_id"],
        channel=Channel(row["channel"]),
        to=row["to"],
        status=MessageStatus(row["status"]),
        locale=row["locale"],
        segments=row["segments"],
        encoding=row["encoding"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        provider=row["provider"],
        provider_ref=row["provider_ref"],
        price_units=row["price_units"],
        error=row["error"],
        attempts=row["attempts"],
        sender_id=row["sender_id"],
        client_ref=row["client_ref"],
        label=row["label"],
        ack_url=row["ack_url"],
        history=parse_attempt_log(row["attempt_log"]),
        test=bool(row["test"]),
        spend_units=_units(row["spend_units"]),
    )


def verification_from_row(row: Row, messages: Sequence[Message] = ()) -> Verification:
    return Verification(
        id=row["id"],
        account_id=row["account_id"],
        service_id=row["service_id"],
        to=row["to"],
        channel=Channel(row["channel"]),
        status=VerificationStatus(row["status"]),
        code_digest=row["code_digest"],
        code_sealed=row["code_sealed"],
        locale=row["locale"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires_at=row["expires_at"],
        last_sent_at=row["last_sent_at"],
        check_attempts=row["check_attempts"],
        max_check_attempts=row["max_check_attempts"],
        send_attempts=row["send_attempts"],
        max_send_attempts=row["max_send_attempts"],
        context=row["context"],
        metadata=row["metadata"] or {},
        messages=tuple(messages),
        template=row["template"],
        sender_id=row["sender_id"],
        fallback_email=row["fallback_email"],
        fallback_at=row["fallback_at"],
        test=bool(row["test"]),
    )


def lockout_from_row(row: Row) -> Lockout:
    """The lockout columns a statement selected as ``lockout_failures``/``lockout_until``."""
    failures, until = row["lockout_failures"], row["lockout_until"]
    if failures is None:  # no record: the outer join found nothing
        return NO_LOCKOUT
    return Lockout(failures=int(failures), locked_until=until)


def verification_values(v: Verification) -> dict[str, Any]:
    """The parameters of ``INSERT_VERIFICATION`` (``v_`` + column)."""
    return {
        "v_id": v.id,
        "v_account_id": v.account_id,
        "v_service_id": v.service_id,
        "v_to": v.to,
        "v_channel": v.channel.value,
        "v_status": v.status.value,
        "v_code_digest": v.code_digest,
        "v_code_sealed": v.code_sealed,
        "v_locale": v.locale,
        "v_context": v.context,
        "v_metadata": v.metadata,
        "v_check_attempts": v.check_attempts,
        "v_max_check_attempts": v.max_check_attempts,
        "v_send_attempts": v.send_attempts,
        "v_max_send_attempts": v.max_send_attempts,
        "v_created_at": v.created_at,
        "v_updated_at": v.updated_at,
        "v_expires_at": v.expires_at,
        "v_last_sent_at": v.last_sent_at,
        "v_template": v.template,
        "v_sender_id": v.sender_id,
        "v_fallback_email": v.fallback_email,
        "v_fallback_at": v.fallback_at,
        "v_test": v.test,
    }


def message_values(
    m: Message,
    body_masked: str,
    lease_until: datetime | None = None,
    not_before: datetime | None = None,
    caps: Sequence[SpendCap] = (),
) -> dict[str, Any]:
    """The parameters of ``INSERT_MESSAGE`` (``m_`` + column), the outbox row of a message;
    with ``lease_until`` it is written already claimed (one attempt counted) by the caller's
    own dispatcher. With ``caps`` it records what it counts against them (``spend_units``)."""
    counted = bool(caps) and bool(m.spend_units)
    return {
        "m_id": m.id,
        "m_account_id": m.account_id,
        "m_verification_id": m.verification_id,
        "m_channel": m.channel.value,
        "m_to": m.to,
        "m_status": m.status.value,
        "m_locale": m.locale,
        "m_body_masked": body_masked,
        "m_segments": m.segments,
        "m_encoding": m.encoding,
        "m_provider": m.provider,
        "m_provider_ref": m.provider_ref,
        "m_price_units": m.price_units,
        "m_error": m.error,
        "m_attempts": m.attempts if lease_until is None else m.attempts + 1,
        "m_next_attempt_at": not_before or m.created_at,
        "m_lease_until": lease_until,
        "m_created_at": m.created_at,
        "m_updated_at": m.updated_at,
        "m_sender_id": m.sender_id,
        "m_client_ref": m.client_ref,
        "m_label": m.label,
        "m_ack_url": m.ack_url,
        "m_attempt_log": None,
        "m_test": m.test,
        "m_spend_units": m.spend_units if counted else None,
        "m_spend_caps": " ".join(cap.key for cap in caps) if counted else None,
    }


def callback_values(callback: Callback) -> dict[str, Any]:
    """The parameters of ``INSERT_CALLBACK``: a new callback, due at once."""
    return {
        "id": callback.id,
        "account_id": callback.account_id,
        "message_id": callback.message_id,
        "url": callback.url,
        "params": callback.params,
        "status": "pending",
        "attempts": callback.attempts,
        "next_attempt_at": callback.created_at,
        "lease_until": None,
        "error": None,
        "created_at": callback.created_at,
        "updated_at": callback.created_at,
    }


def callback_from_row(row: Row) -> Callback:
    return Callback(
        id=row["id"],
        account_id=row["account_id"],
        message_id=row["message_id"],
        url=row["url"],
        params=dict(row["params"]),
        attempts=int(row["attempts"]),
        created_at=row["created_at"],
    )


def event_values(record: EventRecord) -> dict[str, Any]:
    """The parameters of ``INSERT_EVENT``."""
    return {
        "id": record.id,
        "account_id": record.account_id,
        "service_id": record.service_id,
        "type": record.type,
        "url": record.url,
        "payload": dict(record.data),
        "status": record.state.value,
        "attempts": record.attempts,
        "next_attempt_at": record.next_attempt_at,
        "lease_until": None,
        "last_error": record.last_error,
        "created_at": record.created_at,
        "updated_at": record.created_at,
        "delivered_at": record.delivered_at,
    }


def event_from_row(row: Row) -> EventRecord:
    return EventRecord(
        id=row["id"],
        type=row["type"],
        account_id=row["account_id"],
        service_id=row["service_id"],
        url=row["url"],
        data=dict(row["payload"]),
        created_at=row["created_at"],
        state=DeliveryState(row["status"]),
        attempts=int(row["attempts"]),
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        delivered_at=row["delivered_at"],
    )


def audit_from_row(row: Row) -> AuditRecord:
    return AuditRecord(
        id=row["id"],
        account_id=row["account_id"],
        actor=row["actor"],
        action=row["action"],
        target=row["target"],
        before=None if row["before"] is None else dict(row["before"]),
        after=None if row["after"] is None else dict(row["after"]),
        created_at=row["created_at"],
    )


def ledger_values(entry: LedgerEntry) -> dict[str, Any]:
    """The parameters of ``INSERT_LEDGER`` (``l_`` + column)."""
    return {
        "l_id": entry.id,
        "l_account_id": entry.account_id,
        "l_kind": entry.kind.value,
        "l_amount": entry.amount,
        "l_balance": entry.balance,
        "l_message_id": entry.message_id,
        "l_note": entry.note,
        "l_created_at": entry.created_at,
    }


async def _charge(session: Session, account_id: str, messages: Sequence[Message]) -> None:
    """Inside the caller's transaction: debit the priced messages' sum from the account and
    write a ledger entry per message; ``InsufficientCredit`` (the caller's transaction rolls
    back) when a prepaid balance cannot cover it."""
    priced = [m for m in messages if m.price_units is not None]
    if not priced:
        return
    total = sum(m.price_units or 0 for m in priced)
    row = await session.one(q.DEBIT, account_id=account_id, amount=total)
    if row is None:
        raise InsufficientCredit("the account's credit does not cover this message")
    # Each entry carries the balance right after it: a prepaid balance went down by the
    # total, one message after the other; an unlimited one did not move.
    prepaid = BillingMode(row["billing"]) is BillingMode.PREPAID
    balance = int(row["balance_units"]) + (total if prepaid else 0)
    for message in priced:
        amount = message.price_units or 0
        balance -= amount if prepaid else 0
        await session.run(q.INSERT_LEDGER, **ledger_values(_debit_entry(message, balance=balance)))


async def _count_spend(
    session: Session, dialect: str, caps: Sequence[SpendCap], messages: Sequence[Message]
) -> None:
    """Inside the caller's transaction: count the messages' ``spend_units`` against every cap
    in ``caps`` for the UTC day they are queued; ``SpendCapReached`` (the caller's transaction
    rolls back) for the first cap the sum would take past its limit."""
    total = sum(m.spend_units or 0 for m in messages)
    if not caps or not total:
        return
    day = spend_day(messages[0].created_at)
    for cap in caps:
        row = None
        if total <= cap.limit:
            row = await session.one(
                q.count_spend(dialect), cap=cap.key, day=day, amount=total, limit=cap.limit
            )
        if row is None:
            spent = await session.one(q.SPENT, cap=cap.key, day=day)
            raise SpendCapReached(
                scope=cap.scope,
                owner_id=cap.owner_id,
                limit=cap.limit,
                spent=0 if spent is None else int(spent["spent_units"]),
                day=day,
            )


async def _give_back_spend(session: Session, row: Row) -> None:
    """Inside the caller's transaction: a refunded message's ``spend_units`` go back to the
    counters it was counted on (``spend_caps``, on the day it was queued)."""
    if not row["spend_units"] or not row["spend_caps"]:
        return
    day = spend_day(row["created_at"])
    for key in str(row["spend_caps"]).split():
        await session.run(q.GIVE_BACK_SPEND, cap=key, day=day, amount=int(row["spend_units"]))


def _debit_entry(message: Message, *, balance: int) -> LedgerEntry:
    return LedgerEntry(
        id=new_id("led"),
        account_id=message.account_id,
        kind=LedgerKind.DEBIT,
        amount=-(message.price_units or 0),
        balance=balance,
        created_at=message.created_at,
        message_id=message.id,
    )


async def _refund(
    session: Session, account_id: str, message_id: str, amount: int, now: datetime
) -> None:
    """Inside the caller's transaction: give a message's price back, with a ledger entry."""
    row = await session.one(q.REFUND, account_id=account_id, amount=amount)
    assert row is not None  # a message's account is never deleted
    entry = LedgerEntry(
        id=new_id("led"),
        account_id=account_id,
        kind=LedgerKind.REFUND,
        amount=amount,
        balance=int(row["balance_units"]),
        created_at=now,
        message_id=message_id,
    )
    await session.run(q.INSERT_LEDGER, **ledger_values(entry))


# --- cursors ---------------------------------------------------------------------------------


#: An otpgate id (``model.new_id``): a lowercase type prefix, "_", 32 lowercase hex digits.
_ROW_ID = re.compile(r"[a-z]{2,8}_[0-9a-f]{32}")


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor from :func:`encode_cursor` names; ``InvalidRequest`` for anything
    :func:`encode_cursor` could not have written: a time that is not in its exact form (with a
    zone), or a row id that is not an otpgate id (a lone surrogate or a NUL would otherwise
    fail deep inside a query). Cursors are not signed: one made by hand in the exact form only
    moves where a page of the caller's own rows starts."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, row_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(stamp, str) or not isinstance(row_id, str):
            raise TypeError("cursor fields are not strings")
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None or created_at.isoformat() != stamp:
            raise ValueError("cursor time not as otpgate writes it")
        if not _ROW_ID.fullmatch(row_id):
            raise ValueError("cursor row id is not an otpgate id")
        return created_at, row_id
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest("cursor is not one this API returned", param="cursor") from exc


def _cursor_params(cursor: str | None, limit: int) -> dict[str, Any]:
    """Parameters of a paged statement: one row more than asked tells whether there is more."""
    params: dict[str, Any] = {"limit": limit + 1}
    if cursor is not None:
        params["cursor_at"], params["cursor_id"] = decode_cursor(cursor)
    return params


def _next_cursor(rows: Sequence[Row], limit: int) -> str | None:
    if len(rows) <= limit:
        return None
    last = rows[limit - 1]
    return encode_cursor(last["created_at"], last["id"])


# --- the store -------------------------------------------------------------------------------


class SqlStore:
    """Implements every storage Protocol of ``otpgate.domain.ports`` over an executor.

    Transactions are used where several statements must commit together; a lone statement is
    atomic on its own and runs without one (a transaction on PostgreSQL costs two more round
    trips, on SQLite two more lock operations).
    """

    def __init__(self, executor: Executor) -> None:
        self._x = executor
        self._record_failure = q.record_destination_failure(executor.dialect)

    @property
    def executor(self) -> Executor:
        return self._x

    async def ping(self) -> None:
        await self._x.ping()

    async def aclose(self) -> None:
        await self._x.aclose()

    # --- accounts and keys -------------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        try:
            await self._x.run(
                q.INSERT_ACCOUNT,
                id=account.id,
                name=account.name,
                username=account.username,
                is_admin=account.is_admin,
                created_at=account.created_at,
                billing=account.billing.value,
                balance_units=account.balance,
                daily_spend_cap=account.daily_spend_cap,
            )
        except Conflict:
            raise InvalidRequest("username is taken", param="username") from None

    async def get_account(self, account_id: str) -> Account | None:
        row = await self._x.one(q.ACCOUNT, id=account_id)
        return None if row is None else account_from_row(row)

    async def first_admin_account(self) -> Account | None:
        row = await self._x.one(q.FIRST_ADMIN)
        return None if row is None else account_from_row(row)

    async def list_accounts(self, *, limit: int, cursor: str | None) -> Page[Account]:
        rows = await self._x.all(
            q.accounts_page(cursor is not None), **_cursor_params(cursor, limit)
        )
        return Page([account_from_row(r) for r in rows[:limit]], _next_cursor(rows, limit))

    async def create_key(self, key: ApiKey) -> None:
        await self._x.run(
            q.INSERT_KEY,
            id=key.id,
            account_id=key.account_id,
            name=key.name,
            key_hash=key.key_hash,
            created_at=key.created_at,
            revoked_at=None,
        )

    async def get_key_by_hash(self, key_hash: str) -> tuple[ApiKey, Account] | None:
        row = await self._x.one(q.LIVE_KEY_WITH_ACCOUNT, key_hash=key_hash)
        if row is None:
            return None
        account = Account(
            id=row["account_id"],
            name=row["account_name"],
            username=row["username"],
            is_admin=bool(row["is_admin"]),
            created_at=row["account_created_at"],
            billing=BillingMode(row["billing"]),
            balance=int(row["balance_units"]),
            daily_spend_cap=_units(row["daily_spend_cap"]),
        )
        return key_from_row(row), account

    async def set_daily_spend_cap(self, account_id: str, cap: int | None) -> Account | None:
        row = await self._x.one(q.SET_ACCOUNT_CAP, account_id=account_id, cap=cap)
        return None if row is None else account_from_row(row)

    async def list_keys(self, account_id: str) -> Sequence[ApiKey]:
        rows = await self._x.all(q.KEYS_OF_ACCOUNT, account_id=account_id)
        return [key_from_row(r) for r in rows]

    async def revoke_key(self, account_id: str, key_id: str, now: datetime) -> bool:
        return bool(await self._x.run(q.REVOKE_KEY, key_id=key_id, account_id=account_id, now=now))

    # --- prices and credit -------------------------------------------------------------------

    async def price_table(self) -> dict[str, int]:
        rows = await self._x.all(q.PRICES)
        return {row["country"]: int(row["unit_price"]) for row in rows}

    async def replace_prices(self, prices: Mapping[str, int], now: datetime) -> None:
        async with self._x.transaction() as tx:
            await tx.run(q.DELETE_PRICES)
            for country, unit_price in sorted(prices.items()):
                await tx.run(q.INSERT_PRICE, country=country, unit_price=unit_price, updated_at=now)

    async def add_credit(
        self, account_id: str, amount: int, *, note: str | None, now: datetime
    ) -> LedgerEntry | None:
        async with self._x.transaction() as tx:
            row = await tx.one(q.TOP_UP, account_id=account_id, amount=amount)
            if row is None:
                return None
            entry = LedgerEntry(
                id=new_id("led"),
                account_id=account_id,
                kind=LedgerKind.TOPUP,
                amount=amount,
                balance=int(row["balance_units"]),
                created_at=now,
                note=note,
            )
            await tx.run(q.INSERT_LEDGER, **ledger_values(entry))
        return entry

    # --- daily spend caps --------------------------------------------------------------------

    async def spent(self, cap: str, day: str) -> int:
        row = await self._x.one(q.SPENT, cap=cap, day=day)
        return 0 if row is None else int(row["spent_units"])

    async def note_cap_reached(self, cap: str, day: str, now: datetime) -> bool:
        row = await self._x.one(q.mark_cap_reached(self._x.dialect), cap=cap, day=day, now=now)
        return row is not None

    async def list_ledger(
        self, account_id: str, *, limit: int, cursor: str | None
    ) -> Page[LedgerEntry]:
        rows = await self._x.all(
            q.ledger_page(cursor is not None),
            account_id=account_id,
            **_cursor_params(cursor, limit),
        )
        return Page([ledger_from_row(r) for r in rows[:limit]], _next_cursor(rows, limit))

    # --- plain messages ----------------------------------------------------------------------

    async def create_messages(
        self,
        messages: Sequence[PlainMessage],
        *,
        lease_until: datetime | None = None,
        caps: Sequence[SpendCap] = (),
    ) -> None:
        accounts = {item.message.account_id for item in messages}
        if len(accounts) > 1:
            raise ValueError("one batch belongs to one account")
        async with self._x.transaction() as tx:
            await _count_spend(tx, self._x.dialect, caps, [i.message for i in messages])
            for item in messages:
                lease = None if item.not_before is not None else lease_until
                values = message_values(item.message, item.body, lease, item.not_before, caps)
                await tx.run(q.INSERT_MESSAGE, **values)
            if messages:
                await _charge(tx, messages[0].message.account_id, [i.message for i in messages])

    async def cancel_scheduled(self, account_id: str, client_ref: str, now: datetime) -> int:
        async with self._x.transaction() as tx:
            rows = await tx.all(
                q.CANCEL_SCHEDULED, account_id=account_id, client_ref=client_ref, now=now
            )
            for row in rows:
                if row["price_units"] is not None:
                    await _refund(tx, account_id, row["id"], int(row["price_units"]), now)
                await _give_back_spend(tx, row)
        return len(rows)

    async def release_scheduled(self, account_id: str, client_ref: str, now: datetime) -> int:
        return await self._x.run(
            q.RELEASE_SCHEDULED, account_id=account_id, client_ref=client_ref, now=now
        )

    async def get_message(self, account_id: str, message_id: str) -> Message | None:
        row = await self._x.one(q.MESSAGE_OF_ACCOUNT, id=message_id, account_id=account_id)
        return None if row is None else message_from_row(row)

    # --- services ----------------------------------------------------------------------------

    async def create_service(self, service: Service) -> None:
        await self._x.run(
            q.INSERT_SERVICE,
            id=service.id,
            account_id=service.account_id,
            name=service.policy.name,
            policy=policy_to_json(service.policy),
            created_at=service.created_at,
            updated_at=service.updated_at,
            deleted_at=None,
            webhook_secret_sealed=None,
        )

    async def get_service(self, account_id: str, service_id: str) -> Service | None:
        row = await self._x.one(q.SERVICE, service_id=service_id, account_id=account_id)
        return None if row is None else service_from_row(row)

    async def get_service_by_name(self, account_id: str, name: str) -> Service | None:
        row = await self._x.one(q.SERVICE_BY_NAME, name=name, account_id=account_id)
        return None if row is None else service_from_row(row)

    async def list_services(
        self, account_id: str, *, limit: int, cursor: str | None
    ) -> Page[Service]:
        rows = await self._x.all(
            q.services_page(cursor is not None),
            account_id=account_id,
            **_cursor_params(cursor, limit),
        )
        return Page([service_from_row(r) for r in rows[:limit]], _next_cursor(rows, limit))

    async def update_service(
        self, account_id: str, service_id: str, policy: ServicePolicy, now: datetime
    ) -> Service | None:
        row = await self._x.one(
            q.UPDATE_SERVICE,
            service_id=service_id,
            account_id=account_id,
            name=policy.name,
            policy=policy_to_json(policy),
            now=now,
        )
        return None if row is None else service_from_row(row)

    async def delete_service(self, account_id: str, service_id: str, now: datetime) -> bool:
        async with self._x.transaction() as tx:
            deleted = await tx.run(
                q.DELETE_SERVICE, service_id=service_id, account_id=account_id, now=now
            )
            if deleted:
                await tx.run(q.CANCEL_PENDING_OF_SERVICE, service_id=service_id, now=now)
        return bool(deleted)

    # --- verifications -----------------------------------------------------------------------

    @staticmethod
    async def _messages_of(session: Session, ids: Sequence[str]) -> dict[str, list[Message]]:
        found: dict[str, list[Message]] = {vid: [] for vid in ids}
        if ids:
            rows = await session.all(q.messages_of(len(ids)), **q.id_params(list(ids)))
            for row in rows:
                found[row["verification_id"]].append(message_from_row(row))
        return found

    async def _with_messages(self, session: Session, row: Row | None) -> Verification | None:
        if row is None:
            return None
        messages = await self._messages_of(session, [row["id"]])
        return verification_from_row(row, messages[row["id"]])

    async def pending_for_destination(
        self, service_id: str, to: str, now: datetime
    ) -> tuple[Verification | None, Lockout]:
        # At most one row is pending per (service, to) (a partial unique index), so one read
        # answers the common case, and the rare expired one is closed by a write of its own.
        row = await self._x.one(q.PENDING_FOR_DESTINATION, service_id=service_id, to=to)
        assert row is not None  # the one-row parameter table always yields a row
        lockout = lockout_from_row(row)
        if row["id"] is None:
            return None, lockout
        if row["expires_at"] <= now:
            await self._x.run(
                q.CLOSE, id=row["id"], status=VerificationStatus.EXPIRED.value, now=now
            )
            return None, lockout
        return verification_from_row(row), lockout

    async def create_verification(
        self,
        verification: Verification,
        message: Message,
        *,
        body_masked: str,
        supersede: str | None = None,
        lease_until: datetime | None = None,
        caps: Sequence[SpendCap] = (),
    ) -> bool:
        charged = message.price_units is not None
        capped = bool(caps) and bool(message.spend_units)
        steps = q.create_verification(
            self._x.dialect, superseding=supersede is not None, charged=charged, capped=capped
        )
        params = {
            **verification_values(verification),
            **message_values(message, body_masked, lease_until, caps=caps),
            "superseded": supersede,
        }
        try:
            if len(steps) == 1:
                # One statement does it all, the debit included (PostgreSQL).
                if charged:
                    entry = _debit_entry(message, balance=0)
                    params.update(ledger_values(entry), account_id=message.account_id)
                    params["amount"] = message.price_units
                if not await self._x.run(steps[0], **params) and charged:
                    raise InsufficientCredit("the account's credit does not cover this message")
            else:
                async with self._x.transaction() as tx:
                    for step in steps:
                        await tx.run(step, **params)
                    await _count_spend(tx, self._x.dialect, caps, [message])
                    await _charge(tx, message.account_id, [message])
        except Conflict:
            return False
        return True

    async def record_resend(
        self,
        verification_id: str,
        message: Message,
        *,
        body_masked: str,
        now: datetime,
        interval_seconds: int,
        lease_until: datetime | None = None,
        caps: Sequence[SpendCap] = (),
    ) -> Verification | None:
        async with self._x.transaction() as tx:
            counted = await tx.one(
                q.COUNT_RESEND,
                id=verification_id,
                now=now,
                sent_before=now - timedelta(seconds=interval_seconds),
            )
            if counted is None:
                return None
            await _count_spend(tx, self._x.dialect, caps, [message])
            await tx.run(
                q.INSERT_MESSAGE, **message_values(message, body_masked, lease_until, caps=caps)
            )
            await _charge(tx, message.account_id, [message])
            return await self._with_messages(tx, await tx.one(q.VERIFICATION, id=verification_id))

    async def queue_fallback(
        self,
        verification_id: str,
        message: Message,
        *,
        body_masked: str,
        now: datetime,
        next_fallback_at: datetime | None,
        caps: Sequence[SpendCap] = (),
    ) -> bool:
        async with self._x.transaction() as tx:
            claimed = await tx.one(
                q.CLAIM_FALLBACK,
                id=verification_id,
                channel=message.channel.value,
                fallback_at=next_fallback_at,
                now=now,
            )
            if claimed is None:
                return False
            await _count_spend(tx, self._x.dialect, caps, [message])
            await tx.run(q.INSERT_MESSAGE, **message_values(message, body_masked, caps=caps))
            await _charge(tx, message.account_id, [message])
            return True

    async def fallback_due(self, now: datetime, *, limit: int) -> Sequence[Verification]:
        rows = await self._x.all(q.FALLBACK_DUE, now=now, limit=limit)
        return [verification_from_row(row) for row in rows]

    async def clear_fallback(self, verification_id: str) -> None:
        await self._x.run(q.CLEAR_FALLBACK, id=verification_id)

    async def get_verification(self, account_id: str, verification_id: str) -> Verification | None:
        row = await self._x.one(
            q.VERIFICATION_OF_ACCOUNT, id=verification_id, account_id=account_id
        )
        return await self._with_messages(self._x, row)

    async def latest_verification(
        self, account_id: str, service_id: str, to: str
    ) -> Verification | None:
        row = await self._x.one(
            q.LATEST_FOR_DESTINATION, account_id=account_id, service_id=service_id, to=to
        )
        return await self._with_messages(self._x, row)

    async def list_verifications(
        self,
        account_id: str,
        *,
        service_id: str | None,
        status: VerificationStatus | None,
        to: str | None,
        limit: int,
        cursor: str | None,
        now: datetime,
    ) -> Page[Verification]:
        statement = q.verifications_page(
            by_service=service_id is not None,
            by_to=to is not None,
            status=None if status is None else status.value,
            with_cursor=cursor is not None,
        )
        params: dict[str, Any] = {"account_id": account_id, **_cursor_params(cursor, limit)}
        if service_id is not None:
            params["service_id"] = service_id
        if to is not None:
            params["to"] = to
        if status is not None:
            params["status"] = status.value
            params["now"] = now
        rows = await self._x.all(statement, **params)
        shown = rows[:limit]
        messages = await self._messages_of(self._x, [r["id"] for r in shown])
        items = [verification_from_row(r, messages[r["id"]]) for r in shown]
        return Page(items, _next_cursor(rows, limit))

    async def verification_for_check(
        self, account_id: str, verification_id: str
    ) -> tuple[Verification | None, Lockout]:
        row = await self._x.one(q.FOR_CHECK, id=verification_id, account_id=account_id)
        if row is None:
            return None, NO_LOCKOUT
        return verification_from_row(row), lockout_from_row(row)

    async def approve(self, verification_id: str, now: datetime, *, clear_failures: bool) -> bool:
        if not clear_failures:  # the common case: one statement, atomic on its own
            return await self._x.one(q.APPROVE, id=verification_id, now=now) is not None
        # The approval and the reset of the destination's failure count commit together.
        async with self._x.transaction() as tx:
            row = await tx.one(q.APPROVE, id=verification_id, now=now)
            if row is None:
                return False
            await tx.run(q.CLEAR_DESTINATION_FAILURES, service_id=row["service_id"], to=row["to"])
        return True

    async def record_failed_check(self, verification_id: str, now: datetime) -> int | None:
        row = await self._x.one(q.COUNT_FAILED_CHECK, id=verification_id, now=now)
        return None if row is None else int(row["check_attempts"])

    async def close(self, verification_id: str, status: VerificationStatus, now: datetime) -> bool:
        return (
            await self._x.one(q.CLOSE, id=verification_id, status=status.value, now=now) is not None
        )

    async def expire_due(self, now: datetime) -> int:
        return await self._x.run(q.EXPIRE_DUE, now=now)

    async def lockout(self, service_id: str, to: str) -> Lockout:
        row = await self._x.one(q.LOCKOUT, service_id=service_id, to=to)
        if row is None:
            return NO_LOCKOUT
        return Lockout(failures=int(row["consecutive_failures"]), locked_until=row["locked_until"])

    async def record_destination_failure(
        self, service_id: str, to: str, *, now: datetime, threshold: int, lock_seconds: int
    ) -> int:
        row = await self._x.one(
            self._record_failure,
            service_id=service_id,
            to=to,
            threshold=threshold,
            lock_until=now + timedelta(seconds=lock_seconds),
        )
        assert row is not None  # an upsert always returns its row
        count = int(row["consecutive_failures"])
        # A count of 0 means this failure reached the threshold, locked, and restarted it.
        return threshold if count == 0 else count

    async def reset_destination_failures(self, service_id: str, to: str) -> None:
        await self._x.run(q.CLEAR_DESTINATION_FAILURES, service_id=service_id, to=to)

    # --- the outbox --------------------------------------------------------------------------

    async def claim_due(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[ClaimedMessage]:
        async with self._x.transaction() as tx:
            rows = await tx.all(
                q.CLAIM, now=now, lease_until=now + timedelta(seconds=lease_seconds), limit=limit
            )
            if not rows:
                return []
            ver_ids = sorted({r["verification_id"] for r in rows if r["verification_id"]})
            found = (
                await tx.all(q.verifications_by_id(len(ver_ids)), **q.id_params(ver_ids))
                if ver_ids
                else []
            )
            verifications = {r["id"]: r for r in found}
            svc_ids = sorted({r["service_id"] for r in found})
            services = {
                r["id"]: r
                for r in (
                    await tx.all(q.services_by_id(len(svc_ids)), **q.id_params(svc_ids))
                    if svc_ids
                    else []
                )
            }
        claimed = []
        for row in rows:
            ver = verifications.get(row["verification_id"])
            svc = services.get(ver["service_id"]) if ver is not None else None
            claimed.append(
                ClaimedMessage(
                    message=message_from_row(row),
                    verification=None if ver is None else verification_from_row(ver),
                    service=None if svc is None else service_from_row(svc),
                    lease_until=row["lease_until"],
                    # A plain SMS is sent as stored; a verification's body is masked.
                    body=row["body_masked"] if row["verification_id"] is None else None,
                )
            )
        return claimed

    async def mark_sent(
        self, message_id: str, *, provider: str, receipt: SendReceipt, now: datetime
    ) -> None:
        """The mark may share its commit with other writes (see ``Executor.defer``); it
        returns once it is committed."""
        await self._x.defer(
            q.MARK_SENT,
            id=message_id,
            provider=provider,
            provider_ref=receipt.provider_ref,
            entry=Attempt(provider, now, AttemptOutcome.SENT).to_line(),
            now=now,
        )

    async def mark_retry(
        self,
        message_id: str,
        *,
        provider: str | None,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
        outcome: AttemptOutcome = AttemptOutcome.RETRY,
        counted: bool = True,
        lease_until: datetime | None = None,
    ) -> None:
        await self._x.run(
            q.MARK_RETRY if lease_until is None else q.MARK_RETRY_LEASED,
            id=message_id,
            uncounted=0 if counted else 1,
            provider=provider,
            entry=Attempt(provider, now, outcome, error[:_ERROR_LENGTH]).to_line(),
            error=error[:_ERROR_LENGTH],
            next_attempt_at=next_attempt_at,
            now=now,
            **_lease(lease_until),
        )

    async def mark_failed(
        self,
        message_id: str,
        *,
        provider: str | None,
        error: str,
        now: datetime,
        lease_until: datetime | None = None,
    ) -> Verification | None:
        async with self._x.transaction() as tx:
            row = await tx.one(
                q.MARK_FAILED if lease_until is None else q.MARK_FAILED_LEASED,
                **_lease(lease_until),
                id=message_id,
                provider=provider,
                entry=Attempt(
                    provider, now, AttemptOutcome.FAILED, error[:_ERROR_LENGTH]
                ).to_line(),
                error=error[:_ERROR_LENGTH],
                now=now,
            )
            if row is None:
                return None
            if row["price_units"] is not None:
                await _refund(tx, row["account_id"], message_id, int(row["price_units"]), now)
            await _give_back_spend(tx, row)
            if row["verification_id"] is None:
                return None
            verification_id = row["verification_id"]
            alive = await tx.one(
                q.OTHER_LIVE_MESSAGES, verification_id=verification_id, id=message_id
            )
            if alive is not None and alive["n"]:
                return None
            closed = await tx.one(
                q.CLOSE, id=verification_id, status=VerificationStatus.FAILED.value, now=now
            )
            if closed is None:
                return None
            return await self._with_messages(tx, await tx.one(q.VERIFICATION, id=verification_id))

    async def apply_report(self, provider: str, report: DeliveryReport, now: datetime) -> bool:
        if report.status is not None:
            async with self._x.transaction() as tx:
                changed = await tx.one(
                    q.APPLY_REPORT,
                    provider=provider,
                    provider_ref=report.provider_ref,
                    status=report.status.value,
                    error=None if report.detail is None else report.detail[:_ERROR_LENGTH],
                    now=now,
                )
                if changed is not None and changed["ack_url"]:
                    # The caller asked for its reports: owed in the same transaction, so a
                    # crash cannot apply the report and lose the call.
                    await tx.run(
                        q.INSERT_CALLBACK,
                        **callback_values(
                            Callback(
                                id=new_id("cbk"),
                                account_id=changed["account_id"],
                                message_id=changed["id"],
                                url=changed["ack_url"],
                                params={
                                    "status": report.status.value,
                                    "detail": report.detail or "",
                                    "client_ref": changed["client_ref"] or "",
                                    "to": changed["to"],
                                    "reported_at": now.isoformat(),
                                },
                                attempts=0,
                                created_at=now,
                            )
                        ),
                    )
                if changed is not None and changed["verification_id"]:
                    await self._report_event(tx, provider, report.status, changed, now)
            if changed is not None:
                return True
        known = await self._x.one(
            q.MESSAGE_BY_REFERENCE, provider=provider, provider_ref=report.provider_ref
        )
        return known is not None

    @staticmethod
    async def _report_event(
        tx: Session, provider: str, status: MessageStatus, changed: Row, now: datetime
    ) -> None:
        """Inside the report's transaction: queue its event when the message's service has a
        webhook (a service without one costs this one read and writes nothing)."""
        service = await tx.one(
            q.SERVICE_OF_VERIFICATION, verification_id=changed["verification_id"]
        )
        if service is None:
            return
        url = (service["policy"] or {}).get("webhook_url")
        event = message_event(
            message_id=changed["id"],
            verification_id=changed["verification_id"],
            service_id=service["id"],
            account_id=changed["account_id"],
            channel=changed["channel"],
            status=status,
            provider=provider,
        )
        if url and event is not None:
            await tx.run(q.INSERT_EVENT, **event_values(record_of(event, url, now)))

    # --- events and the audit log ------------------------------------------------------------

    async def insert_event(self, record: EventRecord) -> None:
        await self._x.run(q.INSERT_EVENT, **event_values(record))

    async def claim_events(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[ClaimedEvent]:
        rows = await self._x.all(
            q.CLAIM_EVENTS,
            now=now,
            lease_until=now + timedelta(seconds=lease_seconds),
            limit=limit,
        )
        if not rows:
            return []
        ids = sorted({r["service_id"] for r in rows if r["service_id"]})
        sealed = {
            r["id"]: r["webhook_secret_sealed"]
            for r in (
                await self._x.all(q.webhook_secrets_of(len(ids)), **q.id_params(ids)) if ids else []
            )
        }
        return [
            ClaimedEvent(event_from_row(row), sealed.get(row["service_id"] or "")) for row in rows
        ]

    async def finish_event(
        self, event_id: str, *, delivered: bool, error: str | None, now: datetime
    ) -> None:
        await self._x.run(
            q.FINISH_EVENT,
            id=event_id,
            status=(DeliveryState.DELIVERED if delivered else DeliveryState.FAILED).value,
            error=None if error is None else error[:_ERROR_LENGTH],
            delivered_at=now if delivered else None,
            now=now,
        )

    async def retry_event(
        self, event_id: str, *, error: str, next_attempt_at: datetime, now: datetime
    ) -> None:
        await self._x.run(
            q.RETRY_EVENT,
            id=event_id,
            error=error[:_ERROR_LENGTH],
            next_attempt_at=next_attempt_at,
            now=now,
        )

    async def list_events(
        self,
        account_id: str | None,
        *,
        service_id: str | None,
        type: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[EventRecord]:
        statement = q.events_page(
            by_account=account_id is not None,
            by_service=service_id is not None,
            by_type=type is not None,
            with_cursor=cursor is not None,
        )
        params = _cursor_params(cursor, limit)
        for name, value in (("account_id", account_id), ("service_id", service_id), ("type", type)):
            if value is not None:
                params[name] = value
        rows = await self._x.all(statement, **params)
        return Page([event_from_row(r) for r in rows[:limit]], _next_cursor(rows, limit))

    async def set_webhook_secret(
        self, account_id: str, service_id: str, sealed: bytes, now: datetime
    ) -> bool:
        changed = await self._x.run(
            q.SET_WEBHOOK_SECRET,
            service_id=service_id,
            account_id=account_id,
            sealed=sealed,
            now=now,
        )
        return bool(changed)

    async def insert_audit(self, record: AuditRecord) -> None:
        await self._x.run(
            q.INSERT_AUDIT,
            id=record.id,
            account_id=record.account_id,
            actor=record.actor,
            action=record.action,
            target=record.target,
            before=None if record.before is None else dict(record.before),
            after=None if record.after is None else dict(record.after),
            created_at=record.created_at,
        )

    async def list_audit(
        self, account_id: str | None, *, action: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRecord]:
        statement = q.audit_page(
            by_account=account_id is not None,
            by_action=action is not None,
            with_cursor=cursor is not None,
        )
        params = _cursor_params(cursor, limit)
        if account_id is not None:
            params["account_id"] = account_id
        if action is not None:
            params["action"] = action
        rows = await self._x.all(statement, **params)
        return Page([audit_from_row(r) for r in rows[:limit]], _next_cursor(rows, limit))

    # --- callbacks ---------------------------------------------------------------------------

    async def claim_callbacks(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[Callback]:
        rows = await self._x.all(
            q.CLAIM_CALLBACKS,
            now=now,
            lease_until=now + timedelta(seconds=lease_seconds),
            limit=limit,
        )
        return [callback_from_row(row) for row in rows]

    async def finish_callback(
        self, callback_id: str, *, delivered: bool, error: str | None, now: datetime
    ) -> None:
        await self._x.run(
            q.FINISH_CALLBACK,
            id=callback_id,
            status="done" if delivered else "failed",
            error=None if error is None else error[:_ERROR_LENGTH],
            now=now,
        )

    async def retry_callback(
        self, callback_id: str, *, error: str, next_attempt_at: datetime, now: datetime
    ) -> None:
        await self._x.run(
            q.RETRY_CALLBACK,
            id=callback_id,
            error=error[:_ERROR_LENGTH],
            next_attempt_at=next_attempt_at,
            now=now,
        )

    # --- idempotency keys --------------------------------------------------------------------

    async def begin(
        self, account_id: str, key: str, request_hash: str, now: datetime
    ) -> tuple[str, int | None, Any]:
        for _ in range(3):
            try:
                await self._x.run(
                    q.INSERT_IDEMPOTENCY_KEY,
                    account_id=account_id,
                    key=key,
                    request_hash=request_hash,
                    state="in_progress",
                    response_status=None,
                    response_body=None,
                    created_at=now,
                )
                return "new", None, None
            except Conflict:
                pass
            row = await self._x.one(q.IDEMPOTENCY_KEY, account_id=account_id, key=key)
            if row is None:
                continue  # forgotten or abandoned since our insert failed: try again
            if row["created_at"] <= now - IDEMPOTENCY_TTL or (
                row["state"] != "done" and row["created_at"] <= now - IDEMPOTENCY_STALE
            ):
                # Past its day, or left in progress by a process that died: take it over.
                await self._x.run(
                    q.DELETE_STALE_IDEMPOTENCY_KEY,
                    account_id=account_id,
                    key=key,
                    created_at=row["created_at"],
                )
                continue
            if row["request_hash"] != request_hash:
                raise IdempotencyKeyMismatch(
                    "this Idempotency-Key was used with a different request",
                    param="Idempotency-Key",
                )
            if row["state"] != "done":
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is still running", retry_after=1
                )
            return "done", row["response_status"], row["response_body"]
        raise IdempotencyInProgress("Idempotency-Key is contended; retry", retry_after=1)

    async def finish(self, account_id: str, key: str, status: int, body: Any) -> None:
        await self._x.run(
            q.FINISH_IDEMPOTENCY_KEY,
            account_id=account_id,
            key=key,
            response_status=status,
            response_body=body,
        )

    async def forget_idempotency_keys(self, now: datetime) -> int:
        return await self._x.run(q.FORGET_IDEMPOTENCY_KEYS, before=now - IDEMPOTENCY_TTL)

    async def abandon(self, account_id: str, key: str) -> None:
        await self._x.run(q.ABANDON_IDEMPOTENCY_KEY, account_id=account_id, key=key)

    # --- the SMS-pumping defence -------------------------------------------------------------

    async def prefix_conversion(
        self, prefix: str, *, since: datetime, matured: datetime
    ) -> Conversion:
        row = await self._x.one(
            q.PREFIX_CONVERSION,
            low=prefix,
            high=prefix + ":",  # ":" sorts right after "9"
            length=len(prefix) + 3,
            since=since,
            matured=matured,
        )
        return _conversion(row)

    async def calling_code_conversion(
        self, calling_code: str, *, since: datetime, matured: datetime
    ) -> Conversion:
        row = await self._x.one(
            q.COUNTRY_CONVERSION,
            low=calling_code,
            high=calling_code + ":",
            since=since,
            matured=matured,
        )
        return _conversion(row)

    async def blocks_of(self, values: Sequence[str]) -> Sequence[Block]:
        if not values:
            return []
        rows = await self._x.all(q.blocks_for(len(values)), **q.id_params(list(values)))
        return [block_from_row(row) for row in rows]

    async def create_block(self, block: Block) -> bool:
        try:
            await self._x.run(
                q.INSERT_BLOCK,
                id=block.id,
                kind=block.kind.value,
                value=block.value,
                country=block.country,
                reason=block.reason,
                seq=block.seq,
                automatic=block.automatic,
                created_at=block.created_at,
                expires_at=block.expires_at,
                lifted_at=block.lifted_at,
            )
        except Conflict:
            return False
        return True

    async def last_block_seq(self, value: str) -> int:
        row = await self._x.one(q.LAST_SEQ, value=value)
        return 0 if row is None else int(row["seq"] or 0)

    async def get_block(self, block_id: str) -> Block | None:
        row = await self._x.one(q.BLOCK, id=block_id)
        return None if row is None else block_from_row(row)

    async def blocks_in_force(self, now: datetime) -> Sequence[Block]:
        return [block_from_row(row) for row in await self._x.all(q.BLOCKS_IN_FORCE, now=now)]

    async def lift_block(self, block_id: str, now: datetime) -> bool:
        return await self._x.one(q.LIFT_BLOCK, id=block_id, now=now) is not None

    async def list_entries(self, account_id: str) -> Sequence[ListEntry]:
        rows = await self._x.all(q.LIST_ENTRIES, account_id=account_id)
        return [list_entry_from_row(row) for row in rows]

    async def add_list_entry(self, entry: ListEntry) -> ListEntry:
        try:
            await self._x.run(
                q.INSERT_LIST_ENTRY,
                id=entry.id,
                account_id=entry.account_id,
                list=entry.list.value,
                kind=entry.kind.value,
                value=entry.value,
                created_at=entry.created_at,
            )
        except Conflict:
            for existing in await self.list_entries(entry.account_id):
                if existing.list is entry.list and existing.value == entry.value:
                    return existing
            raise  # removed between the insert and the read: let the caller see the conflict
        return entry

    async def remove_list_entry(
        self, account_id: str, name: ListName, entry_id: str
    ) -> ListEntry | None:
        async with self._x.transaction() as tx:
            row = await tx.one(q.LIST_ENTRY, account_id=account_id, list=name.value, id=entry_id)
            if row is None:
                return None
            await tx.run(q.DELETE_LIST_ENTRY, account_id=account_id, list=name.value, id=entry_id)
        return list_entry_from_row(row)


def _lease(lease_until: datetime | None) -> dict[str, datetime]:
    """The ``lease_until`` parameter of a ``*_LEASED`` mark, when the caller holds a lease."""
    return {} if lease_until is None else {"lease_until": lease_until}
