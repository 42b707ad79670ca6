"""The storage port on the standard library's ``sqlite3``, for the embedded default.

Why not SQLAlchemy's async engine here: on the reference machine a one-statement transaction
through SQLAlchemy async over aiosqlite costs about 1.3 ms of CPU (nine hops to aiosqlite's
worker thread, greenlet switches, statement construction); the same transaction on ``sqlite3``
costs about 20 µs. A verification round trip needs a dozen statements, so the async engine alone
would spend ten times the whole request budget (docs/performance.md). The schema is still
SQLAlchemy's (``tables.py``) and Alembic's, and :class:`~otpgate.adapters.storage.sql.SqlStorage`
still serves PostgreSQL and passes the same contract suite on SQLite too.

Each method runs one short transaction synchronously on the event-loop thread: a local WAL
database answers in microseconds, and a transaction that never spans an ``await`` can never
interleave with another coroutine's. The one method that awaits is ``mark_sent``: its update
waits (a few milliseconds at most) to be committed together with the next write transaction,
a group commit that saves one commit per message sent.

``BEGIN IMMEDIATE`` takes the write lock up front, so a second process on the same file
(``otpgate worker``, the CLI) waits at most ``busy_timeout`` and then gets ``Unavailable``
rather than a half-done transaction. Values are stored exactly as SQLAlchemy stores them
(timestamps as ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, JSON as text), so
both adapters read each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from otpgate.adapters.storage.sql import (
    IDEMPOTENCY_STALE,
    IDEMPOTENCY_TTL,
    account_from_row,
    claimed_from_rows,
    decode_cursor,
    encode_cursor,
    key_and_account_from_row,
    message_from_row,
    policy_to_json,
    service_from_row,
    verification_from_row,
)
from otpgate.domain.model import (
    Account,
    ApiKey,
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

BUSY_TIMEOUT_MS = 2_000
#: Longest a sent-mark waits for a write transaction to ride along with before it is committed
#: on its own (see ``NativeSqliteStorage.mark_sent``).
SENT_MARK_DELAY_SECONDS = 0.005
_MARK_SENT = (
    "UPDATE messages SET status = 'sent', provider = ?, provider_ref = ?, price = ?, "
    "error = NULL, lease_until = NULL, next_attempt_at = NULL, updated_at = ? "
    "WHERE id = ? AND status = 'queued'"
)
_JSON_COLUMNS = frozenset({"policy", "context", "metadata", "response_body"})

PENDING = VerificationStatus.PENDING.value
QUEUED = MessageStatus.QUEUED.value
SENT = MessageStatus.SENT.value
_LIVE_MESSAGES = (QUEUED, SENT, MessageStatus.DELIVERED.value)


def stamp(value: datetime | None) -> str | None:
    """A timezone-aware datetime as SQLAlchemy's SQLite dialect stores it: naive UTC text with
    six fraction digits, so that text order is time order."""
    if value is None:
        return None
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _row(cursor: sqlite3.Cursor, values: tuple[Any, ...]) -> SimpleNamespace:
    """Rows as attribute objects with JSON decoded and times parsed, as the shared mappers of
    ``sql.py`` expect them."""
    fields: dict[str, Any] = {}
    for (name, *_), value in zip(cursor.description, values, strict=True):
        if value is not None:
            if name in _JSON_COLUMNS:
                value = json.loads(value)
            elif name.endswith(("_at", "_until")):
                value = _parse_time(value)
        fields[name] = value
    return SimpleNamespace(**fields)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value)


class NativeSqliteStorage:
    """Implements ``otpgate.domain.ports.Storage`` on one ``sqlite3`` connection."""

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = BUSY_TIMEOUT_MS,
        sent_mark_delay_seconds: float = SENT_MARK_DELAY_SECONDS,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread is off only so that tests may close the store from another
        # thread; otpgate itself uses it from the event-loop thread alone.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = _row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA cache_size=-65536")
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        self._db.execute("PRAGMA foreign_keys=ON")
        self.path = path
        # Sent-marks waiting for a commit: (statement parameters, the waiter's future).
        self._sent_marks: list[tuple[tuple[Any, ...], asyncio.Future[None]]] = []
        self._sent_flush: asyncio.TimerHandle | None = None
        self._sent_mark_delay = sent_mark_delay_seconds

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; lock timeouts and I/O errors become ``Unavailable``."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise Unavailable(
                "storage is busy or unavailable; retry shortly", retry_after=1
            ) from exc
        # Pending sent-marks ride along: one commit instead of one each.
        marks, self._sent_marks = self._sent_marks, []
        try:
            if marks:
                db.executemany(_MARK_SENT, [params for params, _ in marks])
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            self._keep_sent_marks(marks)
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            db.execute("ROLLBACK")
            self._keep_sent_marks(marks)
            raise Unavailable("storage could not commit; retry shortly", retry_after=1) from exc
        for _, waiter in marks:
            if not waiter.done():
                waiter.set_result(None)

    def _keep_sent_marks(self, marks: list[tuple[tuple[Any, ...], asyncio.Future[None]]]) -> None:
        """Marks whose carrying transaction rolled back wait for the next one (or the timer)."""
        if marks:
            self._sent_marks[:0] = marks
            self._schedule_sent_flush()

    def _schedule_sent_flush(self) -> None:
        if self._sent_flush is None:
            self._sent_flush = asyncio.get_running_loop().call_later(
                self._sent_mark_delay, self._flush_sent_marks
            )

    def _write(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One write statement: on its own (SQLite makes it atomic) unless sent-marks are
        waiting, which then share its transaction and its commit."""
        if not self._sent_marks:
            return self._all(sql, params)
        with self._tx() as db:
            return db.execute(sql, params).fetchall()

    def _flush_sent_marks(self) -> None:
        """Commit the sent-marks no write transaction took along (the timer's callback)."""
        self._sent_flush = None
        if not self._sent_marks:
            return
        try:
            with self._tx():
                pass
        except Unavailable as exc:
            marks, self._sent_marks = self._sent_marks, []
            for _, waiter in marks:
                if not waiter.done():
                    waiter.set_exception(exc)

    def _all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement on its own: SQLite makes a single statement atomic without an explicit
        transaction, which saves the BEGIN and COMMIT round trips. Every row is fetched so the
        statement (and any write lock it took) is finished before this returns."""
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            raise Unavailable(
                "storage is busy or unavailable; retry shortly", retry_after=1
            ) from exc

    def _one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._all(sql, params)
        return rows[0] if rows else None

    def _write_one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        rows = self._write(sql, params)
        return rows[0] if rows else None

    async def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise Unavailable("storage is unavailable", retry_after=1) from exc

    async def aclose(self) -> None:
        if self._sent_flush is not None:
            self._sent_flush.cancel()
        self._flush_sent_marks()
        self._db.close()

    # --- accounts and keys -------------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO accounts (id, name, username, is_admin, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (
                        account.id,
                        account.name,
                        account.username,
                        int(account.is_admin),
                        stamp(account.created_at),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise InvalidRequest("username is taken", param="username") from exc

    async def get_account(self, account_id: str) -> Account | None:
        row = self._one("SELECT * FROM accounts WHERE id = ?", (account_id,))
        return None if row is None else account_from_row(row)

    async def first_admin_account(self) -> Account | None:
        row = self._one("SELECT * FROM accounts WHERE is_admin = 1 ORDER BY created_at LIMIT 1")
        return None if row is None else account_from_row(row)

    async def list_accounts(self, *, limit: int, cursor: str | None) -> Page[Account]:
        rows = self._page("SELECT * FROM accounts", (), limit=limit, cursor=cursor)
        return Page([account_from_row(r) for r in rows[:limit]], self._next(rows, limit))

    async def create_key(self, key: ApiKey) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO api_keys (id, account_id, name, key_hash, created_at, revoked_at) "
                "VALUES (?, ?, ?, ?, ?, NULL)",
                (key.id, key.account_id, key.name, key.key_hash, stamp(key.created_at)),
            )

    async def get_key_by_hash(self, key_hash: str) -> tuple[ApiKey, Account] | None:
        row = self._one(
            "SELECT k.id, k.account_id, k.name, k.key_hash, k.created_at, "
            "a.name AS account_name, a.username, a.is_admin, a.created_at AS account_created_at "
            "FROM api_keys k JOIN accounts a ON a.id = k.account_id "
            "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            (key_hash,),
        )
        if row is None:
            return None
        return key_and_account_from_row(row)

    async def list_keys(self, account_id: str) -> Sequence[ApiKey]:
        rows = self._all(
            "SELECT * FROM api_keys WHERE account_id = ? ORDER BY created_at", (account_id,)
        )
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
        with self._tx() as db:
            changed = db.execute(
                "UPDATE api_keys SET revoked_at = ? "
                "WHERE id = ? AND account_id = ? AND revoked_at IS NULL",
                (stamp(now), key_id, account_id),
            ).rowcount
        return bool(changed)

    # --- services ----------------------------------------------------------------------------

    async def create_service(self, service: Service) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO services (id, account_id, name, policy, created_at, updated_at, "
                "deleted_at) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (
                    service.id,
                    service.account_id,
                    service.policy.name,
                    json.dumps(policy_to_json(service.policy)),
                    stamp(service.created_at),
                    stamp(service.updated_at),
                ),
            )

    async def get_service(self, account_id: str, service_id: str) -> Service | None:
        row = self._one(
            "SELECT * FROM services WHERE id = ? AND account_id = ? AND deleted_at IS NULL",
            (service_id, account_id),
        )
        return None if row is None else service_from_row(row)

    async def list_services(
        self, account_id: str, *, limit: int, cursor: str | None
    ) -> Page[Service]:
        rows = self._page(
            "SELECT * FROM services WHERE account_id = ? AND deleted_at IS NULL",
            (account_id,),
            limit=limit,
            cursor=cursor,
        )
        return Page([service_from_row(r) for r in rows[:limit]], self._next(rows, limit))

    async def update_service(
        self, account_id: str, service_id: str, policy: ServicePolicy, now: datetime
    ) -> Service | None:
        row = self._one(
            "UPDATE services SET name = ?, policy = ?, updated_at = ? "
            "WHERE id = ? AND account_id = ? AND deleted_at IS NULL RETURNING *",
            (policy.name, json.dumps(policy_to_json(policy)), stamp(now), service_id, account_id),
        )
        return None if row is None else service_from_row(row)

    async def delete_service(self, account_id: str, service_id: str, now: datetime) -> bool:
        with self._tx() as db:
            changed = db.execute(
                "UPDATE services SET deleted_at = ?, updated_at = ? "
                "WHERE id = ? AND account_id = ? AND deleted_at IS NULL",
                (stamp(now), stamp(now), service_id, account_id),
            ).rowcount
            if changed:
                # A deleted service's codes must not stay usable or recoverable.
                db.execute(
                    "UPDATE verifications SET status = 'canceled', code_sealed = NULL, "
                    "updated_at = ? WHERE service_id = ? AND status = 'pending'",
                    (stamp(now), service_id),
                )
        return bool(changed)

    # --- verifications -----------------------------------------------------------------------

    @staticmethod
    def _messages_for(db: sqlite3.Connection, ids: Sequence[str]) -> dict[str, list[Message]]:
        found: dict[str, list[Message]] = {vid: [] for vid in ids}
        if not ids:
            return found
        marks = ",".join("?" * len(ids))
        rows = db.execute(
            f"SELECT * FROM messages WHERE verification_id IN ({marks}) "  # noqa: S608 - marks only
            "ORDER BY created_at, id",
            tuple(ids),
        ).fetchall()
        for row in rows:
            found[row.verification_id].append(message_from_row(row))
        return found

    def _load(
        self,
        db: sqlite3.Connection,
        where: str,
        params: Sequence[Any],
        *,
        with_messages: bool = True,
    ) -> Verification | None:
        row = db.execute(f"SELECT * FROM verifications WHERE {where}", params).fetchone()  # noqa: S608 - fixed clauses
        if row is None:
            return None
        messages = self._messages_for(db, [row.id])[row.id] if with_messages else ()
        return verification_from_row(row, messages)

    async def expire_and_find_pending(
        self, service_id: str, to: str, now: datetime
    ) -> Verification | None:
        # At most one row is pending per (service, to) (a partial unique index), so one read
        # answers the common case, and the rare expired one is closed by a write of its own.
        row = self._one(
            'SELECT * FROM verifications WHERE service_id = ? AND "to" = ? '
            "AND status = 'pending'",
            (service_id, to),
        )
        if row is None:
            return None
        if row.expires_at <= now:
            self._all(
                "UPDATE verifications SET status = 'expired', code_sealed = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'pending'",
                (stamp(now), row.id),
            )
            return None
        return verification_from_row(row, self._messages_for(self._db, [row.id])[row.id])

    @staticmethod
    def _insert_verification(db: sqlite3.Connection, v: Verification) -> None:
        db.execute(
            'INSERT INTO verifications (id, account_id, service_id, "to", channel, status, '
            "code_digest, code_sealed, locale, context, metadata, check_attempts, "
            "max_check_attempts, send_attempts, max_send_attempts, created_at, updated_at, "
            "expires_at, last_sent_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                v.id,
                v.account_id,
                v.service_id,
                v.to,
                v.channel.value,
                v.status.value,
                v.code_digest,
                v.code_sealed,
                v.locale,
                _json(v.context),
                json.dumps(v.metadata),
                v.check_attempts,
                v.max_check_attempts,
                v.send_attempts,
                v.max_send_attempts,
                stamp(v.created_at),
                stamp(v.updated_at),
                stamp(v.expires_at),
                stamp(v.last_sent_at),
            ),
        )

    @staticmethod
    def _insert_message(
        db: sqlite3.Connection, m: Message, body_masked: str, lease_until: datetime | None
    ) -> None:
        db.execute(
            'INSERT INTO messages (id, account_id, verification_id, channel, "to", status, '
            "locale, body_masked, segments, encoding, provider, provider_ref, price, error, "
            "attempts, next_attempt_at, lease_until, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                m.id,
                m.account_id,
                m.verification_id,
                m.channel.value,
                m.to,
                m.status.value,
                m.locale,
                body_masked,
                m.segments,
                m.encoding,
                m.provider,
                m.provider_ref,
                m.price,
                m.error,
                m.attempts if lease_until is None else m.attempts + 1,
                stamp(m.created_at),
                stamp(lease_until),
                stamp(m.created_at),
                stamp(m.updated_at),
            ),
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
        try:
            with self._tx() as db:
                if supersede is not None:
                    db.execute(
                        "UPDATE verifications SET status = 'canceled', code_sealed = NULL, "
                        "updated_at = ? WHERE id = ? AND status = 'pending'",
                        (stamp(verification.created_at), supersede),
                    )
                self._insert_verification(db, verification)
                self._insert_message(db, message, body_masked, lease_until)
        except sqlite3.IntegrityError:
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
        with self._tx() as db:
            counted = db.execute(
                "UPDATE verifications SET send_attempts = send_attempts + 1, last_sent_at = ?, "
                "updated_at = ? WHERE id = ? AND status = 'pending' AND expires_at > ? "
                "AND send_attempts < max_send_attempts AND last_sent_at <= ? RETURNING id",
                (
                    stamp(now),
                    stamp(now),
                    verification_id,
                    stamp(now),
                    stamp(now - timedelta(seconds=interval_seconds)),
                ),
            ).fetchone()
            if counted is None:
                return None
            self._insert_message(db, message, body_masked, lease_until)
            return self._load(db, "id = ?", (verification_id,))

    async def get_verification(self, account_id: str, verification_id: str) -> Verification | None:
        with self._tx() as db:
            return self._load(db, "id = ? AND account_id = ?", (verification_id, account_id))

    async def latest_verification(
        self, account_id: str, service_id: str, to: str
    ) -> Verification | None:
        with self._tx() as db:
            row = db.execute(
                'SELECT id FROM verifications WHERE account_id = ? AND service_id = ? AND "to" = ? '
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                (account_id, service_id, to),
            ).fetchone()
            return None if row is None else self._load(db, "id = ?", (row.id,))

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
        sql = "SELECT * FROM verifications WHERE account_id = ?"
        params: list[Any] = [account_id]
        if service_id is not None:
            sql += " AND service_id = ?"
            params.append(service_id)
        if to is not None:
            sql += ' AND "to" = ?'
            params.append(to)
        if status is VerificationStatus.EXPIRED:
            # Reported status, not stored status: a pending row past its expiry is expired.
            sql += " AND (status = 'expired' OR (status = 'pending' AND expires_at <= ?))"
            params.append(stamp(now))
        elif status is VerificationStatus.PENDING:
            sql += " AND status = 'pending' AND expires_at > ?"
            params.append(stamp(now))
        elif status is not None:
            sql += " AND status = ?"
            params.append(status.value)
        with self._tx() as db:
            rows = self._page(sql, params, limit=limit, cursor=cursor, db=db)
            messages = self._messages_for(db, [r.id for r in rows[:limit]])
        items = [verification_from_row(r, messages[r.id]) for r in rows[:limit]]
        return Page(items, self._next(rows, limit))

    def _page(
        self,
        sql: str,
        params: Sequence[Any],
        *,
        limit: int,
        cursor: str | None,
        db: sqlite3.Connection | None = None,
    ) -> list[Any]:
        """Newest first; one row more than asked tells whether there is a next page."""
        params = list(params)
        if cursor is not None:
            created_at, row_id = decode_cursor(cursor)
            sql += (
                " AND (created_at, id) < (?, ?)"
                if " WHERE " in sql
                else (" WHERE (created_at, id) < (?, ?)")
            )
            params += [stamp(created_at), row_id]
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(limit + 1)
        if db is not None:
            return db.execute(sql, params).fetchall()
        return self._all(sql, params)

    @staticmethod
    def _next(rows: Sequence[Any], limit: int) -> str | None:
        if len(rows) <= limit:
            return None
        last = rows[limit - 1]
        return encode_cursor(last.created_at, last.id)

    async def verification_for_check(
        self, account_id: str, verification_id: str, now: datetime
    ) -> tuple[Verification | None, datetime | None]:
        row = self._one(
            "SELECT v.*, d.locked_until AS locked_until FROM verifications v "
            'LEFT JOIN destination_failures d ON d.service_id = v.service_id AND d."to" = v."to" '
            "AND d.locked_until > ? WHERE v.id = ? AND v.account_id = ?",
            (stamp(now), verification_id, account_id),
        )
        if row is None:
            return None, None
        return verification_from_row(row), row.locked_until

    async def approve(self, verification_id: str, now: datetime) -> bool:
        # One transaction (one lock and one commit) for the approval and the failure reset.
        with self._tx() as db:
            row = db.execute(
                "UPDATE verifications SET status = 'approved', code_sealed = NULL, "
                "updated_at = ? WHERE id = ? AND status = 'pending' AND expires_at > ? "
                'AND check_attempts < max_check_attempts RETURNING service_id, "to"',
                (stamp(now), verification_id, stamp(now)),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                'DELETE FROM destination_failures WHERE service_id = ? AND "to" = ?',
                (row.service_id, row.to),
            )
        return True

    async def record_failed_check(self, verification_id: str, now: datetime) -> int | None:
        row = self._write_one(
            "UPDATE verifications SET check_attempts = check_attempts + 1, "
            "status = CASE WHEN check_attempts + 1 >= max_check_attempts "
            "THEN 'max_attempts_reached' ELSE 'pending' END, "
            "code_sealed = CASE WHEN check_attempts + 1 >= max_check_attempts "
            "THEN NULL ELSE code_sealed END, updated_at = ? "
            "WHERE id = ? AND status = 'pending' AND expires_at > ? "
            "AND check_attempts < max_check_attempts RETURNING check_attempts",
            (stamp(now), verification_id, stamp(now)),
        )
        return None if row is None else int(row.check_attempts)

    async def close(self, verification_id: str, status: VerificationStatus, now: datetime) -> bool:
        row = self._one(
            "UPDATE verifications SET status = ?, code_sealed = NULL, updated_at = ? "
            "WHERE id = ? AND status = 'pending' RETURNING id",
            (status.value, stamp(now), verification_id),
        )
        return row is not None

    async def expire_due(self, now: datetime) -> int:
        with self._tx() as db:
            return db.execute(
                "UPDATE verifications SET status = 'expired', code_sealed = NULL, updated_at = ? "
                "WHERE status = 'pending' AND expires_at <= ?",
                (stamp(now), stamp(now)),
            ).rowcount

    async def destination_lock(self, service_id: str, to: str, now: datetime) -> datetime | None:
        row = self._one(
            'SELECT locked_until FROM destination_failures WHERE service_id = ? AND "to" = ? '
            "AND locked_until > ?",
            (service_id, to, stamp(now)),
        )
        return None if row is None else row.locked_until

    async def record_destination_failure(
        self, service_id: str, to: str, *, now: datetime, threshold: int, lock_seconds: int
    ) -> int:
        with self._tx() as db:
            count = int(
                db.execute(
                    'INSERT INTO destination_failures (service_id, "to", consecutive_failures, '
                    'locked_until) VALUES (?, ?, 1, NULL) ON CONFLICT (service_id, "to") DO UPDATE '
                    "SET consecutive_failures = consecutive_failures + 1 "
                    "RETURNING consecutive_failures",
                    (service_id, to),
                )
                .fetchone()
                .consecutive_failures
            )
            if count >= threshold:
                db.execute(
                    "UPDATE destination_failures SET consecutive_failures = 0, locked_until = ? "
                    'WHERE service_id = ? AND "to" = ?',
                    (stamp(now + timedelta(seconds=lock_seconds)), service_id, to),
                )
        return count

    async def reset_destination_failures(self, service_id: str, to: str) -> None:
        with self._tx() as db:
            db.execute(
                'DELETE FROM destination_failures WHERE service_id = ? AND "to" = ?',
                (service_id, to),
            )

    # --- outbox ------------------------------------------------------------------------------

    async def claim_due(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[ClaimedMessage]:
        with self._tx() as db:
            rows = db.execute(
                "UPDATE messages SET lease_until = ?, attempts = attempts + 1, updated_at = ? "
                "WHERE id IN (SELECT id FROM messages WHERE status = 'queued' "
                "AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?) "
                "ORDER BY next_attempt_at LIMIT ?) RETURNING *",
                (
                    stamp(now + timedelta(seconds=lease_seconds)),
                    stamp(now),
                    stamp(now),
                    stamp(now),
                    limit,
                ),
            ).fetchall()
            if not rows:
                return []
            ver_ids = sorted({r.verification_id for r in rows if r.verification_id})
            marks = ",".join("?" * len(ver_ids))
            verifications = (
                {
                    r.id: r
                    for r in db.execute(
                        f"SELECT * FROM verifications WHERE id IN ({marks})",  # noqa: S608 - marks only
                        ver_ids,
                    ).fetchall()
                }
                if ver_ids
                else {}
            )
            svc_ids = sorted({r.service_id for r in verifications.values()})
            marks = ",".join("?" * len(svc_ids))
            services = (
                {
                    r.id: r
                    for r in db.execute(
                        f"SELECT * FROM services WHERE id IN ({marks})",  # noqa: S608 - marks only
                        svc_ids,
                    ).fetchall()
                }
                if svc_ids
                else {}
            )
        return claimed_from_rows(rows, verifications, services)

    async def mark_sent(
        self, message_id: str, *, provider: str, receipt: SendReceipt, now: datetime
    ) -> None:
        """Group commit: the update joins the next write transaction of this process (a start,
        an approval...), or is committed on its own after ``SENT_MARK_DELAY_SECONDS``; either
        way this returns only once it is committed. Under load a commit carries many marks."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._sent_marks.append(
            ((provider, receipt.provider_ref, receipt.price, stamp(now), message_id), waiter)
        )
        self._schedule_sent_flush()
        await waiter

    async def mark_retry(
        self,
        message_id: str,
        *,
        provider: str,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE messages SET provider = ?, error = ?, lease_until = NULL, "
                "next_attempt_at = ?, updated_at = ? WHERE id = ? AND status = 'queued'",
                (provider, error[:500], stamp(next_attempt_at), stamp(now), message_id),
            )

    async def mark_failed(
        self, message_id: str, *, provider: str | None, error: str, now: datetime
    ) -> Verification | None:
        with self._tx() as db:
            row = db.execute(
                "UPDATE messages SET status = 'failed', provider = ?, error = ?, "
                "lease_until = NULL, next_attempt_at = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'queued' RETURNING verification_id",
                (provider, error[:500], stamp(now), message_id),
            ).fetchone()
            if row is None or row.verification_id is None:
                return None
            alive = (
                db.execute(
                    "SELECT count(*) AS n FROM messages WHERE verification_id = ? AND id != ? "
                    "AND status IN (?, ?, ?)",
                    (row.verification_id, message_id, *_LIVE_MESSAGES),
                )
                .fetchone()
                .n
            )
            if alive:
                return None
            failed = db.execute(
                "UPDATE verifications SET status = 'failed', code_sealed = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'pending' RETURNING id",
                (stamp(now), row.verification_id),
            ).fetchone()
            if failed is None:
                return None
            return self._load(db, "id = ?", (row.verification_id,))

    async def apply_report(self, provider: str, report: DeliveryReport, now: datetime) -> bool:
        with self._tx() as db:
            exists = db.execute(
                "SELECT id FROM messages WHERE provider = ? AND provider_ref = ?",
                (provider, report.provider_ref),
            ).fetchone()
            if exists is None:
                return False
            if report.status is not None:
                db.execute(
                    "UPDATE messages SET status = ?, error = ?, updated_at = ? "
                    "WHERE provider = ? AND provider_ref = ? AND status IN (?, ?)",
                    (
                        report.status.value,
                        None if report.detail is None else report.detail[:500],
                        stamp(now),
                        provider,
                        report.provider_ref,
                        QUEUED,
                        SENT,
                    ),
                )
        return True

    # --- idempotency -------------------------------------------------------------------------

    async def begin(
        self, account_id: str, key: str, request_hash: str, now: datetime
    ) -> tuple[str, int | None, Any]:
        with self._tx() as db:
            row = db.execute(
                "SELECT * FROM idempotency_keys WHERE account_id = ? AND key = ?",
                (account_id, key),
            ).fetchone()
            if row is not None and (
                row.created_at <= now - IDEMPOTENCY_TTL
                or (row.state != "done" and row.created_at <= now - IDEMPOTENCY_STALE)
            ):
                db.execute(
                    "DELETE FROM idempotency_keys WHERE account_id = ? AND key = ?",
                    (account_id, key),
                )
                row = None
            if row is None:
                db.execute(
                    "INSERT INTO idempotency_keys (account_id, key, request_hash, state, "
                    "response_status, response_body, created_at) "
                    "VALUES (?, ?, ?, 'in_progress', NULL, NULL, ?)",
                    (account_id, key, request_hash, stamp(now)),
                )
                return "new", None, None
        if row.request_hash != request_hash:
            raise IdempotencyKeyMismatch(
                "this Idempotency-Key was used with a different request", param="Idempotency-Key"
            )
        if row.state != "done":
            raise IdempotencyInProgress(
                "a request with this Idempotency-Key is still running", retry_after=1
            )
        return "done", row.response_status, row.response_body

    async def finish(self, account_id: str, key: str, status: int, body: Any) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE idempotency_keys SET state = 'done', response_status = ?, "
                "response_body = ? WHERE account_id = ? AND key = ?",
                (status, json.dumps(body), account_id, key),
            )

    async def forget_idempotency_keys(self, now: datetime) -> int:
        with self._tx() as db:
            return db.execute(
                "DELETE FROM idempotency_keys WHERE created_at <= ?",
                (stamp(now - IDEMPOTENCY_TTL),),
            ).rowcount

    async def abandon(self, account_id: str, key: str) -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM idempotency_keys WHERE account_id = ? AND key = ?", (account_id, key)
            )
