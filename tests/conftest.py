"""Shared fixtures: real SQLite and PostgreSQL, a frozen clock, a recording SMS sender, and the
real app served in-process over httpx.

PostgreSQL comes from ``OTPGATE_TEST_POSTGRES_URL`` (default: the machine's
``postgresql://postgres@127.0.0.1:5432/test``); each test run gets a schema of its own, dropped
at the end, so runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from otpgate.adapters.storage.engine import create_engine
from otpgate.adapters.storage.migrate import upgrade
from otpgate.adapters.storage.tables import metadata
from otpgate.bootstrap import Container, build
from otpgate.domain.model import Channel, OutboundMessage, SendReceipt
from otpgate.entrypoints.api.app import create_app
from otpgate.settings import Settings

POSTGRES_URL = os.environ.get(
    "OTPGATE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
TEST_SECRET = "test-secret-" + "x" * 40
#: sqlite: the embedded default (sqlite3 on the event loop); postgres: asyncpg.
BACKENDS = ["sqlite", "postgres"]


class FrozenClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)


class RecordingSender:
    """A fake Sender that keeps what it was asked to send (fakes over mocks)."""

    name = "recording"
    channels = frozenset({Channel.SMS})

    def __init__(self) -> None:
        self.sent: list[OutboundMessage] = []

    async def send(self, sms: OutboundMessage) -> SendReceipt:
        self.sent.append(sms)
        return SendReceipt(provider_ref=sms.message_id)

    async def aclose(self) -> None:
        return None

    def codes_to(self, to: str) -> list[str]:
        return [code_in(s.text) for s in self.sent if s.to == to]


def code_in(text_: str) -> str:
    """The code in a rendered message (the built-in templates print it as a separate word)."""
    match = re.search(r"\b([0-9A-Z]{4,10})\b(?=\.|\s|$)", text_.split(":", 1)[-1])
    assert match, f"no code in {text_!r}"
    return match.group(1)


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    schema = "otpgate_test_" + secrets.token_hex(4)
    run_in_thread(upgrade(POSTGRES_URL, schema=schema))
    yield schema

    async def drop() -> None:
        engine = create_engine(POSTGRES_URL, pool_size=1)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()

    run_in_thread(drop())


def run_in_thread(coro: Any) -> Any:
    """Run a coroutine to completion on a fresh loop, also from inside a running one."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class Database:
    backend: str
    url: str
    schema: str
    sqlite_path: Path | None

    @contextlib.asynccontextmanager
    async def sql(self) -> AsyncIterator[Any]:
        """A SQLAlchemy connection of the test's own, in a transaction, to look behind the API."""
        engine = create_engine(self.url, schema=self.schema, pool_size=1)
        try:
            async with engine.begin() as conn:
                yield conn
        finally:
            await engine.dispose()


async def empty_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Database:
    """A migrated, empty database: a new SQLite file, or the session's PostgreSQL schema with
    every table emptied."""
    if backend == "sqlite":
        path = tmp_path / "otpgate.db"
        url = f"sqlite:///{path}"
        await upgrade(url)
        return Database(backend, url, "", path)
    schema = request.getfixturevalue("postgres_schema")
    engine = create_engine(POSTGRES_URL, schema=schema, pool_size=1)
    async with engine.begin() as conn:
        names = ", ".join(f'"{t.name}"' for t in reversed(metadata.sorted_tables))
        await conn.execute(text(f"TRUNCATE {names} CASCADE"))
    await engine.dispose()
    return Database("postgres", POSTGRES_URL, schema, None)


@pytest.fixture(params=BACKENDS)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    """A migrated, empty database of each backend."""
    return await empty_database(request.param, tmp_path, request)


def make_settings(database: Database, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "env": "test",
        "data_dir": tmp_path,
        "database_url": database.url,
        "database_schema": database.schema,
        "secret_key": TEST_SECRET,
        "log_json": True,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Api:
    """The app under test and what a test needs to drive it."""

    http: httpx.AsyncClient
    container: Container
    sender: RecordingSender
    clock: FrozenClock
    key: str
    account_id: str
    service_id: str
    database: Database

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def start(self, to: str = "+34600000001", **fields: Any) -> httpx.Response:
        body = {"service_id": self.service_id, "to": to, **fields}
        return await self.http.post("/v1/verifications", json=body, headers=self.auth())

    async def deliver(self) -> None:
        await self.container.dispatcher.drain()

    async def check(self, verification_id: str, code: str, **fields: Any) -> httpx.Response:
        return await self.http.post(
            f"/v1/verifications/{verification_id}/check",
            json={"code": code, **fields},
            headers=self.auth(),
        )

    async def new_service(self, **fields: Any) -> str:
        response = await self.http.post(
            "/v1/services", json={"name": "Acme", **fields}, headers=self.auth()
        )
        assert response.status_code == 201, response.text
        service_id: str = response.json()["id"]
        return service_id


@contextlib.asynccontextmanager
async def serving(settings: Settings, database: Database) -> AsyncIterator[Api]:
    """The real app built from ``settings``, with a recording sender and a frozen clock, its
    default account and a service, served in-process; the test drives delivery (``deliver``)."""
    clock = FrozenClock()
    sender = RecordingSender()
    container = build(settings, sender=sender, clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://otpgate.test") as http:
            api = Api(http, container, sender, clock, issued.secret, account.id, "", database)
            api.service_id = await api.new_service()
            yield api


@pytest.fixture
async def api(database: Database, tmp_path: Path) -> AsyncIterator[Api]:
    """The real app on a real database of each backend."""
    async with serving(make_settings(database, tmp_path), database) as running:
        yield running
