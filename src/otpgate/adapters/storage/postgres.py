"""The PostgreSQL executor: asyncpg with a connection pool.

Statements are compiled once by SQLAlchemy's asyncpg dialect (``$1`` parameters with casts)
and run straight through asyncpg, which prepares each text once per connection. Compared with
SQLAlchemy's async engine this drops the greenlet hops and result processing from every
statement (docs/performance.md).

Outages fail fast (a database that is down or hangs answers ``503`` within
``timeout_seconds``, never a hang): the pool waits at most that long for a connection, every
statement at most that long for its answer, and a connection that timed out or broke is
terminated rather than returned to the pool, so a recovered server is used again at once.

asyncpg's error text can quote the offending row (``DETAIL: Key (key_hash)=(…) already
exists``); none of it is kept: errors are translated to our own with the error class and
SQLSTATE only.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.sql import ClauseElement

from otpgate.adapters.storage.executor import (
    Compiled,
    Conflict,
    Deferred,
    DeferredWrites,
    Row,
    StatementCache,
    StorageError,
)
from otpgate.errors import ConfigurationError, Unavailable

T = TypeVar("T")
CONNECT_TIMEOUT_SECONDS = 3.0
TIMEOUT_SECONDS = 1.0
#: Longest a deferred write waits for a transaction to ride along with.
DEFER_SECONDS = 0.002

#: Errors after which a connection is not trusted again.
_BROKEN = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)
#: Server answers that mean "not now": retrying later can succeed.
_NOT_NOW = (
    asyncpg.exceptions.QueryCanceledError,  # statement_timeout
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.InsufficientResourcesError,  # disk full, too many connections
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby after failover
)


def dsn_of(url: str) -> str:
    """asyncpg's DSN for an otpgate PostgreSQL URL (``postgresql://`` or with a driver).

    >>> dsn_of("postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    'postgresql://postgres@127.0.0.1:5432/test'
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError("OTPGATE_DATABASE_URL: not a postgresql:// URL")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def _translate(exc: BaseException, doing: str) -> Exception:
    """Our error for a driver error, with no text from the server (it may quote values)."""
    if isinstance(exc, asyncpg.exceptions.UniqueViolationError):
        return Conflict(f"unique constraint {exc.constraint_name or '?'}")
    state = getattr(exc, "sqlstate", None)
    label = f"{type(exc).__name__}" + (f" (SQLSTATE {state})" if state else "")
    if isinstance(exc, _BROKEN + _NOT_NOW):
        return Unavailable(
            f"storage is unavailable ({doing}: {label}); retry shortly", retry_after=1
        )
    return StorageError(f"{doing}: {label}")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing to undo (see ``PostgresExecutor._get_pool``)."""


def _grouped(deferred: list[Deferred]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Deferred writes by statement text, in first-queued order, for ``executemany``."""
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for item in deferred:
        groups.setdefault(item.compiled.sql, []).append(item.params)
    return list(groups.items())


def _discard(conn: asyncpg.Connection) -> None:
    """Close a connection at once, without I/O, so the pool never hands a connection in an
    unknown state to another request (it makes a new one). Idempotent."""
    with contextlib.suppress(Exception):
        if not conn.is_closed():
            conn.terminate()


class _Connection:
    """A session on one acquired connection (inside a transaction)."""

    __slots__ = ("_conn", "_executor")

    def __init__(self, executor: PostgresExecutor, conn: asyncpg.Connection) -> None:
        self._executor = executor
        self._conn = conn

    async def all(self, statement: ClauseElement, **params: Any) -> list[Row]:
        compiled = self._executor.compiled(statement)
        return compiled.rows(await self._executor.fetch(self._conn, compiled, params))

    async def one(self, statement: ClauseElement, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    async def run(self, statement: ClauseElement, **params: Any) -> int:
        compiled = self._executor.compiled(statement)
        return await self._executor.execute(self._conn, compiled, params)


class PostgresExecutor:
    """Implements ``executor.Executor`` on an asyncpg pool (created on first use)."""

    dialect = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        schema: str = "",
        pool_size: int = 10,
        timeout_seconds: float = TIMEOUT_SECONDS,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
        defer_seconds: float = DEFER_SECONDS,
    ) -> None:
        self._dsn = dsn_of(url)
        self._schema = schema
        self._pool_size = pool_size
        self._timeout = timeout_seconds
        self._connect_timeout = connect_timeout_seconds
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._deferred = DeferredWrites(defer_seconds, self.transaction)
        self.compiled = StatementCache(asyncpg_dialect())  # type: ignore[no-untyped-call]

    def __repr__(self) -> str:
        return f"PostgresExecutor({make_url(self._dsn).render_as_string(hide_password=True)!r})"

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                settings = {"search_path": self._schema} if self._schema else {}
                # Connections are made on demand (min_size=0), so creating the pool needs no
                # server, and a database that is down fails requests, not start-up.
                pool = asyncpg.create_pool(
                    self._dsn,
                    min_size=0,
                    max_size=self._pool_size,
                    timeout=self._connect_timeout,
                    command_timeout=self._timeout,
                    statement_cache_size=1024,
                    server_settings=settings,
                    # asyncpg resets a connection on release with a query of its own (RESET
                    # ALL, UNLISTEN, …): one more round trip per statement. otpgate never
                    # changes session state (an open transaction is still rolled back), so
                    # there is nothing to reset.
                    reset=_keep_session,
                )
                await pool
                self._pool = pool
        return self._pool

    async def _call(
        self, awaitable: Awaitable[T], doing: str, conn: asyncpg.Connection | None = None
    ) -> T:
        """Await a driver call, translating its errors. The translated error is raised outside
        the ``except`` block, so it carries no reference to the driver's exception (whose
        text can quote the row), not even as ``__context__``."""
        try:
            return await awaitable
        except Exception as exc:
            failure = _translate(exc, doing)
            if conn is not None and isinstance(exc, _BROKEN):
                _discard(conn)
        raise failure

    @contextlib.asynccontextmanager
    async def _connection(self, doing: str) -> AsyncIterator[asyncpg.Connection]:
        pool = await self._call(self._get_pool(), doing)
        conn = await self._call(
            pool.acquire(timeout=max(self._timeout, self._connect_timeout)), doing
        )
        try:
            yield conn
        except BaseException as exc:
            if isinstance(exc, Unavailable):
                _discard(conn)  # a timeout or outage: the connection's state is unknown
            raise
        finally:
            with contextlib.suppress(Exception):
                await pool.release(conn, timeout=self._timeout)

    async def fetch(
        self, conn: asyncpg.Connection, compiled: Compiled, params: dict[str, Any]
    ) -> list[Any]:
        return list(
            await self._call(conn.fetch(compiled.sql, *compiled.bind(params)), "statement", conn)
        )

    async def execute(
        self, conn: asyncpg.Connection, compiled: Compiled, params: dict[str, Any]
    ) -> int:
        status: str = await self._call(
            conn.execute(compiled.sql, *compiled.bind(params)), "statement", conn
        )
        # "UPDATE 3", "DELETE 0", "INSERT 0 1": the last word is the row count.
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isascii() and tail.isdigit() else 0

    # --- executor ----------------------------------------------------------------------------

    async def all(self, statement: ClauseElement, **params: Any) -> list[Row]:
        compiled = self.compiled(statement)
        async with self._connection("statement") as conn:
            return compiled.rows(await self.fetch(conn, compiled, params))

    async def one(self, statement: ClauseElement, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    async def run(self, statement: ClauseElement, **params: Any) -> int:
        compiled = self.compiled(statement)
        async with self._connection("statement") as conn:
            return await self.execute(conn, compiled, params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Connection]:
        async with self._connection("transaction") as conn:
            transaction = conn.transaction()
            await self._call(transaction.start(), "begin", conn)
            # Deferred writes ride along: one round trip and one commit for all of them.
            deferred = self._deferred.take()
            try:
                for sql, rows in _grouped(deferred):
                    await self._call(conn.executemany(sql, rows), "deferred write", conn)
                yield _Connection(self, conn)
                await self._call(transaction.commit(), "commit", conn)
            except BaseException:
                self._deferred.put_back(deferred)
                # A connection discarded after a fault is gone already (and the proxy of a
                # released connection refuses every call): only a live one is rolled back.
                with contextlib.suppress(Exception):
                    if conn.is_in_transaction():
                        await transaction.rollback()
                raise
            self._deferred.committed(deferred)

    async def defer(self, statement: ClauseElement, **params: Any) -> None:
        await self._deferred.add(self.compiled(statement), params)

    async def ping(self) -> None:
        async with self._connection("ping") as conn:
            await self._call(conn.fetchval("SELECT 1"), "ping", conn)

    async def aclose(self, *, grace_seconds: float = 2.0) -> None:
        """Commit what is deferred (trying for ``grace_seconds`` at most), then close."""
        await self._deferred.drain(grace_seconds)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except Exception:  # a hung server must not stall shutdown
                pool.terminate()
