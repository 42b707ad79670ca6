"""Group commit of sent-marks (``Executor.defer``), on a real SQLite file and on PostgreSQL.

``mark_sent`` must return only once its update is committed, must ride along with the next
transaction of the process (one commit for many), must survive a carrying transaction that
rolls back, must report ``Unavailable`` when no commit is possible and then stay queued, so
that a later claim of this process can never see the message as unsent, and must be committed
when the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from otpgate.adapters.storage.executor import Executor
from otpgate.adapters.storage.postgres import PostgresExecutor
from otpgate.adapters.storage.sqlite import SqliteExecutor
from otpgate.adapters.storage.store import SqlStore
from otpgate.bootstrap import Container, build
from otpgate.domain.model import SendReceipt, new_id
from otpgate.errors import Unavailable
from otpgate.services.verification import StartRequest
from tests.conftest import POSTGRES_URL, Database, FrozenClock, RecordingSender, make_settings

NEVER = 3600.0  # a flush delay no test waits for: only a carrying transaction commits


@dataclass
class World:
    database: Database
    container: Container
    clock: FrozenClock
    verification_ids: list[str]
    message_ids: list[str]

    async def statuses(self) -> dict[str, str]:
        """Message statuses as another connection sees them (committed data only)."""
        async with self.database.sql() as conn:
            rows = await conn.execute(text("SELECT id, status FROM messages"))
            return {row[0]: row[1] for row in rows}

    def store(self, *, defer_seconds: float, timeout_seconds: float = 1.0) -> SqlStore:
        """A second store on the same database (another process, as far as commits go)."""
        executor: Executor
        if self.database.sqlite_path is not None:
            executor = SqliteExecutor(
                self.database.sqlite_path,
                defer_seconds=defer_seconds,
                lock_timeout_seconds=timeout_seconds,
            )
        else:
            executor = PostgresExecutor(
                self.database.url,
                schema=self.database.schema,
                defer_seconds=defer_seconds,
                timeout_seconds=timeout_seconds,
            )
        return SqlStore(executor)

    @contextlib.asynccontextmanager
    async def messages_locked(self) -> AsyncIterator[None]:
        """Another process holds what a write of the messages needs, until the block ends."""
        if self.database.sqlite_path is not None:
            blocker = sqlite3.connect(self.database.sqlite_path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            try:
                yield
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()
            return
        conn = await asyncpg.connect(
            POSTGRES_URL, server_settings={"search_path": self.database.schema}
        )
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("LOCK TABLE messages IN EXCLUSIVE MODE")
            yield
            await transaction.rollback()
        finally:
            await conn.close()


@pytest.fixture
async def world(database: Database, tmp_path: Path) -> AsyncIterator[World]:
    """Three queued messages of three pending verifications, written by otpgate itself."""
    clock = FrozenClock()
    container = build(make_settings(database, tmp_path), sender=RecordingSender(), clock=clock)
    try:
        _, issued = await container.access.ensure_default_account()
        assert issued is not None
        principal = await container.access.authenticate(issued.secret)
        service = await container.catalog.create(principal, {"name": "Group"})
        verification_ids, message_ids = [], []
        for n in range(3):
            verification, created = await container.verifications.start(
                principal, StartRequest(service_id=service.id, to=f"+3460000001{n}")
            )
            assert created
            verification_ids.append(verification.id)
            message_ids.append(verification.messages[0].id)
        yield World(database, container, clock, verification_ids, message_ids)
    finally:
        await container.aclose()


def mark(store: SqlStore, world: World, index: int) -> asyncio.Task[None]:
    return asyncio.create_task(
        store.mark_sent(
            world.message_ids[index],
            provider="recording",
            receipt=SendReceipt(provider_ref=f"ref{index}"),
            now=world.clock.now(),
        )
    )


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_marks_wait_for_a_commit_and_ride_along_with_the_next_transaction(
    world: World,
) -> None:
    store = world.store(defer_seconds=NEVER)
    try:
        first, second = mark(store, world, 0), mark(store, world, 1)
        await settle()
        assert not first.done() and not second.done()
        assert set((await world.statuses()).values()) == {"queued"}

        # An approval that clears a failure record is a transaction: both marks share it.
        assert await store.approve(
            world.verification_ids[2], world.clock.now(), clear_failures=True
        )
        await settle()
        assert first.done() and second.done()
        first.result()
        second.result()
        statuses = await world.statuses()
        assert statuses[world.message_ids[0]] == "sent"
        assert statuses[world.message_ids[1]] == "sent"
        assert statuses[world.message_ids[2]] == "queued"
    finally:
        await store.aclose()


async def test_a_mark_alone_is_committed_after_the_delay(world: World) -> None:
    store = world.store(defer_seconds=0.01)
    try:
        await asyncio.wait_for(mark(store, world, 0), timeout=5)
        assert (await world.statuses())[world.message_ids[0]] == "sent"
    finally:
        await store.aclose()


async def test_marks_survive_a_carrying_transaction_that_rolls_back(world: World) -> None:
    store = world.store(defer_seconds=NEVER)
    try:
        waiting = mark(store, world, 0)
        await settle()
        # A second pending verification for the same number: the transaction rolls back.
        account = (await world.container.access.ensure_default_account())[0]
        pending = await store.get_verification(account.id, world.verification_ids[1])
        assert pending is not None
        twin = replace(pending, id=new_id("ver"), messages=())
        message = replace(pending.messages[0], id=new_id("msg"), verification_id=twin.id)
        assert not await store.create_verification(twin, message, body_masked="x")
        await settle()
        assert not waiting.done()
        assert (await world.statuses())[world.message_ids[0]] == "queued"

        assert await store.approve(
            world.verification_ids[1], world.clock.now(), clear_failures=True
        )
        await settle()
        assert waiting.done()
        waiting.result()
        assert (await world.statuses())[world.message_ids[0]] == "sent"
    finally:
        await store.aclose()


async def test_a_mark_that_cannot_be_committed_stays_queued(world: World) -> None:
    store = world.store(defer_seconds=0.01, timeout_seconds=0.2)
    try:
        async with world.messages_locked():
            with pytest.raises(Unavailable):
                await asyncio.wait_for(mark(store, world, 0), timeout=10)
        assert (await world.statuses())[world.message_ids[0]] == "queued"
        # The mark stays queued: the next transaction of the process commits it first, so a
        # claim can never see the message as unsent again.
        claimed = await store.claim_due(now=world.clock.now(), lease_seconds=30, limit=10)
        assert world.message_ids[0] not in {c.message.id for c in claimed}
        assert (await world.statuses())[world.message_ids[0]] == "sent"
    finally:
        await store.aclose()


async def test_closing_the_store_commits_waiting_marks(world: World) -> None:
    store = world.store(defer_seconds=NEVER)
    waiting = mark(store, world, 0)
    await settle()
    await store.aclose()
    await settle()
    waiting.result()
    assert (await world.statuses())[world.message_ids[0]] == "sent"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_on_sqlite_a_lone_write_carries_the_marks_too(world: World) -> None:
    store = world.store(defer_seconds=NEVER)
    try:
        waiting = mark(store, world, 0)
        await settle()
        # A lone write (here an approval without failures to clear) runs in a transaction when
        # marks are waiting, so they share its commit: SQLite's commits are its cost.
        assert await store.approve(
            world.verification_ids[2], world.clock.now(), clear_failures=False
        )
        await settle()
        waiting.result()
        assert (await world.statuses())[world.message_ids[0]] == "sent"
    finally:
        await store.aclose()
