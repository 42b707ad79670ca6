"""Engines from ordinary database URLs: otpgate picks the async driver.

``sqlite:///var/otpgate.db`` → aiosqlite, WAL journal, ``BEGIN IMMEDIATE`` transactions and a
single pooled connection (SQLite has one writer; queuing in the pool is cheaper than lock
retries). ``postgresql://…`` → asyncpg with short connect and command timeouts, so an outage
fails requests fast (S24) instead of hanging them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from otpgate.errors import ConfigurationError

SQLITE_BUSY_TIMEOUT_MS = 5_000
POOL_TIMEOUT_SECONDS = 5.0
PG_CONNECT_TIMEOUT_SECONDS = 3.0
PG_COMMAND_TIMEOUT_SECONDS = 10.0


def async_url(url: str) -> str:
    """The same URL with the async driver otpgate uses for it.

    >>> async_url("postgresql://postgres@127.0.0.1:5432/test")
    'postgresql+asyncpg://postgres@127.0.0.1:5432/test'
    >>> async_url("sqlite:///var/otpgate.db")
    'sqlite+aiosqlite:///var/otpgate.db'
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend == "postgresql":
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ConfigurationError(
        f"OTPGATE_DATABASE_URL: unsupported database {backend!r} (use sqlite or postgresql)"
    )


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for in-memory databases)."""
    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def create_engine(url: str, *, schema: str = "", pool_size: int = 10) -> AsyncEngine:
    """An async engine for ``url`` (sync-style URLs are accepted and translated)."""
    if is_sqlite(url):
        path = sqlite_file(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            async_url(url),
            pool_size=1,
            max_overflow=0,
            pool_timeout=POOL_TIMEOUT_SECONDS,
            hide_parameters=True,
        )
        _configure_sqlite(engine)
        return engine
    connect_args: dict[str, Any] = {
        "timeout": PG_CONNECT_TIMEOUT_SECONDS,
        "command_timeout": PG_COMMAND_TIMEOUT_SECONDS,
    }
    if schema:
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        pool_pre_ping=True,
        connect_args=connect_args,
        # Statement errors otherwise quote their parameters (numbers, digests) in logs.
        hide_parameters=True,
    )


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from the driver so that BEGIN IMMEDIATE below is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # IMMEDIATE takes the write lock up front: a read-then-write transaction can then never
        # fail half-way with SQLITE_BUSY when several processes share the file.
        connection.exec_driver_sql("BEGIN IMMEDIATE")
