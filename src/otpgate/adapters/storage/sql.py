"""The storage port on SQLAlchemy Core, for SQLite and PostgreSQL alike.

Every state change that must be atomic is one conditional ``UPDATE … WHERE status = 'pending'
AND …``: the database, not the Python process, decides which of many concurrent checks wins,
so single use (S4) and the attempt cap (S7) hold across processes and nodes.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from otpgate.adapters.storage import tables as t
from otpgate.domain.model import (
    Account,
    ApiKey,
    Channel,
    CodeType,
    Message,
    MessageStatus,
    SendReceipt,
    Service,
    ServicePolicy,
    Verification,
    VerificationStatus,
)
from otpgate.domain.ports import ClaimedMessage, DeliveryReport, Page
from otpgate.errors import (
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    InvalidRequest,
    Unavailable,
)

PENDING = VerificationStatus.PENDING.value
IDEMPOTENCY_TTL = timedelta(hours=24)
#: A key still "in progress" after this long belongs to a request whose process died; a retry
#: may take it over instead of getting 409 for a day.
IDEMPOTENCY_STALE = timedelta(minutes=5)


# -------------------------------------------------------------------------------------------
# Row mapping


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
    }


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
    )


def account_from_row(row: Any) -> Account:
    return Account(
        id=row.id,
        name=row.name,
        username=row.username,
        is_admin=bool(row.is_admin),
        created_at=row.created_at,
    )


def key_and_account_from_row(row: Any) -> tuple[ApiKey, Account]:
    """A key joined with its account (account columns prefixed ``account_`` where they clash)."""
    key = ApiKey(
        id=row.id,
        account_id=row.account_id,
        name=row.name,
        key_hash=row.key_hash,
        created_at=row.created_at,
    )
    account = Account(
        id=row.account_id,
        name=row.account_name,
        username=row.username,
        is_admin=bool(row.is_admin),
        created_at=row.account_created_at,
    )
    return key, account


def service_from_row(row: Any) -> Service:
    return Service(
        id=row.id,
        account_id=row.account_id,
        policy=policy_from_json(row.policy),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def message_from_row(row: Any) -> Message:
    return Message(
        id=row.id,
        account_id=row.account_id,
        verification_id=row.verification_id,
        channel=Channel(row.channel),
        to=row.to,
        status=MessageStatus(row.status),
        locale=row.locale,
        segments=row.segments,
        encoding=row.encoding,
        created_at=row.created_at,
        updated_at=row.updated_at,
        provider=row.provider,
        provider_ref=row.provider_ref,
        price=row.price,
        error=row.error,
        attempts=row.attempts,
    )


def verification_from_row(row: Any, messages: Sequence[Message] = ()) -> Verification:
    return Verification(
        id=row.id,
        account_id=row.account_id,
        service_id=row.service_id,
        to=row.to,
        channel=Channel(row.channel),
        status=VerificationStatus(row.status),
        code_digest=bytes(row.code_digest),
        code_sealed=None if row.code_sealed is None else bytes(row.code_sealed),
        locale=row.locale,
        created_at=row.created_at,
        updated_at=row.updated_at,
        expires_at=row.expires_at,
        last_sent_at=row.last_sent_at,
        check_attempts=row.check_attempts,
        max_check_attempts=row.max_check_attempts,
        send_attempts=row.send_attempts,
        max_send_attempts=row.max_send_attempts,
        context=row.context,
        metadata=row.metadata or {},
        messages=tuple(messages),
    )


def verification_values(v: Verification) -> dict[str, Any]:
    return {
        "id": v.id,
        "account_id": v.account_id,
        "service_id": v.service_id,
        "to": v.to,
        "channel": v.channel.value,
        "status": v.status.value,
        "code_digest": v.code_digest,
        "code_sealed": v.code_sealed,
        "locale": v.locale,
        "context": v.context,
        "metadata": v.metadata,
        "check_attempts": v.check_attempts,
        "max_check_attempts": v.max_check_attempts,
        "send_attempts": v.send_attempts,
        "max_send_attempts": v.max_send_attempts,
        "created_at": v.created_at,
        "updated_at": v.updated_at,
        "expires_at": v.expires_at,
        "last_sent_at": v.last_sent_at,
    }


def message_values(
    m: Message, body_masked: str, lease_until: datetime | None = None
) -> dict[str, Any]:
    return {
        "id": m.id,
        "account_id": m.account_id,
        "verification_id": m.verification_id,
        "channel": m.channel.value,
        "to": m.to,
        "status": m.status.value,
        "locale": m.locale,
        "body_masked": body_masked,
        "segments": m.segments,
        "encoding": m.encoding,
        "provider": m.provider,
        "provider_ref": m.provider_ref,
        "price": m.price,
        "error": m.error,
        "attempts": m.attempts if lease_until is None else m.attempts + 1,
        "next_attempt_at": m.created_at,
        "lease_until": lease_until,
        "created_at": m.created_at,
        "updated_at": m.updated_at,
    }


def claimed_from_rows(
    rows: Sequence[Any], verifications: Mapping[str, Any], services: Mapping[str, Any]
) -> list[ClaimedMessage]:
    """Claimed outbox rows with their verification and service rows, as the dispatcher wants
    them (a row whose verification or service is gone gets ``None``)."""
    claimed = []
    for row in rows:
        ver = verifications.get(row.verification_id)
        svc = services.get(ver.service_id) if ver is not None else None
        claimed.append(
            ClaimedMessage(
                message=message_from_row(row),
                verification=None if ver is None else verification_from_row(ver),
                service=None if svc is None else service_from_row(svc),
            )
        )
    return claimed


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The position a cursor from :func:`encode_cursor` names; ``InvalidRequest`` for anything
    else, including a well-formed one whose time has no zone (or no time at all): comparing it
    with stored times would otherwise fail deep inside a query."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        stamp, row_id = json.loads(base64.urlsafe_b64decode(padded))
        if not isinstance(stamp, str) or not isinstance(row_id, str):
            raise TypeError("cursor fields are not strings")
        created_at = datetime.fromisoformat(stamp)
        if created_at.tzinfo is None or "T" not in stamp:
            raise ValueError("cursor time without a zone")
        return created_at, row_id
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidRequest("cursor is not one this API returned", param="cursor") from exc


# -------------------------------------------------------------------------------------------


class SqlStorage:
    """Implements ``otpgate.domain.ports.Storage``. ``mask_body`` is applied by callers: this
    class stores whatever masked body it is given and never sees a plain code."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @contextlib.asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; connection-level failures become ``Unavailable`` (S24)."""
        try:
            async with self._engine.begin() as conn:
                yield conn
        except IntegrityError:
            raise
        except (OperationalError, InterfaceError, PoolTimeout, OSError, TimeoutError) as exc:
            raise Unavailable("storage is unavailable; retry shortly", retry_after=1) from exc
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise Unavailable("storage connection lost; retry shortly", retry_after=1) from exc
            raise

    def _insert(self, table: Any) -> Any:
        return (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(table)

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(select(1))

    async def aclose(self) -> None:
        await self._engine.dispose()

    # --- accounts and keys ------------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        try:
            async with self._tx() as conn:
                await conn.execute(
                    insert(t.accounts).values(
                        id=account.id,
                        name=account.name,
                        username=account.username,
                        is_admin=account.is_admin,
                        created_at=account.created_at,
                    )
                )
        except IntegrityError as exc:
            raise InvalidRequest("username is taken", param="username") from exc

    async def get_account(self, account_id: str) -> Account | None:
        async with self._tx() as conn:
            row = (
                await conn.execute(select(t.accounts).where(t.accounts.c.id == account_id))
            ).first()
        return None if row is None else account_from_row(row)

    async def first_admin_account(self) -> Account | None:
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(t.accounts)
                    .where(t.accounts.c.is_admin.is_(True))
                    .order_by(t.accounts.c.created_at)
                    .limit(1)
                )
            ).first()
        return None if row is None else account_from_row(row)

    async def list_accounts(self, *, limit: int, cursor: str | None) -> Page[Account]:
        query = select(t.accounts)
        rows = await self._page(query, t.accounts, limit=limit, cursor=cursor)
        return Page([account_from_row(r) for r in rows[:limit]], self._next(rows, limit))

    async def create_key(self, key: ApiKey) -> None:
        async with self._tx() as conn:
            await conn.execute(
                insert(t.api_keys).values(
                    id=key.id,
                    account_id=key.account_id,
                    name=key.name,
                    key_hash=key.key_hash,
                    created_at=key.created_at,
                    revoked_at=None,
                )
            )

    async def get_key_by_hash(self, key_hash: str) -> tuple[ApiKey, Account] | None:
        k, a = t.api_keys, t.accounts
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(
                        k.c.id,
                        k.c.account_id,
                        k.c.name,
                        k.c.key_hash,
                        k.c.created_at,
                        a.c.name.label("account_name"),
                        a.c.username,
                        a.c.is_admin,
                        a.c.created_at.label("account_created_at"),
                    )
                    .join(a, a.c.id == k.c.account_id)
                    .where(k.c.key_hash == key_hash, k.c.revoked_at.is_(None))
                )
            ).first()
        if row is None:
            return None
        return key_and_account_from_row(row)

    async def list_keys(self, account_id: str) -> Sequence[ApiKey]:
        async with self._tx() as conn:
            rows = (
                await conn.execute(
                    select(t.api_keys)
                    .where(t.api_keys.c.account_id == account_id)
                    .order_by(t.api_keys.c.created_at)
                )
            ).all()
        return [
            ApiKey(
                id=r.id,
                account_id=r.account_id,
                name=r.name,
                key_hash=r.key_hash,
                created_at=r.created_at,
                revoked_at=r.revoked_at,
            )
            for r in rows
        ]

    async def revoke_key(self, account_id: str, key_id: str, now: datetime) -> bool:
        async with self._tx() as conn:
            result = await conn.execute(
                update(t.api_keys)
                .where(
                    t.api_keys.c.id == key_id,
                    t.api_keys.c.account_id == account_id,
                    t.api_keys.c.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
        return bool(result.rowcount)

    # --- services ------------------------------------------------------------------------

    async def create_service(self, service: Service) -> None:
        async with self._tx() as conn:
            await conn.execute(
                insert(t.services).values(
                    id=service.id,
                    account_id=service.account_id,
                    name=service.policy.name,
                    policy=policy_to_json(service.policy),
                    created_at=service.created_at,
                    updated_at=service.updated_at,
                    deleted_at=None,
                )
            )

    def _live_service(self, account_id: str) -> Any:
        s = t.services
        return select(s).where(s.c.account_id == account_id, s.c.deleted_at.is_(None))

    async def get_service(self, account_id: str, service_id: str) -> Service | None:
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    self._live_service(account_id).where(t.services.c.id == service_id)
                )
            ).first()
        return None if row is None else service_from_row(row)

    async def list_services(
        self, account_id: str, *, limit: int, cursor: str | None
    ) -> Page[Service]:
        rows = await self._page(
            self._live_service(account_id), t.services, limit=limit, cursor=cursor
        )
        return Page([service_from_row(r) for r in rows[:limit]], self._next(rows, limit))

    async def update_service(
        self, account_id: str, service_id: str, policy: ServicePolicy, now: datetime
    ) -> Service | None:
        s = t.services
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(s)
                    .where(
                        s.c.id == service_id, s.c.account_id == account_id, s.c.deleted_at.is_(None)
                    )
                    .values(name=policy.name, policy=policy_to_json(policy), updated_at=now)
                    .returning(*s.c)
                )
            ).first()
        return None if row is None else service_from_row(row)

    async def delete_service(self, account_id: str, service_id: str, now: datetime) -> bool:
        s, v = t.services, t.verifications
        async with self._tx() as conn:
            result = await conn.execute(
                update(s)
                .where(s.c.id == service_id, s.c.account_id == account_id, s.c.deleted_at.is_(None))
                .values(deleted_at=now, updated_at=now)
            )
            if result.rowcount:
                # A deleted service's codes must not stay usable or recoverable.
                await conn.execute(
                    update(v)
                    .where(v.c.service_id == service_id, v.c.status == PENDING)
                    .values(
                        status=VerificationStatus.CANCELED.value, code_sealed=None, updated_at=now
                    )
                )
        return bool(result.rowcount)

    # --- verifications ---------------------------------------------------------------------

    async def _messages_for(
        self, conn: AsyncConnection, verification_ids: Sequence[str]
    ) -> dict[str, list[Message]]:
        found: dict[str, list[Message]] = {vid: [] for vid in verification_ids}
        if not verification_ids:
            return found
        rows = (
            await conn.execute(
                select(t.messages)
                .where(t.messages.c.verification_id.in_(verification_ids))
                .order_by(t.messages.c.created_at, t.messages.c.id)
            )
        ).all()
        for row in rows:
            found[row.verification_id].append(message_from_row(row))
        return found

    async def _load_verification(self, conn: AsyncConnection, where: Any) -> Verification | None:
        row = (await conn.execute(select(t.verifications).where(where))).first()
        if row is None:
            return None
        messages = await self._messages_for(conn, [row.id])
        return verification_from_row(row, messages[row.id])

    async def expire_and_find_pending(
        self, service_id: str, to: str, now: datetime
    ) -> Verification | None:
        v = t.verifications
        async with self._tx() as conn:
            await conn.execute(
                update(v)
                .where(
                    v.c.service_id == service_id,
                    v.c.to == to,
                    v.c.status == PENDING,
                    v.c.expires_at <= now,
                )
                .values(status=VerificationStatus.EXPIRED.value, code_sealed=None, updated_at=now)
            )
            return await self._load_verification(
                conn, and_(v.c.service_id == service_id, v.c.to == to, v.c.status == PENDING)
            )

    async def create_verification(
        self,
        verification: Verification,
        message: Message,
        *,
        body_masked: str,
        supersede: str | None = None,
        lease_until: datetime | None = None,
    ) -> bool:
        v = t.verifications
        try:
            async with self._tx() as conn:
                if supersede is not None:
                    await conn.execute(
                        update(v)
                        .where(v.c.id == supersede, v.c.status == PENDING)
                        .values(
                            status=VerificationStatus.CANCELED.value,
                            code_sealed=None,
                            updated_at=verification.created_at,
                        )
                    )
                await conn.execute(insert(v).values(**verification_values(verification)))
                await conn.execute(
                    insert(t.messages).values(**message_values(message, body_masked, lease_until))
                )
        except IntegrityError:
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
    ) -> Verification | None:
        v = t.verifications
        async with self._tx() as conn:
            counted = (
                await conn.execute(
                    update(v)
                    .where(
                        v.c.id == verification_id,
                        v.c.status == PENDING,
                        v.c.expires_at > now,
                        v.c.send_attempts < v.c.max_send_attempts,
                        v.c.last_sent_at <= now - timedelta(seconds=interval_seconds),
                    )
                    .values(send_attempts=v.c.send_attempts + 1, last_sent_at=now, updated_at=now)
                    .returning(v.c.id)
                )
            ).first()
            if counted is None:
                return None
            await conn.execute(
                insert(t.messages).values(**message_values(message, body_masked, lease_until))
            )
            return await self._load_verification(conn, v.c.id == verification_id)

    async def get_verification(self, account_id: str, verification_id: str) -> Verification | None:
        v = t.verifications
        async with self._tx() as conn:
            return await self._load_verification(
                conn, and_(v.c.id == verification_id, v.c.account_id == account_id)
            )

    async def latest_verification(
        self, account_id: str, service_id: str, to: str
    ) -> Verification | None:
        v = t.verifications
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(v)
                    .where(v.c.account_id == account_id, v.c.service_id == service_id, v.c.to == to)
                    .order_by(v.c.created_at.desc(), v.c.id.desc())
                    .limit(1)
                )
            ).first()
            if row is None:
                return None
            messages = await self._messages_for(conn, [row.id])
        return verification_from_row(row, messages[row.id])

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
        v = t.verifications
        query = select(v).where(v.c.account_id == account_id)
        if service_id is not None:
            query = query.where(v.c.service_id == service_id)
        if to is not None:
            query = query.where(v.c.to == to)
        if status is VerificationStatus.EXPIRED:
            # Reported status, not stored status: a pending row past its expiry is expired.
            query = query.where(
                or_(v.c.status == status.value, and_(v.c.status == PENDING, v.c.expires_at <= now))
            )
        elif status is VerificationStatus.PENDING:
            query = query.where(v.c.status == PENDING, v.c.expires_at > now)
        elif status is not None:
            query = query.where(v.c.status == status.value)
        async with self._tx() as conn:
            rows = await self._page(query, v, limit=limit, cursor=cursor, conn=conn)
            messages = await self._messages_for(conn, [r.id for r in rows[:limit]])
        items = [verification_from_row(r, messages[r.id]) for r in rows[:limit]]
        return Page(items, self._next(rows, limit))

    async def _page(
        self,
        query: Any,
        table: Any,
        *,
        limit: int,
        cursor: str | None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[Any]:
        """Newest first; one row more than asked tells whether there is a next page."""
        if cursor is not None:
            created_at, row_id = decode_cursor(cursor)
            query = query.where(tuple_(table.c.created_at, table.c.id) < tuple_(created_at, row_id))
        query = query.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(limit + 1)
        if conn is not None:
            return (await conn.execute(query)).all()
        async with self._tx() as own:
            return (await own.execute(query)).all()

    @staticmethod
    def _next(rows: Sequence[Any], limit: int) -> str | None:
        if len(rows) <= limit:
            return None
        last = rows[limit - 1]
        return encode_cursor(last.created_at, last.id)

    async def verification_for_check(
        self, account_id: str, verification_id: str, now: datetime
    ) -> tuple[Verification | None, datetime | None]:
        v, d = t.verifications, t.destination_failures
        query = (
            select(v, d.c.locked_until)
            .outerjoin(
                d, and_(d.c.service_id == v.c.service_id, d.c.to == v.c.to, d.c.locked_until > now)
            )
            .where(v.c.id == verification_id, v.c.account_id == account_id)
        )
        async with self._tx() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None, None
        return verification_from_row(row), row.locked_until

    async def approve(self, verification_id: str, now: datetime) -> bool:
        v, d = t.verifications, t.destination_failures
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(v)
                    .where(
                        v.c.id == verification_id,
                        v.c.status == PENDING,
                        v.c.expires_at > now,
                        v.c.check_attempts < v.c.max_check_attempts,
                    )
                    .values(
                        status=VerificationStatus.APPROVED.value, code_sealed=None, updated_at=now
                    )
                    .returning(v.c.service_id, v.c.to)
                )
            ).first()
            if row is not None:
                await conn.execute(
                    delete(d).where(d.c.service_id == row.service_id, d.c.to == row.to)
                )
        return row is not None

    async def record_failed_check(self, verification_id: str, now: datetime) -> int | None:
        v = t.verifications
        exhausted = v.c.check_attempts + 1 >= v.c.max_check_attempts
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(v)
                    .where(
                        v.c.id == verification_id,
                        v.c.status == PENDING,
                        v.c.expires_at > now,
                        v.c.check_attempts < v.c.max_check_attempts,
                    )
                    .values(
                        check_attempts=v.c.check_attempts + 1,
                        status=case(
                            (exhausted, VerificationStatus.MAX_ATTEMPTS_REACHED.value),
                            else_=PENDING,
                        ),
                        code_sealed=case((exhausted, None), else_=v.c.code_sealed),
                        updated_at=now,
                    )
                    .returning(v.c.check_attempts)
                )
            ).first()
        return None if row is None else int(row.check_attempts)

    async def close(self, verification_id: str, status: VerificationStatus, now: datetime) -> bool:
        v = t.verifications
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(v)
                    .where(v.c.id == verification_id, v.c.status == PENDING)
                    .values(status=status.value, code_sealed=None, updated_at=now)
                    .returning(v.c.id)
                )
            ).first()
        return row is not None

    async def expire_due(self, now: datetime) -> int:
        """Write ``expired`` on every pending verification past its time and erase its sealed
        code (S2: no recoverable code outlives ``pending``)."""
        v = t.verifications
        async with self._tx() as conn:
            result = await conn.execute(
                update(v)
                .where(v.c.status == PENDING, v.c.expires_at <= now)
                .values(status=VerificationStatus.EXPIRED.value, code_sealed=None, updated_at=now)
            )
        return int(result.rowcount or 0)

    async def destination_lock(self, service_id: str, to: str, now: datetime) -> datetime | None:
        d = t.destination_failures
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(d.c.locked_until).where(
                        d.c.service_id == service_id, d.c.to == to, d.c.locked_until > now
                    )
                )
            ).first()
        return None if row is None else row.locked_until

    async def record_destination_failure(
        self, service_id: str, to: str, *, now: datetime, threshold: int, lock_seconds: int
    ) -> int:
        d = t.destination_failures
        upsert = self._insert(d).values(
            service_id=service_id, to=to, consecutive_failures=1, locked_until=None
        )
        upsert = upsert.on_conflict_do_update(
            index_elements=[d.c.service_id, d.c.to],
            set_={"consecutive_failures": d.c.consecutive_failures + 1},
        ).returning(d.c.consecutive_failures)
        async with self._tx() as conn:
            count = int((await conn.execute(upsert)).scalar_one())
            if count >= threshold:
                await conn.execute(
                    update(d)
                    .where(d.c.service_id == service_id, d.c.to == to)
                    .values(
                        consecutive_failures=0, locked_until=now + timedelta(seconds=lock_seconds)
                    )
                )
        return count

    async def reset_destination_failures(self, service_id: str, to: str) -> None:
        d = t.destination_failures
        async with self._tx() as conn:
            await conn.execute(delete(d).where(d.c.service_id == service_id, d.c.to == to))

    # --- outbox ----------------------------------------------------------------------------

    async def claim_due(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[ClaimedMessage]:
        m, v, s = t.messages, t.verifications, t.services
        due = (
            select(m.c.id)
            .where(
                m.c.status == MessageStatus.QUEUED.value,
                m.c.next_attempt_at <= now,
                or_(m.c.lease_until.is_(None), m.c.lease_until < now),
            )
            .order_by(m.c.next_attempt_at)
            .limit(limit)
        )
        if self._dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        async with self._tx() as conn:
            rows = (
                await conn.execute(
                    update(m)
                    .where(m.c.id.in_(due.scalar_subquery()))
                    .values(
                        lease_until=now + timedelta(seconds=lease_seconds),
                        attempts=m.c.attempts + 1,
                        updated_at=now,
                    )
                    .returning(*m.c)
                )
            ).all()
            if not rows:
                return []
            ver_ids = [r.verification_id for r in rows if r.verification_id]
            ver_rows = (
                {r.id: r for r in (await conn.execute(select(v).where(v.c.id.in_(ver_ids)))).all()}
                if ver_ids
                else {}
            )
            svc_ids = {r.service_id for r in ver_rows.values()}
            svc_rows = (
                {r.id: r for r in (await conn.execute(select(s).where(s.c.id.in_(svc_ids)))).all()}
                if svc_ids
                else {}
            )
        return claimed_from_rows(rows, ver_rows, svc_rows)

    async def mark_sent(
        self, message_id: str, *, provider: str, receipt: SendReceipt, now: datetime
    ) -> None:
        m = t.messages
        async with self._tx() as conn:
            await conn.execute(
                update(m)
                .where(m.c.id == message_id, m.c.status == MessageStatus.QUEUED.value)
                .values(
                    status=MessageStatus.SENT.value,
                    provider=provider,
                    provider_ref=receipt.provider_ref,
                    price=receipt.price,
                    error=None,
                    lease_until=None,
                    next_attempt_at=None,
                    updated_at=now,
                )
            )

    async def mark_retry(
        self,
        message_id: str,
        *,
        provider: str,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
    ) -> None:
        m = t.messages
        async with self._tx() as conn:
            await conn.execute(
                update(m)
                .where(m.c.id == message_id, m.c.status == MessageStatus.QUEUED.value)
                .values(
                    provider=provider,
                    error=error[:500],
                    lease_until=None,
                    next_attempt_at=next_attempt_at,
                    updated_at=now,
                )
            )

    async def mark_failed(
        self, message_id: str, *, provider: str | None, error: str, now: datetime
    ) -> Verification | None:
        m, v = t.messages, t.verifications
        live = (MessageStatus.QUEUED.value, MessageStatus.SENT.value, MessageStatus.DELIVERED.value)
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(m)
                    .where(m.c.id == message_id, m.c.status == MessageStatus.QUEUED.value)
                    .values(
                        status=MessageStatus.FAILED.value,
                        provider=provider,
                        error=error[:500],
                        lease_until=None,
                        next_attempt_at=None,
                        updated_at=now,
                    )
                    .returning(m.c.verification_id)
                )
            ).first()
            if row is None or row.verification_id is None:
                return None
            others_alive = (
                await conn.execute(
                    select(func.count())
                    .select_from(m)
                    .where(
                        m.c.verification_id == row.verification_id,
                        m.c.id != message_id,
                        m.c.status.in_(live),
                    )
                )
            ).scalar_one()
            if others_alive:
                return None
            failed = (
                await conn.execute(
                    update(v)
                    .where(v.c.id == row.verification_id, v.c.status == PENDING)
                    .values(
                        status=VerificationStatus.FAILED.value, code_sealed=None, updated_at=now
                    )
                    .returning(v.c.id)
                )
            ).first()
            if failed is None:
                return None
            return await self._load_verification(conn, v.c.id == row.verification_id)

    async def apply_report(self, provider: str, report: DeliveryReport, now: datetime) -> bool:
        m = t.messages
        where = and_(m.c.provider == provider, m.c.provider_ref == report.provider_ref)
        async with self._tx() as conn:
            exists = (await conn.execute(select(m.c.id).where(where))).first()
            if exists is None:
                return False
            if report.status is not None:
                await conn.execute(
                    update(m)
                    .where(
                        where,
                        m.c.status.in_((MessageStatus.QUEUED.value, MessageStatus.SENT.value)),
                    )
                    .values(
                        status=report.status.value,
                        error=None if report.detail is None else report.detail[:500],
                        updated_at=now,
                    )
                )
        return True

    # --- idempotency ---------------------------------------------------------------------

    async def begin(
        self, account_id: str, key: str, request_hash: str, now: datetime
    ) -> tuple[str, int | None, Any]:
        i = t.idempotency_keys
        where = and_(i.c.account_id == account_id, i.c.key == key)
        for _ in range(2):
            try:
                async with self._tx() as conn:
                    await conn.execute(
                        insert(i).values(
                            account_id=account_id,
                            key=key,
                            request_hash=request_hash,
                            state="in_progress",
                            created_at=now,
                        )
                    )
                return "new", None, None
            except IntegrityError:
                pass
            async with self._tx() as conn:
                row = (await conn.execute(select(i).where(where))).first()
                if row is not None and (
                    row.created_at <= now - IDEMPOTENCY_TTL
                    or (row.state != "done" and row.created_at <= now - IDEMPOTENCY_STALE)
                ):
                    await conn.execute(delete(i).where(where, i.c.created_at == row.created_at))
                    continue
            if row is None:
                continue
            if row.request_hash != request_hash:
                raise IdempotencyKeyMismatch(
                    "this Idempotency-Key was used with a different request",
                    param="Idempotency-Key",
                )
            if row.state != "done":
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is still running", retry_after=1
                )
            return "done", row.response_status, row.response_body
        raise IdempotencyInProgress("Idempotency-Key is contended; retry", retry_after=1)

    async def finish(self, account_id: str, key: str, status: int, body: Any) -> None:
        i = t.idempotency_keys
        async with self._tx() as conn:
            await conn.execute(
                update(i)
                .where(i.c.account_id == account_id, i.c.key == key)
                .values(state="done", response_status=status, response_body=body)
            )

    async def forget_idempotency_keys(self, now: datetime) -> int:
        """Delete keys past their 24 hours; they count as absent already."""
        i = t.idempotency_keys
        async with self._tx() as conn:
            result = await conn.execute(delete(i).where(i.c.created_at <= now - IDEMPOTENCY_TTL))
        return int(result.rowcount or 0)

    async def abandon(self, account_id: str, key: str) -> None:
        i = t.idempotency_keys
        async with self._tx() as conn:
            await conn.execute(delete(i).where(i.c.account_id == account_id, i.c.key == key))
