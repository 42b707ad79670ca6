"""How a statement defined once in SQLAlchemy Core runs on a native driver.

Every statement otpgate runs is a SQLAlchemy Core construct in ``statements.py``. An executor
compiles each one once for its dialect (:func:`compile_statement`), then runs the SQL text
through its driver (``sqlite3`` or asyncpg) with parameters encoded and rows decoded by the
column types of ``tables.py``. SQLAlchemy builds and compiles; it never executes, so a query
costs what the driver costs, and the two backends cannot drift apart: there is only one text
of each statement and each security predicate.

The :class:`Executor` contract, kept by ``sqlite.py`` and ``postgres.py``:

* ``all``, ``one`` and ``run`` execute one statement; outside a transaction each is atomic
  on its own.
* ``transaction()`` yields a :class:`Session` whose statements commit together or not at all.
  A transaction body awaits nothing but its own statements, so that on SQLite (one
  connection shared by the event loop) no other coroutine can run inside it.
* ``defer`` queues a write that must be durable before it returns but may share a commit with
  other writes (the sent-marks of the delivery dispatcher).
* A unique-constraint violation raises :class:`Conflict`; a database that is down, locked for
  longer than the timeout, full or timing out raises :class:`otpgate.errors.Unavailable`; any
  other driver error raises :class:`StorageError`. None of them carries a bound parameter
  (phone numbers, digests) or the driver's error detail, which can quote them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from sqlalchemy import JSON, Boolean, Integer, LargeBinary, String, Text
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.types import NullType, TypeEngine

from otpgate.adapters.storage.tables import UTCDateTime
from otpgate.errors import Unavailable

Row = dict[str, Any]
Codec = Callable[[Any], Any]


class Conflict(Exception):
    """A unique constraint refused a write (a taken username, a second pending verification
    for one destination, an idempotency key in use). Carries no values."""


class StorageError(RuntimeError):
    """A driver error that is neither a conflict nor an outage: a bug, not bad luck. Its message
    names the error class and SQLSTATE only, never the statement's parameters."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """One statement compiled for one dialect, with what it takes to bind and read it."""

    sql: str
    #: Bind parameter names in the order the driver wants the values.
    names: tuple[str, ...]
    #: Values fixed when the statement was built (literals such as ``'pending'``).
    fixed: Mapping[str, Any]
    encoders: tuple[Codec | None, ...]
    #: Result column names and their decoders (empty when the statement returns no rows).
    columns: tuple[str, ...]
    decoders: tuple[Codec | None, ...]
    writes: bool

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional values for ``params`` (keyword values of the call)."""
        values = []
        for name, encode in zip(self.names, self.encoders, strict=True):
            value = params[name] if name in params else self.fixed[name]
            values.append(value if encode is None or value is None else encode(value))
        return tuple(values)

    def rows(self, raw: Sequence[Sequence[Any]]) -> list[Row]:
        """Driver rows as dicts keyed by column name, values decoded."""
        columns, decoders = self.columns, self.decoders
        out = []
        for record in raw:
            row = {}
            for name, decode, value in zip(columns, decoders, record, strict=True):
                row[name] = value if decode is None or value is None else decode(value)
            out.append(row)
        return out


# --- value codecs, by column type and dialect ------------------------------------------------


def sqlite_stamp(value: datetime) -> str:
    """A timezone-aware datetime as otpgate stores it in SQLite: naive UTC text with six
    fraction digits, so that text order is time order (the format SQLAlchemy's SQLite dialect
    writes, so databases written by earlier versions read the same)."""
    if value.tzinfo is not UTC:
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _sqlite_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _naive_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC)


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_PASS_THROUGH = (String, Text, Integer, LargeBinary)


def _encoder(type_: TypeEngine[Any], dialect: str) -> Codec | None:
    if isinstance(type_, UTCDateTime):
        return sqlite_stamp if dialect == "sqlite" else _naive_utc
    if isinstance(type_, JSON):
        return _json_text
    if isinstance(type_, Boolean):
        return int if dialect == "sqlite" else bool
    if isinstance(type_, _PASS_THROUGH):
        return None
    raise TypeError(f"no encoder for {type_!r}: give the bind parameter a column type")


def _decoder(type_: TypeEngine[Any], dialect: str) -> Codec | None:
    if isinstance(type_, UTCDateTime):
        return _sqlite_time if dialect == "sqlite" else _aware
    if isinstance(type_, JSON):
        return json.loads
    if isinstance(type_, Boolean):
        return bool
    if isinstance(type_, LargeBinary):
        return bytes
    return None


def compile_statement(statement: ClauseElement, dialect: Dialect) -> Compiled:
    """Compile ``statement`` for ``dialect`` (positional parameters) and work out its codecs.

    Every bind parameter must have a known type (a column's, or one given explicitly), so a
    value can never reach the driver in a form the other backend would store differently.
    """
    compiled = cast(SQLCompiler, statement.compile(dialect=dialect))
    if "POSTCOMPILE" in compiled.string:
        raise TypeError("expanding parameters are not supported: build one bind per value")
    names = tuple(compiled.positiontup or ())
    encoders = []
    for name in names:
        bind = compiled.binds[name]
        if isinstance(bind.type, NullType):
            raise TypeError(f"bind parameter {name!r} has no type")
        encoders.append(_encoder(bind.type, dialect.name))
    fixed = {
        name: bind.value
        for name, bind in compiled.binds.items()
        if not bind.required and bind.callable is None
    }
    result = getattr(compiled, "_result_columns", None) or []
    return Compiled(
        sql=compiled.string,
        names=names,
        fixed=fixed,
        encoders=tuple(encoders),
        columns=tuple(entry.keyname for entry in result),
        decoders=tuple(_decoder(entry.type, dialect.name) for entry in result),
        writes=isinstance(statement, UpdateBase),
    )


class StatementCache:
    """Compiled statements of one dialect, compiled on first use. Statements are module-level
    constants (or cached builders), so the cache stays small and keyed by identity."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[int, tuple[ClauseElement, Compiled]] = {}

    def __call__(self, statement: ClauseElement) -> Compiled:
        hit = self._compiled.get(id(statement))
        if hit is not None:
            return hit[1]
        compiled = compile_statement(statement, self.dialect)
        # The statement is kept alive with its compiled form, so its id is never reused.
        self._compiled[id(statement)] = (statement, compiled)
        return compiled


# --- group commit ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deferred:
    """A write waiting for a commit to ride along with."""

    compiled: Compiled
    params: tuple[Any, ...]
    waiter: asyncio.Future[None]


class DeferredWrites:
    """The queue behind ``Executor.defer``, shared by both executors.

    A deferred write is executed at the start of the next transaction of the process, before
    the transaction's own statements, and is durable when that transaction commits; if no
    transaction comes within ``delay_seconds``, an empty transaction of the executor
    (``transaction``) is opened to carry it. Writes whose carrying transaction fails are put back at
    the head of the queue and ride with the next one: a write is never dropped while the
    process lives, so the state it records (a message was sent) can never be read as its
    opposite by a later transaction of this process. Their waiters learn of the failure.
    """

    def __init__(
        self,
        delay_seconds: float,
        transaction: Callable[[], AbstractAsyncContextManager[Any]],
    ) -> None:
        self._delay = delay_seconds
        self._transaction = transaction
        self._queue: list[Deferred] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self._queue)

    def add(self, compiled: Compiled, params: Mapping[str, Any]) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(Deferred(compiled, compiled.bind(params), waiter))
        self._schedule()
        return waiter

    def take(self) -> list[Deferred]:
        """Everything queued, for a transaction to execute first."""
        taken, self._queue = self._queue, []
        return taken

    def committed(self, taken: list[Deferred]) -> None:
        for item in taken:
            if not item.waiter.done():
                item.waiter.set_result(None)

    def put_back(self, taken: list[Deferred]) -> None:
        """The carrying transaction failed: these ride with the next one."""
        if taken:
            self._queue[:0] = taken
            self._schedule()

    async def _commit(self) -> None:
        async with self._transaction():
            pass  # the transaction itself executes and commits what is queued

    def _schedule(self) -> None:
        if self._timer is None and self._flushing is None:
            self._timer = asyncio.get_running_loop().call_later(self._delay, self._start)

    def _start(self) -> None:
        self._timer = None
        if self._queue:
            self._flushing = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        waiting = list(self._queue)
        try:
            await self._commit()
        except (Unavailable, StorageError) as exc:
            for item in waiting:
                if not item.waiter.done():
                    item.waiter.set_exception(
                        Unavailable(f"could not commit: {exc}", retry_after=1)
                    )
        finally:
            self._flushing = None
            if any(not item.waiter.done() for item in self._queue):
                self._schedule()

    async def drain(self, grace_seconds: float) -> None:
        """Commit what is queued, trying for ``grace_seconds`` at most (at shutdown); writes
        still queued then fail their waiters."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = time.monotonic() + grace_seconds
        while self._queue and time.monotonic() < deadline:
            if self._flushing is not None:
                with contextlib.suppress(Exception):
                    await self._flushing
                continue
            with contextlib.suppress(Unavailable, StorageError):
                await self._commit()
            if self._queue:
                await asyncio.sleep(0.05)
        for item in self._queue:
            if not item.waiter.done():
                item.waiter.set_exception(Unavailable("storage closed before the write"))
        self._queue = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# --- the executor protocol -------------------------------------------------------------------


class Session(Protocol):
    """Runs statements: on its own (an :class:`Executor`) or inside one transaction."""

    async def all(self, statement: ClauseElement, **params: Any) -> list[Row]:
        """Every row the statement returns (none for a write without RETURNING)."""
        ...

    async def one(self, statement: ClauseElement, **params: Any) -> Row | None:
        """The first row, or None."""
        ...

    async def run(self, statement: ClauseElement, **params: Any) -> int:
        """Execute a write; the number of rows it changed."""
        ...


class Executor(Session, Protocol):
    dialect: str

    def transaction(self) -> AbstractAsyncContextManager[Session]:
        """A transaction: its statements commit together on a clean exit, roll back on an
        exception. The body must await nothing but the yielded session's statements."""
        ...

    async def defer(self, statement: ClauseElement, **params: Any) -> None:
        """Execute a write whose commit may be shared with other writes; returns once it is
        durable. On failure the write stays queued (it is retried with the next commit) and
        this raises ``Unavailable``."""
        ...

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless the database can read and write now."""
        ...

    async def aclose(self) -> None: ...
