"""The SQLite executor: ``sqlite3`` on the event loop, for the embedded default.

Why on the loop and not in a thread or through SQLAlchemy's async engine: a local WAL database
answers a statement in microseconds, while a hop to a worker thread (aiosqlite) and back costs
about ten times that (docs/performance.md). A statement never blocks the loop on a lock either:
``busy_timeout`` is 0, so a lock held by another process (``otpgate worker``, the CLI, a backup)
makes SQLite answer "busy" at once, and the executor retries with short ``asyncio.sleep``
backoffs until ``lock_timeout_seconds`` (1 s by default) and then raises ``Unavailable``.

Transactions start with ``BEGIN IMMEDIATE``, which takes the write lock up front, so a
read-then-write transaction cannot fail half-way when several processes share the file. A
transaction's body runs without suspending (see ``executor.py``), so one connection serves the
whole process without interleaving.

Group commit (``executor.DeferredWrites``): :meth:`SqliteExecutor.defer` queues a write and
waits; the next transaction of the process runs every queued write before its own statements
and commits them together, or, when none comes within ``defer_seconds``, a timer commits them
alone. Under load one commit carries many sent-marks. A queued write whose commit fails stays
queued for the next commit, so a sent message can never look unsent to a later claim in this
process.

Faults (a full disk, an I/O error, a file that cannot be written) raise ``Unavailable``; the
executor remembers the last write's outcome, and :meth:`ping` (``/readyz``) reports a failed
write until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlalchemy.sql import ClauseElement

from otpgate.adapters.storage.executor import (
    Compiled,
    Conflict,
    DeferredWrites,
    Row,
    StatementCache,
    StorageError,
)
from otpgate.adapters.storage.tables import metadata
from otpgate.errors import Unavailable

LOCK_TIMEOUT_SECONDS = 1.0
#: Longest a deferred write waits for a transaction to ride along with.
DEFER_SECONDS = 0.005
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
_FIRST_BACKOFF = 0.001
_MAX_BACKOFF = 0.05


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in _BUSY_CODES


#: Result codes that mean the database cannot serve now (locked, full, unreadable, gone).
_OUTAGE_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def _fault(exc: sqlite3.Error, doing: str) -> Exception:
    """Our error for a driver error. sqlite3's messages name constraints and conditions
    ("database or disk is full"), never bound values, so they may be kept."""
    code = _primary_code(exc)
    unique = "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc)
    if isinstance(exc, sqlite3.IntegrityError) and code == sqlite3.SQLITE_CONSTRAINT and unique:
        return Conflict(str(exc))
    if code in _OUTAGE_CODES or (isinstance(exc, sqlite3.OperationalError) and code is None):
        return Unavailable(f"storage is unavailable ({doing}: {exc}); retry shortly", retry_after=1)
    return StorageError(f"{doing}: {type(exc).__name__}: {exc}")


class _Transaction:
    """The session of an open transaction: statements run directly on the connection."""

    __slots__ = ("_executor",)

    def __init__(self, executor: SqliteExecutor) -> None:
        self._executor = executor

    async def all(self, statement: ClauseElement, **params: Any) -> list[Row]:
        compiled = self._executor.compiled(statement)
        return compiled.rows(self._executor.raw(compiled, params))

    async def one(self, statement: ClauseElement, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    async def run(self, statement: ClauseElement, **params: Any) -> int:
        compiled = self._executor.compiled(statement)
        cursor = self._executor.cursor(compiled, params)
        cursor.fetchall()
        return cursor.rowcount


class SqliteExecutor:
    """Implements ``executor.Executor`` on one ``sqlite3`` connection."""

    dialect = "sqlite"

    def __init__(
        self,
        path: Path | str,
        *,
        lock_timeout_seconds: float = LOCK_TIMEOUT_SECONDS,
        defer_seconds: float = DEFER_SECONDS,
    ) -> None:
        self.path = path
        if isinstance(path, Path):
            path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread is off only so that tests may close the executor from another
        # thread; otpgate itself uses it from the event-loop thread alone.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in (
            "journal_mode=WAL",
            "synchronous=NORMAL",
            "cache_size=-65536",
            "busy_timeout=0",  # never block the loop on a lock: retry with asyncio instead
            "foreign_keys=ON",
        ):
            self._db.execute(f"PRAGMA {pragma}")
        self.compiled = StatementCache(sqlite_dialect.dialect())
        self._lock_timeout = lock_timeout_seconds
        self._deferred = DeferredWrites(defer_seconds, self.transaction)
        self._in_transaction = False
        #: The last write's failure, until a write succeeds (``/readyz`` reports it).
        self._write_fault: Unavailable | None = None

    # --- running statements ------------------------------------------------------------------

    def cursor(self, compiled: Compiled, params: dict[str, Any]) -> sqlite3.Cursor:
        """Execute once, translating errors (no retry: inside a transaction, or a retry loop)."""
        try:
            return self._db.execute(compiled.sql, compiled.bind(params))
        except sqlite3.Error as exc:
            raise self._failed(exc, "statement", compiled.writes) from None

    def raw(self, compiled: Compiled, params: dict[str, Any]) -> list[Any]:
        cursor = self.cursor(compiled, params)
        try:
            return cursor.fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc, "statement", compiled.writes) from None

    def _failed(self, exc: sqlite3.Error, doing: str, writing: bool) -> Exception:
        error = _fault(exc, doing)
        if writing and isinstance(error, Unavailable) and not _is_busy(exc):
            self._write_fault = error
        return error

    async def _waiting(
        self, sql: str, params: tuple[Any, ...], *, doing: str, writes: bool
    ) -> sqlite3.Cursor:
        """Execute ``sql`` outside any transaction, retrying while the database is busy (a lock
        held by another process) with ``asyncio.sleep`` backoffs, so the loop never blocks,
        until the lock timeout; then ``Unavailable``."""
        if self._in_transaction:
            # Only possible if a transaction body suspended: a bug that would mix statements.
            raise RuntimeError("a statement ran while a transaction was open on the connection")
        deadline = None
        backoff = _FIRST_BACKOFF
        while True:
            try:
                return self._db.execute(sql, params)
            except sqlite3.Error as exc:
                now = time.monotonic()
                deadline = deadline or now + self._lock_timeout
                if not _is_busy(exc) or now >= deadline:
                    raise self._failed(exc, doing, writes) from None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _retrying(self, compiled: Compiled, params: dict[str, Any]) -> sqlite3.Cursor:
        """Execute one statement on its own (SQLite makes it atomic), waiting out a busy
        database as :meth:`_waiting` does."""
        cursor = await self._waiting(
            compiled.sql, compiled.bind(params), doing="statement", writes=compiled.writes
        )
        if compiled.writes:
            self._write_fault = None
        return cursor

    async def all(self, statement: ClauseElement, **params: Any) -> list[Row]:
        compiled = self.compiled(statement)
        if compiled.writes and self._deferred:
            async with self.transaction() as tx:
                return await tx.all(statement, **params)
        cursor = await self._retrying(compiled, params)
        try:
            return compiled.rows(cursor.fetchall()) if compiled.columns else []
        except sqlite3.Error as exc:
            raise self._failed(exc, "statement", compiled.writes) from None

    async def one(self, statement: ClauseElement, **params: Any) -> Row | None:
        rows = await self.all(statement, **params)
        return rows[0] if rows else None

    async def run(self, statement: ClauseElement, **params: Any) -> int:
        compiled = self.compiled(statement)
        if self._deferred:
            async with self.transaction() as tx:
                return await tx.run(statement, **params)
        cursor = await self._retrying(compiled, params)
        if compiled.columns:
            cursor.fetchall()
        return cursor.rowcount

    # --- transactions ------------------------------------------------------------------------

    async def _begin(self) -> None:
        await self._waiting("BEGIN IMMEDIATE", (), doing="begin", writes=True)

    def _rollback(self) -> None:
        # After some errors (a full disk) SQLite has rolled back already; a second ROLLBACK
        # would raise and hide the first error, and leave waiters hanging.
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        await self._begin()
        self._in_transaction = True
        # Deferred writes ride along: one commit instead of one each.
        deferred = self._deferred.take()
        try:
            try:
                for item in deferred:
                    self._db.execute(item.compiled.sql, item.params)
            except sqlite3.Error as exc:
                raise self._failed(exc, "deferred write", True) from None
            yield _Transaction(self)
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._failed(exc, "commit", True) from None
        except BaseException:
            self._rollback()
            self._deferred.put_back(deferred)
            raise
        finally:
            self._in_transaction = False
        self._write_fault = None
        self._deferred.committed(deferred)

    async def defer(self, statement: ClauseElement, **params: Any) -> None:
        await self._deferred.add(self.compiled(statement), params)

    # --- health and lifetime -----------------------------------------------------------------

    async def ping(self) -> None:
        """Ready means: reads work, the write lock can be had within the lock timeout, and,
        after a write failed (a full disk, an I/O error), a real write succeeds again."""
        try:
            self._db.execute("SELECT 1").fetchall()
        except sqlite3.Error as exc:
            raise self._failed(exc, "ping", False) from None
        try:
            async with self.transaction():
                if self._write_fault is not None:
                    self._probe_write()
        except Unavailable as exc:
            raise Unavailable(f"storage cannot write: {exc.detail}", retry_after=1) from None

    async def aclose(self, *, grace_seconds: float = 2.0) -> None:
        """Commit what is deferred (trying for ``grace_seconds`` at most), then close."""
        await self._deferred.drain(grace_seconds)
        self._db.close()

    def _probe_write(self) -> None:
        """Rewrite the header's ``user_version`` with its own value: a committed change of one
        page, which needs the WAL to grow or be rewritten, as any real write does, and changes
        nothing anyone reads."""
        try:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            self._db.execute(f"PRAGMA user_version = {int(version)}")
        except sqlite3.Error as exc:
            raise self._failed(exc, "probe write", True) from None

    # --- schema for in-memory databases ------------------------------------------------------

    def create_schema(self) -> None:
        """Create every table and index of ``tables.py`` (for in-memory databases in tests;
        files are migrated with Alembic)."""
        dialect = self.compiled.dialect
        for table in metadata.sorted_tables:
            self._db.execute(str(CreateTable(table).compile(dialect=dialect)))
            for index in table.indexes:
                self._db.execute(str(CreateIndex(index).compile(dialect=dialect)))
