"""The use cases on the SQLite store in memory: fast tests of the services' rules, with a frozen
clock, a recording outbox and no HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest

from otpgate.adapters.storage.sqlite import SqliteExecutor
from otpgate.adapters.storage.store import SqlStore
from otpgate.domain.codes import CodeVault
from otpgate.domain.model import Channel, Principal, VerificationStatus
from otpgate.domain.ports import ClaimedMessage
from otpgate.errors import (
    CountryNotAllowed,
    DestinationBlocked,
    InvalidRequest,
    MaxSendAttemptsReached,
    NotFound,
    ResendTooSoon,
    UnsupportedNumberType,
)
from otpgate.services.accounts import AccessService
from otpgate.services.catalog import ServiceCatalog
from otpgate.services.idempotency import Idempotency
from otpgate.services.verification import LockoutPolicy, StartRequest, VerificationService
from tests.conftest import FrozenClock


@dataclass
class RecordingOutbox:
    """Messages announced by the services (nothing is leased: no dispatcher runs here)."""

    announced: int = 0

    def lease_until(self, now: datetime) -> datetime | None:
        return None

    def queued(self, item: ClaimedMessage | None = None) -> None:
        self.announced += 1


@dataclass
class CountingMetrics:
    counts: dict[tuple[str, ...], int] = field(default_factory=dict)

    def count(self, event: str, **labels: str) -> None:
        key = (event, *labels.values())
        self.counts[key] = self.counts.get(key, 0) + 1


@dataclass
class World:
    store: SqlStore
    clock: FrozenClock
    vault: CodeVault
    outbox: RecordingOutbox
    metrics: CountingMetrics
    access: AccessService
    catalog: ServiceCatalog
    verifications: VerificationService
    principal: Principal

    async def service(self, **fields: Any) -> str:
        return (await self.catalog.create(self.principal, {"name": "Acme", **fields})).id

    async def code_of(self, verification_id: str) -> str:
        stored = await self.store.get_verification(self.principal.account.id, verification_id)
        assert stored is not None and stored.code_sealed is not None
        return self.vault.unseal(stored.id, stored.code_sealed)


@pytest.fixture
async def world() -> AsyncIterator[World]:
    executor = SqliteExecutor(":memory:")
    executor.create_schema()
    store = SqlStore(executor)
    clock = FrozenClock()
    vault = CodeVault(digest_key=b"d" * 32, sealing_key=b"s" * 32)
    outbox, metrics = RecordingOutbox(), CountingMetrics()
    access = AccessService(storage=store, clock=clock)
    catalog = ServiceCatalog(storage=store, clock=clock)
    verifications = VerificationService(
        storage=store,
        catalog=catalog,
        vault=vault,
        clock=clock,
        metrics=metrics,
        channels_available=frozenset({Channel.SMS}),
        lockout=LockoutPolicy(threshold=3, seconds=300),
        outbox=outbox,
    )
    account = await access.create_account("Acme")
    principal = Principal(account=account, key_id="unit")
    yield World(store, clock, vault, outbox, metrics, access, catalog, verifications, principal)
    await store.aclose()


async def test_start_then_the_right_code_approves_once(world: World) -> None:
    service = await world.service()
    verification, created = await world.verifications.start(
        world.principal, StartRequest(service_id=service, to="+34600000001")
    )
    assert created and world.outbox.announced == 1
    code = await world.code_of(verification.id)
    first = await world.verifications.check(world.principal, verification.id, code)
    again = await world.verifications.check(world.principal, verification.id, code)
    assert (first.valid, first.status) == (True, VerificationStatus.APPROVED)
    assert (again.valid, again.status) == (False, VerificationStatus.APPROVED)


async def test_a_second_start_resends_the_same_code_within_the_rules(world: World) -> None:
    service = await world.service(resend_interval_seconds=30, max_send_attempts=2)
    request = StartRequest(service_id=service, to="+34600000001")
    first, _ = await world.verifications.start(world.principal, request)
    with pytest.raises(ResendTooSoon) as early:
        await world.verifications.start(world.principal, request)
    assert early.value.retry_after == 30
    world.clock.advance(30)
    second, created = await world.verifications.start(world.principal, request)
    assert not created and second.id == first.id and second.send_attempts == 2
    world.clock.advance(30)
    with pytest.raises(MaxSendAttemptsReached):
        await world.verifications.start(world.principal, request)


async def test_a_new_context_supersedes_but_keeps_the_send_budget(world: World) -> None:
    service = await world.service(resend_interval_seconds=0, max_send_attempts=2)
    first, _ = await world.verifications.start(
        world.principal,
        StartRequest(service_id=service, to="+34600000001", context={"amount": "1.00 EUR"}),
    )
    second, created = await world.verifications.start(
        world.principal,
        StartRequest(service_id=service, to="+34600000001", context={"amount": "2.00 EUR"}),
    )
    assert created and second.send_attempts == 2
    old = await world.verifications.get(world.principal, first.id)
    assert old.status is VerificationStatus.CANCELED
    with pytest.raises(MaxSendAttemptsReached):
        await world.verifications.start(
            world.principal,
            StartRequest(service_id=service, to="+34600000001", context={"amount": "3.00 EUR"}),
        )


async def test_consecutive_failures_lock_the_destination_across_verifications(
    world: World,
) -> None:
    service = await world.service(max_check_attempts=2, resend_interval_seconds=0)
    request = StartRequest(service_id=service, to="+34600000001")
    first, _ = await world.verifications.start(world.principal, request)
    for _ in range(2):
        await world.verifications.check(world.principal, first.id, "000000")
    second, created = await world.verifications.start(world.principal, request)
    assert created  # the first ran out of attempts; a new one starts
    code = await world.code_of(second.id)
    await world.verifications.check(world.principal, second.id, "000000")  # the third failure
    locked = await world.verifications.check(world.principal, second.id, code)
    assert not locked.valid and locked.status is VerificationStatus.PENDING
    with pytest.raises(DestinationBlocked) as blocked:
        await world.verifications.start(world.principal, request)
    assert blocked.value.retry_after == 300
    world.clock.advance(300)
    assert (await world.verifications.check(world.principal, second.id, code)).valid


async def test_an_expired_verification_refuses_its_code(world: World) -> None:
    service = await world.service(ttl_seconds=60)
    verification, _ = await world.verifications.start(
        world.principal, StartRequest(service_id=service, to="+34600000001")
    )
    code = await world.code_of(verification.id)
    world.clock.advance(60)
    result = await world.verifications.check(world.principal, verification.id, code)
    assert (result.valid, result.status) == (False, VerificationStatus.EXPIRED)


async def test_refusals_store_nothing(world: World) -> None:
    service = await world.service(allowed_countries=["ES"])
    refusals: list[tuple[StartRequest, type[Exception]]] = [
        (StartRequest(service_id=service, to="+4915112345678"), CountryNotAllowed),
        (
            StartRequest(service_id=service, to="+34600000001", locale="not a locale"),
            InvalidRequest,
        ),
        (StartRequest(service_id=service, to="+34900000001"), UnsupportedNumberType),
        (StartRequest(service_id="svc_" + "0" * 32, to="+34600000001"), NotFound),
    ]
    for request, refusal in refusals:
        with pytest.raises(refusal):
            await world.verifications.start(world.principal, request)
    page = await world.verifications.list(
        world.principal, service_id=None, status=None, to=None, limit=10, cursor=None
    )
    assert page.items == [] and world.outbox.announced == 0


async def test_idempotency_keeps_the_redacted_body(world: World) -> None:
    idempotency = Idempotency(store=world.store, clock=world.clock)
    account = world.principal.account.id
    calls = 0

    async def action() -> tuple[int, Any]:
        nonlocal calls
        calls += 1
        return 201, {"id": "key_1", "key": "otpgate_secret"}

    def redact(body: Any) -> Any:
        return {**body, "key": None}

    first = await idempotency.run(account, "k", "fp", action, redact=redact)
    again = await idempotency.run(account, "k", "fp", action, redact=redact)
    assert first.body["key"] == "otpgate_secret" and not first.replayed
    assert again.replayed and again.body == {"id": "key_1", "key": None} and calls == 1
