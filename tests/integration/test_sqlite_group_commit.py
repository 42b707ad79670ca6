"""The SQLite executor's group commit of sent-marks, on a real SQLite file.

``mark_sent`` must return only once its update is committed, must ride along with the next
write transaction of the process (one commit for many), must survive a carrying transaction
that rolls back, and must report ``Unavailable`` when no commit is possible.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otpgate.adapters.storage.migrate import upgrade
from otpgate.adapters.storage.sqlite import SqliteExecutor
from otpgate.adapters.storage.store import SqlStore
from otpgate.bootstrap import Container, build
from otpgate.domain.model import Account, SendReceipt
from otpgate.errors import InvalidRequest, Unavailable
from otpgate.services.verification import StartRequest
from otpgate.settings import Settings
from tests.conftest import TEST_SECRET, FrozenClock, RecordingSender

NEVER = 3600.0  # a flush delay no test waits for: only a carrying transaction commits


@dataclass
class World:
    path: Path
    container: Container
    clock: FrozenClock
    account: Account
    verification_ids: list[str]
    message_ids: list[str]

    def statuses(self) -> dict[str, str]:
        """Message statuses as another connection sees them (committed data only)."""
        with sqlite3.connect(self.path) as other:
            return dict(other.execute("SELECT id, status FROM messages").fetchall())

    def store(self, **options: float) -> SqlStore:
        return SqlStore(SqliteExecutor(self.path, **options))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Three queued messages of three pending verifications, written by otpgate itself."""
    path = tmp_path / "otpgate.db"
    url = f"sqlite:///{path}"
    await upgrade(url)
    clock = FrozenClock()
    settings = Settings(env="test", data_dir=tmp_path, database_url=url, secret_key=TEST_SECRET)
    container = build(settings, sender=RecordingSender(), clock=clock)
    try:
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        principal = await container.access.authenticate(issued.secret)
        service = await container.catalog.create(principal, {"name": "Group"})
        verification_ids = []
        for n in range(3):
            verification, created = await container.verifications.start(
                principal, StartRequest(service_id=service.id, to=f"+3460000001{n}")
            )
            assert created
            verification_ids.append(verification.id)
        with sqlite3.connect(path) as db:
            message_ids = [
                row[0]
                for row in db.execute(
                    "SELECT m.id FROM messages m JOIN verifications v ON v.id = m.verification_id "
                    'ORDER BY v."to"'
                )
            ]
        yield World(path, container, clock, account, verification_ids, message_ids)
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


async def test_marks_wait_for_a_commit_and_ride_along_with_the_next_write(world: World) -> None:
    store = world.store(defer_seconds=NEVER)
    try:
        first, second = mark(store, world, 0), mark(store, world, 1)
        await settle()
        assert not first.done() and not second.done()
        assert set(world.statuses().values()) == {"queued"}

        # An approval is a write: both waiting marks share its commit.
        assert await store.approve(
            world.verification_ids[2], world.clock.now(), clear_failures=False
        )
        await settle()
        assert first.done() and second.done()
        first.result()
        second.result()
        statuses = world.statuses()
        assert statuses[world.message_ids[0]] == "sent"
        assert statuses[world.message_ids[1]] == "sent"
        assert statuses[world.message_ids[2]] == "queued"
    finally:
        await store.aclose()


async def test_a_mark_alone_is_committed_after_the_delay(world: World) -> None:
    store = world.store(defer_seconds=0.01)
    try:
        await asyncio.wait_for(mark(store, world, 0), timeout=5)
        assert world.statuses()[world.message_ids[0]] == "sent"
    finally:
        await store.aclose()


async def test_marks_survive_a_carrying_transaction_that_rolls_back(world: World) -> None:
    store = world.store(defer_seconds=NEVER)
    try:
        waiting = mark(store, world, 0)
        await settle()
        # The same account again: the insert fails and its transaction rolls back.
        with pytest.raises(InvalidRequest):
            await store.create_account(world.account)
        await settle()
        assert not waiting.done()
        assert world.statuses()[world.message_ids[0]] == "queued"

        assert await store.approve(
            world.verification_ids[1], world.clock.now(), clear_failures=True
        )
        await settle()
        assert waiting.done()
        waiting.result()
        assert world.statuses()[world.message_ids[0]] == "sent"
    finally:
        await store.aclose()


async def test_a_mark_that_cannot_be_committed_raises_unavailable(world: World) -> None:
    store = world.store(defer_seconds=0.01, lock_timeout_seconds=0.05)
    blocker = sqlite3.connect(world.path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(Unavailable):
            await asyncio.wait_for(mark(store, world, 0), timeout=5)
        blocker.execute("ROLLBACK")
        assert world.statuses()[world.message_ids[0]] == "queued"
        # The mark stays queued: the next write of the process commits it first, so a claim
        # can never see the message as unsent again.
        claimed = await store.claim_due(now=world.clock.now(), lease_seconds=30, limit=10)
        assert world.message_ids[0] not in {c.message.id for c in claimed}
        assert world.statuses()[world.message_ids[0]] == "sent"
    finally:
        blocker.close()
        await store.aclose()


async def test_closing_the_store_commits_waiting_marks(world: World) -> None:
    store = world.store(defer_seconds=NEVER)
    waiting = mark(store, world, 0)
    await settle()
    await store.aclose()
    await settle()
    waiting.result()
    assert world.statuses()[world.message_ids[0]] == "sent"
