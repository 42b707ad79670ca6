"""The storage contract: every method of the storage Protocols (``otpgate.domain.ports``), its
edge cases and its concurrency guarantees, run against every backend (SQLite on a file, SQLite
in memory, PostgreSQL).

A store is driven directly, with fixed times; what the API makes of it is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from otpgate.adapters.storage.sqlite import SqliteExecutor
from otpgate.adapters.storage.store import SqlStore
from otpgate.bootstrap import build_storage
from otpgate.domain.billing import BillingMode, LedgerKind
from otpgate.domain.fraud import Block, BlockKind, EntryKind, ListEntry, ListName
from otpgate.domain.model import (
    Account,
    ApiKey,
    Attempt,
    AttemptOutcome,
    Channel,
    Message,
    MessageStatus,
    SendReceipt,
    Service,
    ServicePolicy,
    Verification,
    VerificationStatus,
    new_id,
)
from otpgate.domain.ports import NO_LOCKOUT, DeliveryReport, Lockout, PlainMessage, Storage
from otpgate.domain.spend import SpendCap, spend_day
from otpgate.errors import (
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    InsufficientCredit,
    InvalidRequest,
    SpendCapReached,
)
from tests.conftest import Database, empty_database, make_settings

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "sqlite-memory", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """A store on a migrated, empty database of each backend, and on SQLite in memory (the
    schema made from the table definitions, as fast unit tests of the services use it)."""
    if request.param == "sqlite-memory":
        executor = SqliteExecutor(":memory:")
        executor.create_schema()
        built: Storage = SqlStore(executor)
    else:
        database = await empty_database(request.param, tmp_path, request)
        request.node.stash[DATABASE] = database
        built = build_storage(make_settings(database, tmp_path))
    try:
        yield built
    finally:
        await built.aclose()


DATABASE = pytest.StashKey[Database]()


# --- builders --------------------------------------------------------------------------------


async def an_account(store: Storage, *, admin: bool = False, when: float = 0) -> Account:
    account = Account(
        id=new_id("acc"),
        name="Acme",
        username=new_id("user"),
        is_admin=admin,
        created_at=at(when),
    )
    await store.create_account(account)
    return account


async def a_service(store: Storage, account: Account, *, when: float = 0) -> Service:
    service = Service(
        id=new_id("svc"),
        account_id=account.id,
        policy=ServicePolicy(name="Acme", allowed_countries=("ES",), templates={"es": "{code}"}),
        created_at=at(when),
        updated_at=at(when),
    )
    await store.create_service(service)
    return service


def a_verification(
    service: Service,
    *,
    to: str = "+34600000001",
    when: float = 0,
    ttl: float = 600,
    max_checks: int = 5,
    max_sends: int = 5,
    context: dict[str, str] | None = None,
) -> tuple[Verification, Message]:
    vid = new_id("ver")
    verification = Verification(
        id=vid,
        account_id=service.account_id,
        service_id=service.id,
        to=to,
        channel=Channel.SMS,
        status=VerificationStatus.PENDING,
        code_digest=secrets.token_bytes(32),
        code_sealed=secrets.token_bytes(40),
        locale="es",
        created_at=at(when),
        updated_at=at(when),
        expires_at=at(when + ttl),
        last_sent_at=at(when),
        check_attempts=0,
        max_check_attempts=max_checks,
        send_attempts=1,
        max_send_attempts=max_sends,
        context=context,
        metadata={"user": "42", "nested": {"ok": [1, 2]}},
    )
    return verification, a_message(verification, when=when)


def a_message(verification: Verification, *, when: float = 0) -> Message:
    return Message(
        id=new_id("msg"),
        account_id=verification.account_id,
        verification_id=verification.id,
        channel=Channel.SMS,
        to=verification.to,
        status=MessageStatus.QUEUED,
        locale=verification.locale,
        segments=1,
        encoding="GSM-7",
        created_at=at(when),
        updated_at=at(when),
    )


async def a_pending(
    store: Storage, service: Service, **fields: Any
) -> tuple[Verification, Message]:
    verification, message = a_verification(service, **fields)
    assert await store.create_verification(verification, message, body_masked="code ******")
    return verification, message


async def world(store: Storage) -> tuple[Account, Service]:
    account = await an_account(store)
    return account, await a_service(store, account)


# --- accounts and keys -----------------------------------------------------------------------


async def test_accounts_round_trip_and_unknown_is_none(store: Storage) -> None:
    account = await an_account(store, admin=True)
    assert await store.get_account(account.id) == account
    assert await store.get_account("acc_" + "0" * 32) is None


async def test_a_taken_username_is_refused_and_changes_nothing(store: Storage) -> None:
    account = await an_account(store)
    twin = replace(account, id=new_id("acc"), name="Other")
    with pytest.raises(InvalidRequest) as refused:
        await store.create_account(twin)
    assert refused.value.param == "username"
    assert await store.get_account(twin.id) is None
    assert await store.get_account(account.id) == account


async def test_first_admin_is_the_oldest_admin(store: Storage) -> None:
    assert await store.first_admin_account() is None
    await an_account(store, admin=False, when=0)
    older = await an_account(store, admin=True, when=10)
    await an_account(store, admin=True, when=20)
    assert await store.first_admin_account() == older


async def test_list_accounts_pages_newest_first_without_gaps_or_repeats(store: Storage) -> None:
    made = [await an_account(store, when=n) for n in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.list_accounts(limit=3, cursor=cursor)
        assert len(page.items) <= 3
        seen += [a.id for a in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == [a.id for a in reversed(made)]


async def test_a_cursor_that_is_not_ours_is_refused(store: Storage) -> None:
    for cursor in ("nope", "W10", "WyIyMDI2LTExLTI3IiwgImEiXQ"):  # [] and a date without time
        with pytest.raises(InvalidRequest) as refused:
            await store.list_accounts(limit=3, cursor=cursor)
        assert refused.value.param == "cursor"


async def test_keys_by_hash_revocation_and_listing(store: Storage) -> None:
    account = await an_account(store)
    other = await an_account(store)
    key = ApiKey(
        id=new_id("key"), account_id=account.id, name="ci", key_hash="a" * 64, created_at=T0
    )
    await store.create_key(key)
    await store.create_key(replace(key, id=new_id("key"), account_id=other.id, key_hash="b" * 64))
    found = await store.get_key_by_hash("a" * 64)
    assert found == (key, account)
    assert await store.get_key_by_hash("c" * 64) is None
    assert [k.id for k in await store.list_keys(account.id)] == [key.id]
    assert not await store.revoke_key(other.id, key.id, at(1))  # not the other account's key
    assert await store.revoke_key(account.id, key.id, at(1))
    assert not await store.revoke_key(account.id, key.id, at(2))  # revoked once
    assert await store.get_key_by_hash("a" * 64) is None
    (listed,) = await store.list_keys(account.id)
    assert listed.revoked_at == at(1)


# --- services --------------------------------------------------------------------------------


async def test_services_belong_to_their_account(store: Storage) -> None:
    account, service = await world(store)
    stranger = await an_account(store)
    assert await store.get_service(account.id, service.id) == service
    assert await store.get_service(stranger.id, service.id) is None
    policy = replace(service.policy, name="Renamed", code_length=8)
    assert await store.update_service(stranger.id, service.id, policy, at(5)) is None
    updated = await store.update_service(account.id, service.id, policy, at(5))
    assert updated is not None and updated.policy == policy and updated.updated_at == at(5)
    assert not await store.delete_service(stranger.id, service.id, at(6))
    assert (await store.get_service(account.id, service.id)) == updated


async def test_list_services_is_scoped_and_paged(store: Storage) -> None:
    account = await an_account(store)
    stranger = await an_account(store)
    mine = [await a_service(store, account, when=n) for n in range(5)]
    await a_service(store, stranger)
    first = await store.list_services(account.id, limit=2, cursor=None)
    second = await store.list_services(account.id, limit=2, cursor=first.next_cursor)
    third = await store.list_services(account.id, limit=2, cursor=second.next_cursor)
    ids = [s.id for s in (*first.items, *second.items, *third.items)]
    assert ids == [s.id for s in reversed(mine)] and third.next_cursor is None


async def test_deleting_a_service_cancels_its_pending_codes(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service)
    assert await store.delete_service(account.id, service.id, at(10))
    assert await store.get_service(account.id, service.id) is None
    assert not await store.delete_service(account.id, service.id, at(11))
    after = await store.get_verification(account.id, verification.id)
    assert after is not None
    assert after.status is VerificationStatus.CANCELED and after.code_sealed is None


# --- verifications ---------------------------------------------------------------------------


async def test_a_verification_round_trips_with_its_message(store: Storage) -> None:
    account, service = await world(store)
    verification, message = a_verification(service, context={"amount": "12.50 EUR"})
    assert await store.create_verification(verification, message, body_masked="Acme ******")
    got = await store.get_verification(account.id, verification.id)
    assert got == replace(verification, messages=(message,))
    stranger = await an_account(store)
    assert await store.get_verification(stranger.id, verification.id) is None


async def test_one_pending_verification_per_destination(store: Storage) -> None:
    account, service = await world(store)
    first, _ = await a_pending(store, service)
    second, message = a_verification(service)
    assert not await store.create_verification(second, message, body_masked="x")
    assert await store.get_verification(account.id, second.id) is None
    # Another destination, or the same one in another service, is fine.
    await a_pending(store, service, to="+34600000002")
    await a_pending(store, await a_service(store, account))
    assert (await store.get_verification(account.id, first.id)) is not None


async def test_superseding_cancels_the_old_code_in_the_same_transaction(store: Storage) -> None:
    account, service = await world(store)
    old, _ = await a_pending(store, service)
    new, message = a_verification(service, when=1)
    assert await store.create_verification(new, message, body_masked="x", supersede=old.id)
    gone = await store.get_verification(account.id, old.id)
    assert gone is not None and gone.status is VerificationStatus.CANCELED
    assert gone.code_sealed is None


async def test_pending_for_destination_reads_the_code_and_the_lockout(store: Storage) -> None:
    _, service = await world(store)
    assert await store.pending_for_destination(service.id, "+34600000001", at(1)) == (
        None,
        NO_LOCKOUT,
    )
    verification, _ = await a_pending(store, service)
    pending, lockout = await store.pending_for_destination(service.id, verification.to, at(1))
    assert pending == verification and lockout == NO_LOCKOUT  # messages left empty
    await store.record_destination_failure(
        service.id, verification.to, now=at(2), threshold=100, lock_seconds=60
    )
    _, lockout = await store.pending_for_destination(service.id, verification.to, at(3))
    assert lockout == Lockout(failures=1, locked_until=None)


async def test_a_pending_code_whose_time_is_up_is_closed_on_the_way(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service, ttl=60)
    pending, _ = await store.pending_for_destination(service.id, verification.to, at(60))
    assert pending is None
    closed = await store.get_verification(account.id, verification.id)
    assert closed is not None and closed.status is VerificationStatus.EXPIRED
    assert closed.code_sealed is None
    # Its destination is free for a new verification.
    await a_pending(store, service, when=61)


async def test_resends_count_only_within_the_rules(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service, max_sends=3, ttl=600)

    async def resend(when: float, interval: int = 30, lease: datetime | None = None) -> Any:
        return await store.record_resend(
            verification.id,
            a_message(verification, when=when),
            body_masked="x",
            now=at(when),
            interval_seconds=interval,
            lease_until=lease,
        )

    assert await resend(10) is None  # too soon: 30 s interval
    counted = await resend(30, lease=at(60))
    assert counted is not None and counted.send_attempts == 2 and counted.last_sent_at == at(30)
    assert len(counted.messages) == 2 and counted.messages[-1].attempts == 1  # leased: claimed
    assert await resend(61) is not None  # the third send: the cap
    assert await resend(200) is None
    got = await store.get_verification(account.id, verification.id)
    assert got is not None and got.send_attempts == 3 and len(got.messages) == 3
    other, _ = await a_pending(store, service, to="+34600000002", ttl=60)
    assert (
        await store.record_resend(
            other.id, a_message(other), body_masked="x", now=at(60), interval_seconds=0
        )
        is None
    )  # its time is up


async def test_latest_verification_of_a_destination(store: Storage) -> None:
    account, service = await world(store)
    first, _ = await a_pending(store, service)
    assert await store.close(first.id, VerificationStatus.CANCELED, at(1))
    second, message = await a_pending(store, service, when=2)
    latest = await store.latest_verification(account.id, service.id, first.to)
    assert latest == replace(second, messages=(message,))
    stranger = await an_account(store)
    assert await store.latest_verification(stranger.id, service.id, first.to) is None


async def test_list_verifications_filters_by_reported_status(store: Storage) -> None:
    account, service = await world(store)
    live, _ = await a_pending(store, service, to="+34600000001", ttl=600)
    lapsed, _ = await a_pending(store, service, to="+34600000002", ttl=60)
    done, _ = await a_pending(store, service, to="+34600000003")
    assert await store.close(done.id, VerificationStatus.CANCELED, at(1))
    other_service = await a_service(store, account)
    elsewhere, _ = await a_pending(store, other_service, to="+34600000001")

    async def ids(**filters: Any) -> set[str]:
        filters.setdefault("service_id", None)
        filters.setdefault("status", None)
        filters.setdefault("to", None)
        page = await store.list_verifications(
            account.id, limit=50, cursor=None, now=at(120), **filters
        )
        return {v.id for v in page.items}

    assert await ids() == {live.id, lapsed.id, done.id, elsewhere.id}
    assert await ids(status=VerificationStatus.PENDING) == {live.id, elsewhere.id}
    assert await ids(status=VerificationStatus.EXPIRED) == {lapsed.id}
    assert await ids(status=VerificationStatus.CANCELED) == {done.id}
    assert await ids(service_id=service.id, to="+34600000001") == {live.id}
    page = await store.list_verifications(
        account.id, service_id=None, status=None, to=None, limit=1, cursor=None, now=at(120)
    )
    assert len(page.items) == 1 and len(page.items[0].messages) == 1 and page.next_cursor


async def test_verification_for_check_reads_the_lockout_with_it(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service)
    assert await store.verification_for_check(account.id, verification.id) == (
        verification,
        NO_LOCKOUT,
    )
    for n in range(3):
        await store.record_destination_failure(
            service.id, verification.to, now=at(n), threshold=3, lock_seconds=60
        )
    found, lockout = await store.verification_for_check(account.id, verification.id)
    assert found == verification and lockout == Lockout(failures=0, locked_until=at(62))
    assert lockout.in_force(at(61)) and not lockout.in_force(at(62))
    stranger = await an_account(store)
    assert await store.verification_for_check(stranger.id, verification.id) == (None, NO_LOCKOUT)


async def test_approval_is_single_use_and_erases_the_sealed_code(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service)
    await store.record_destination_failure(
        service.id, verification.to, now=at(1), threshold=100, lock_seconds=60
    )
    assert await store.approve(verification.id, at(2), clear_failures=True)
    assert not await store.approve(verification.id, at(3), clear_failures=False)
    approved = await store.get_verification(account.id, verification.id)
    assert approved is not None and approved.status is VerificationStatus.APPROVED
    assert approved.code_sealed is None
    assert await store.lockout(service.id, verification.to) == NO_LOCKOUT


async def test_no_approval_after_expiry_or_without_attempts(store: Storage) -> None:
    account, service = await world(store)
    lapsed, _ = await a_pending(store, service, ttl=60)
    assert not await store.approve(lapsed.id, at(60), clear_failures=False)
    spent, _ = await a_pending(store, service, to="+34600000002", max_checks=1)
    assert await store.record_failed_check(spent.id, at(1)) == 1
    assert not await store.approve(spent.id, at(2), clear_failures=False)
    closed = await store.get_verification(account.id, spent.id)
    assert closed is not None and closed.status is VerificationStatus.MAX_ATTEMPTS_REACHED
    assert closed.code_sealed is None


async def test_failed_checks_count_up_to_the_cap(store: Storage) -> None:
    _, service = await world(store)
    verification, _ = await a_pending(store, service, max_checks=3)
    assert [await store.record_failed_check(verification.id, at(n)) for n in range(4)] == [
        1,
        2,
        3,
        None,
    ]
    lapsed, _ = await a_pending(store, service, to="+34600000002", ttl=60)
    assert await store.record_failed_check(lapsed.id, at(60)) is None


async def test_close_moves_only_a_pending_verification(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service)
    assert await store.close(verification.id, VerificationStatus.CANCELED, at(1))
    assert not await store.close(verification.id, VerificationStatus.FAILED, at(2))
    closed = await store.get_verification(account.id, verification.id)
    assert closed is not None and closed.status is VerificationStatus.CANCELED
    assert closed.updated_at == at(1) and closed.code_sealed is None


async def test_expire_due_closes_exactly_the_lapsed_ones(store: Storage) -> None:
    account, service = await world(store)
    lapsed, _ = await a_pending(store, service, ttl=60)
    live, _ = await a_pending(store, service, to="+34600000002", ttl=600)
    assert await store.expire_due(at(60)) == 1
    assert await store.expire_due(at(61)) == 0
    got = await store.get_verification(account.id, lapsed.id)
    assert got is not None and got.status is VerificationStatus.EXPIRED and got.code_sealed is None
    still = await store.get_verification(account.id, live.id)
    assert still is not None and still.status is VerificationStatus.PENDING


async def test_consecutive_failures_lock_at_the_threshold(store: Storage) -> None:
    _, service = await world(store)
    to = "+34600000001"
    counts = [
        await store.record_destination_failure(
            service.id, to, now=at(n), threshold=3, lock_seconds=600
        )
        for n in range(4)
    ]
    assert counts == [1, 2, 3, 1]  # the third locks and starts the count again
    assert await store.lockout(service.id, to) == Lockout(failures=1, locked_until=at(602))
    await store.reset_destination_failures(service.id, to)
    assert await store.lockout(service.id, to) == NO_LOCKOUT
    assert (
        await store.record_destination_failure(
            service.id, to, now=at(9), threshold=1, lock_seconds=5
        )
        == 1
    )  # a threshold of one locks at the first failure
    assert await store.lockout(service.id, to) == Lockout(failures=0, locked_until=at(14))


# --- concurrency -----------------------------------------------------------------------------


async def test_fifty_concurrent_approvals_succeed_once(store: Storage) -> None:
    _, service = await world(store)
    verification, _ = await a_pending(store, service)
    results = await asyncio.gather(
        *(store.approve(verification.id, at(1), clear_failures=n % 2 == 0) for n in range(50))
    )
    assert results.count(True) == 1


async def test_fifty_concurrent_failures_stop_at_the_cap(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service, max_checks=5)
    results = await asyncio.gather(
        *(store.record_failed_check(verification.id, at(1)) for _ in range(50))
    )
    assert sorted(r for r in results if r is not None) == [1, 2, 3, 4, 5]
    got = await store.get_verification(account.id, verification.id)
    assert got is not None and got.check_attempts == 5


async def test_concurrent_starts_for_one_destination_create_one(store: Storage) -> None:
    _, service = await world(store)
    made = [a_verification(service) for _ in range(20)]
    results = await asyncio.gather(
        *(store.create_verification(v, m, body_masked="x") for v, m in made)
    )
    assert results.count(True) == 1


async def test_concurrent_resends_never_pass_the_cap(store: Storage) -> None:
    account, service = await world(store)
    verification, _ = await a_pending(store, service, max_sends=4)
    results = await asyncio.gather(
        *(
            store.record_resend(
                verification.id,
                a_message(verification, when=1),
                body_masked="x",
                now=at(1),
                interval_seconds=0,
            )
            for _ in range(20)
        )
    )
    assert sum(r is not None for r in results) == 3
    got = await store.get_verification(account.id, verification.id)
    assert got is not None and got.send_attempts == 4 and len(got.messages) == 4


async def test_two_dispatchers_never_claim_the_same_message(
    store: Storage, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    database = request.node.stash.get(DATABASE, None)
    if database is None:
        pytest.skip("an in-memory database lives in one connection: no second process")
    _, service = await world(store)
    for n in range(30):
        await a_pending(store, service, to=f"+3460000{n:04d}")
    other = build_storage(make_settings(database, tmp_path))
    try:
        claims = await asyncio.gather(
            *(
                s.claim_due(now=at(1), lease_seconds=30, limit=4)
                for _ in range(10)
                for s in (store, other)
            )
        )
    finally:
        await other.aclose()
    ids = [c.message.id for claim in claims for c in claim]
    assert len(ids) == len(set(ids)) == 30


async def test_concurrent_uses_of_one_idempotency_key(store: Storage) -> None:
    account = await an_account(store)
    outcomes = await asyncio.gather(
        *(store.begin(account.id, "k", "h", at(0)) for _ in range(20)), return_exceptions=True
    )
    assert sum(o == ("new", None, None) for o in outcomes) == 1
    assert all(isinstance(o, IdempotencyInProgress) for o in outcomes if isinstance(o, Exception))


# --- the outbox ------------------------------------------------------------------------------


async def test_claims_take_due_queued_unleased_messages_and_count_attempts(store: Storage) -> None:
    _, service = await world(store)
    verification, message = await a_pending(store, service)
    leased, leased_message = a_verification(service, to="+34600000002")
    assert await store.create_verification(
        leased, leased_message, body_masked="x", lease_until=at(30)
    )
    (claimed,) = await store.claim_due(now=at(1), lease_seconds=30, limit=10)
    assert claimed.message.id == message.id and claimed.message.attempts == 1
    assert claimed.verification == verification and claimed.service == service
    assert claimed.lease_until == at(31)
    assert await store.claim_due(now=at(2), lease_seconds=30, limit=10) == []
    # Both leases lapse: both are claimable again, and the attempts say so.
    again = await store.claim_due(now=at(32), lease_seconds=30, limit=10)
    assert {c.message.id: c.message.attempts for c in again} == {
        message.id: 2,
        leased_message.id: 2,
    }


async def test_a_claim_respects_the_limit_and_the_retry_time(store: Storage) -> None:
    _, service = await world(store)
    made = [await a_pending(store, service, to=f"+3460000000{n}") for n in range(3)]
    first = await store.claim_due(now=at(1), lease_seconds=30, limit=2)
    assert len(first) == 2
    retried = first[0].message
    await store.mark_retry(
        retried.id, provider="p", error="503", next_attempt_at=at(100), now=at(2)
    )
    rest = await store.claim_due(now=at(3), lease_seconds=30, limit=10)
    assert [c.message.id for c in rest] == [
        m.id for _, m in made if m.id not in {c.message.id for c in first}
    ]
    for claimed in (first[1], *rest):
        await store.mark_sent(claimed.message.id, provider="p", receipt=SendReceipt(), now=at(4))
    assert await store.claim_due(now=at(99), lease_seconds=30, limit=10) == []
    (due,) = await store.claim_due(now=at(100), lease_seconds=30, limit=10)
    assert due.message.id == retried.id and due.message.error == "503"


async def test_mark_sent_records_the_provider_and_only_from_queued(store: Storage) -> None:
    account, service = await world(store)
    verification, message = await a_pending(store, service)
    receipt = SendReceipt(provider_ref="ref-1", price="0.05")
    await store.mark_sent(message.id, provider="lm", receipt=receipt, now=at(1))
    (sent,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    # The price is otpgate's own, set when the message was queued; a provider's is not kept.
    assert (sent.status, sent.provider, sent.provider_ref, sent.price) == (
        MessageStatus.SENT,
        "lm",
        "ref-1",
        None,
    )
    assert await store.claim_due(now=at(100), lease_seconds=30, limit=10) == []
    # A failed message is not revived by a late mark.
    other, other_message = await a_pending(store, service, to="+34600000002")
    await store.mark_failed(other_message.id, provider="lm", error="invalid", now=at(2))
    await store.mark_sent(other_message.id, provider="lm", receipt=receipt, now=at(3))
    (failed,) = (await store.get_verification(account.id, other.id)).messages  # type: ignore[union-attr]
    assert failed.status is MessageStatus.FAILED


async def test_a_stale_claim_holder_can_neither_reschedule_nor_fail(store: Storage) -> None:
    """A dispatcher that stalled past its lease, whose message another dispatcher has claimed
    since, can neither reschedule nor fail (and refund) what the newer claim holds; the newer
    claim's marks apply."""
    account, service = await world(store)
    verification, message = await a_pending(store, service)
    (stale,) = await store.claim_due(now=at(1), lease_seconds=30, limit=10)
    (fresh,) = await store.claim_due(now=at(40), lease_seconds=30, limit=10)  # lease lapsed
    assert stale.lease_until != fresh.lease_until

    await store.mark_retry(
        message.id,
        provider="a",
        error="late",
        next_attempt_at=at(41),
        now=at(41),
        lease_until=stale.lease_until,
    )
    assert await store.claim_due(now=at(42), lease_seconds=30, limit=10) == []  # still held
    failed = await store.mark_failed(
        message.id, provider="a", error="late", now=at(43), lease_until=stale.lease_until
    )
    assert failed is None
    (held,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert (held.status, held.history) == (MessageStatus.QUEUED, ())

    await store.mark_retry(
        message.id,
        provider="b",
        error="503",
        next_attempt_at=at(50),
        now=at(44),
        lease_until=fresh.lease_until,
    )
    (retried,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert (retried.error, retried.history[-1].provider) == ("503", "b")
    (again,) = await store.claim_due(now=at(50), lease_seconds=30, limit=10)
    assert again.message.id == message.id


async def test_a_send_is_recorded_whichever_claim_made_it(store: Storage) -> None:
    """A provider's acceptance is a fact: a stalled dispatcher's ``sent`` is recorded even
    after another claimed the message, and the newer claim's retry then changes nothing."""
    account, service = await world(store)
    verification, message = await a_pending(store, service)
    await store.claim_due(now=at(1), lease_seconds=30, limit=10)
    (fresh,) = await store.claim_due(now=at(40), lease_seconds=30, limit=10)
    await store.mark_sent(message.id, provider="a", receipt=SendReceipt("old"), now=at(41))
    await store.mark_retry(
        message.id,
        provider="b",
        error="503",
        next_attempt_at=at(42),
        now=at(42),
        lease_until=fresh.lease_until,
    )
    (sent,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert (sent.status, sent.provider_ref, sent.error) == (MessageStatus.SENT, "old", None)
    assert await store.claim_due(now=at(100), lease_seconds=30, limit=10) == []


async def test_a_claims_lease_marks_a_message_handed_over_at_insert(store: Storage) -> None:
    """A message inserted already claimed (sent at once by the process that queued it) is
    marked with the lease it was inserted with, on every backend's round trip of the time."""
    account, service = await world(store)
    verification, message = a_verification(service)
    lease = at(30) + timedelta(microseconds=123_457)
    assert await store.create_verification(
        verification, message, body_masked="x", lease_until=lease
    )
    await store.mark_retry(
        message.id, provider="a", error="503", next_attempt_at=at(1), now=at(1), lease_until=lease
    )
    (retried,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert retried.error == "503"


async def test_each_outcome_is_kept_in_the_message_history(store: Storage) -> None:
    account, service = await world(store)
    verification, message = await a_pending(store, service)
    await store.mark_retry(
        message.id, provider="a", error="a: HTTP 503", next_attempt_at=at(1), now=at(1)
    )
    await store.mark_retry(
        message.id,
        provider="b",
        error="b: no answer",
        next_attempt_at=at(2),
        now=at(2),
        outcome=AttemptOutcome.UNANSWERED,
    )
    await store.mark_sent(message.id, provider="a", receipt=SendReceipt("r"), now=at(3))
    await store.mark_failed(message.id, provider="a", error="late", now=at(4))  # not queued
    (kept,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert kept.history == (
        Attempt("a", at(1), AttemptOutcome.RETRY, "a: HTTP 503"),
        Attempt("b", at(2), AttemptOutcome.UNANSWERED, "b: no answer"),
        Attempt("a", at(3), AttemptOutcome.SENT, None),
    )
    other, failing = await a_pending(store, service, to="+34600000002")
    await store.mark_failed(failing.id, provider=None, error="closed", now=at(5))
    (failed,) = (await store.get_verification(account.id, other.id)).messages  # type: ignore[union-attr]
    assert failed.history == (Attempt(None, at(5), AttemptOutcome.FAILED, "closed"),)


async def test_a_long_history_stops_growing_at_its_limit(store: Storage) -> None:
    account, service = await world(store)
    verification, message = await a_pending(store, service)
    for n in range(300):
        await store.mark_retry(
            message.id, provider="a", error="e" * 100, next_attempt_at=at(n), now=at(n)
        )
    (kept,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert 50 < len(kept.history) < 300
    assert kept.history[0].at == at(0)  # the first attempts are the ones kept
    assert [a.at for a in kept.history] == [at(n) for n in range(len(kept.history))]


async def test_a_failed_message_fails_its_verification_only_when_nothing_else_lives(
    store: Storage,
) -> None:
    account, service = await world(store)
    _, first = await a_pending(store, service)
    failed = await store.mark_failed(first.id, provider="lm", error="x" * 900, now=at(1))
    assert failed is not None and failed.status is VerificationStatus.FAILED
    assert failed.code_sealed is None and failed.messages[0].error == "x" * 500
    assert await store.mark_failed(first.id, provider="lm", error="again", now=at(2)) is None

    alive, sent = await a_pending(store, service, to="+34600000002")
    await store.mark_sent(sent.id, provider="lm", receipt=SendReceipt("r"), now=at(1))
    resend = a_message(alive, when=31)
    assert await store.record_resend(
        alive.id, resend, body_masked="x", now=at(31), interval_seconds=30
    )
    assert await store.mark_failed(resend.id, provider="lm", error="x", now=at(32)) is None
    still = await store.get_verification(account.id, alive.id)
    assert still is not None and still.status is VerificationStatus.PENDING


async def test_reports_apply_to_known_messages_only(store: Storage) -> None:
    account, service = await world(store)
    verification, message = await a_pending(store, service)
    await store.mark_sent(message.id, provider="lm", receipt=SendReceipt("ref-9"), now=at(1))
    assert not await store.apply_report(
        "lm", DeliveryReport("nope", MessageStatus.DELIVERED), at(2)
    )
    assert not await store.apply_report(
        "other", DeliveryReport("ref-9", MessageStatus.DELIVERED), at(2)
    )
    assert await store.apply_report("lm", DeliveryReport("ref-9", None), at(2))
    assert await store.apply_report("lm", DeliveryReport("ref-9", MessageStatus.DELIVERED), at(3))
    # A late report cannot move a delivered message back.
    assert await store.apply_report(
        "lm", DeliveryReport("ref-9", MessageStatus.UNDELIVERED, "late"), at(4)
    )
    (got,) = (await store.get_verification(account.id, verification.id)).messages  # type: ignore[union-attr]
    assert got.status is MessageStatus.DELIVERED and got.updated_at == at(3)


# --- idempotency keys ------------------------------------------------------------------------


async def test_idempotency_key_lifecycle(store: Storage) -> None:
    account = await an_account(store)
    stranger = await an_account(store)
    assert await store.begin(account.id, "k", "h1", at(0)) == ("new", None, None)
    with pytest.raises(IdempotencyInProgress):
        await store.begin(account.id, "k", "h1", at(1))
    with pytest.raises(IdempotencyKeyMismatch):
        await store.begin(account.id, "k", "h2", at(1))
    # The same key is another key in another account.
    assert await store.begin(stranger.id, "k", "h2", at(1)) == ("new", None, None)
    body = {"id": "ver_1", "nested": {"ñ": [1, None, True]}}
    await store.finish(account.id, "k", 201, body)
    assert await store.begin(account.id, "k", "h1", at(2)) == ("done", 201, body)
    await store.abandon(stranger.id, "k")
    assert await store.begin(stranger.id, "k", "h3", at(3)) == ("new", None, None)


async def test_stale_and_old_idempotency_keys_are_taken_over_and_forgotten(store: Storage) -> None:
    account = await an_account(store)
    assert await store.begin(account.id, "crashed", "h", at(0)) == ("new", None, None)
    # Left in progress by a process that died: after 5 minutes a retry takes it over.
    with pytest.raises(IdempotencyInProgress):
        await store.begin(account.id, "crashed", "h", at(299))
    assert await store.begin(account.id, "crashed", "h", at(300)) == ("new", None, None)
    await store.finish(account.id, "crashed", 200, {"ok": True})
    # A finished key is never stale: it replays (or refuses another body) for its whole day.
    assert await store.begin(account.id, "crashed", "h", at(4000)) == ("done", 200, {"ok": True})
    with pytest.raises(IdempotencyKeyMismatch):
        await store.begin(account.id, "crashed", "other", at(4000))


async def test_forgetting_idempotency_keys_after_a_day(store: Storage) -> None:
    account = await an_account(store)
    await store.begin(account.id, "old", "h", at(0))
    await store.finish(account.id, "old", 200, {"ok": True})
    await store.begin(account.id, "young", "h", at(3600))
    day = 86_400
    with pytest.raises(IdempotencyKeyMismatch):
        await store.begin(account.id, "old", "other", at(day - 1))
    assert await store.begin(account.id, "old", "other", at(day)) == ("new", None, None)
    assert await store.forget_idempotency_keys(at(3600 + day - 1)) == 0
    assert await store.forget_idempotency_keys(at(3600 + day)) == 1  # "young"
    assert await store.forget_idempotency_keys(at(2 * day)) == 1  # "old", taken over at `day`
    assert await store.forget_idempotency_keys(at(3 * day)) == 0


async def test_ping_answers_when_storage_is_up(store: Storage) -> None:
    await store.ping()


# --- prices, credit and the ledger -----------------------------------------------------------

CREDIT = 10_000  # units in one credit


async def a_prepaid(store: Storage, credits: int) -> Account:
    """A prepaid account topped up with ``credits`` whole credits."""
    prepaid = Account(
        id=new_id("acc"),
        name="Prepaid",
        username=new_id("user"),
        is_admin=False,
        created_at=T0,
        billing=BillingMode.PREPAID,
    )
    await store.create_account(prepaid)
    if credits:
        assert await store.add_credit(prepaid.id, credits * CREDIT, note="start", now=at(0))
    return prepaid


def a_plain(account: Account, to: str, price: int | None, *, when: float = 0) -> PlainMessage:
    message = Message(
        id=new_id("msg"),
        account_id=account.id,
        verification_id=None,
        channel=Channel.SMS,
        to=to,
        status=MessageStatus.QUEUED,
        locale="und",
        segments=1,
        encoding="GSM-7",
        created_at=at(when),
        updated_at=at(when),
        price_units=price,
        client_ref="batch-1",
    )
    return PlainMessage(message, "Hello")


async def test_accounts_keep_their_billing_and_balance(store: Storage) -> None:
    account = await a_prepaid(store, 0)
    got = await store.get_account(account.id)
    assert got is not None and got.billing is BillingMode.PREPAID and got.balance == 0
    entry = await store.add_credit(account.id, 25 * CREDIT // 10, note="welcome", now=at(1))
    assert entry is not None and entry.kind is LedgerKind.TOPUP and entry.balance == 25_000
    assert entry.note == "welcome"
    assert await store.add_credit("acc_" + "0" * 32, CREDIT, note=None, now=at(1)) is None
    got = await store.get_account(account.id)
    assert got is not None and got.balance == 25_000


async def test_the_price_table_is_replaced_whole(store: Storage) -> None:
    assert await store.price_table() == {}
    await store.replace_prices({"ES": CREDIT, "*": 2 * CREDIT}, at(0))
    assert await store.price_table() == {"ES": CREDIT, "*": 2 * CREDIT}
    await store.replace_prices({"FR": 15_000}, at(1))
    assert await store.price_table() == {"FR": 15_000}


async def test_a_batch_is_debited_whole_or_refused_whole(store: Storage) -> None:
    account = await a_prepaid(store, 3)
    batch = [a_plain(account, f"+3460000000{n}", CREDIT) for n in range(2)]
    await store.create_messages(batch)
    got = await store.get_account(account.id)
    assert got is not None and got.balance == CREDIT
    too_many = [a_plain(account, f"+3460000001{n}", CREDIT) for n in range(2)]
    with pytest.raises(InsufficientCredit):
        await store.create_messages(too_many)
    assert await store.get_message(account.id, too_many[0].message.id) is None
    ledger = await store.list_ledger(account.id, limit=10, cursor=None)
    debits = [e for e in ledger.items if e.kind is LedgerKind.DEBIT]
    assert sorted(e.balance for e in debits) == [CREDIT, 2 * CREDIT]
    assert {e.message_id for e in debits} == {b.message.id for b in batch}
    assert all(e.amount == -CREDIT for e in debits)


async def test_an_unlimited_account_is_recorded_but_never_refused(store: Storage) -> None:
    account = await an_account(store)  # unlimited
    await store.create_messages([a_plain(account, "+34600000001", 7 * CREDIT)])
    got = await store.get_account(account.id)
    assert got is not None and got.balance == 0
    (entry,) = (await store.list_ledger(account.id, limit=10, cursor=None)).items
    assert (entry.kind, entry.amount, entry.balance) == (LedgerKind.DEBIT, -7 * CREDIT, 0)


async def test_a_verification_and_its_resend_are_debited_with_their_insert(
    store: Storage,
) -> None:
    account = await a_prepaid(store, 2)
    service = await a_service(store, account)
    verification, message = a_verification(service)
    priced = replace(message, price_units=CREDIT)
    assert await store.create_verification(verification, priced, body_masked="x")
    resend = replace(a_message(verification, when=31), price_units=CREDIT)
    assert await store.record_resend(
        verification.id, resend, body_masked="x", now=at(31), interval_seconds=30
    )
    got = await store.get_account(account.id)
    assert got is not None and got.balance == 0
    again = replace(a_message(verification, when=62), price_units=CREDIT)
    with pytest.raises(InsufficientCredit):
        await store.record_resend(
            verification.id, again, body_masked="x", now=at(62), interval_seconds=30
        )
    after = await store.get_verification(account.id, verification.id)
    assert after is not None and after.send_attempts == 2 and len(after.messages) == 2
    other, other_message = a_verification(service, to="+34600000002")
    with pytest.raises(InsufficientCredit):
        await store.create_verification(
            other, replace(other_message, price_units=CREDIT), body_masked="x"
        )
    assert await store.get_verification(account.id, other.id) is None


async def test_a_failed_message_is_refunded(store: Storage) -> None:
    account = await a_prepaid(store, 1)
    batch = [a_plain(account, "+34600000001", CREDIT, when=1)]
    await store.create_messages(batch)
    assert await store.mark_failed(batch[0].message.id, provider="lm", error="x", now=at(5)) is None
    got = await store.get_account(account.id)
    assert got is not None and got.balance == CREDIT
    kinds = [e.kind for e in (await store.list_ledger(account.id, limit=10, cursor=None)).items]
    assert kinds == [LedgerKind.REFUND, LedgerKind.DEBIT, LedgerKind.TOPUP]


async def test_fifty_concurrent_sends_against_ten_credits_are_accepted_ten_times(
    store: Storage,
) -> None:
    account = await a_prepaid(store, 10)

    async def send(n: int) -> bool:
        try:
            await store.create_messages([a_plain(account, f"+346000{n:05d}", CREDIT)])
        except InsufficientCredit:
            return False
        return True

    results = await asyncio.gather(*(send(n) for n in range(50)))
    assert results.count(True) == 10
    got = await store.get_account(account.id)
    assert got is not None and got.balance == 0


async def test_fifty_concurrent_charged_starts_against_ten_credits(store: Storage) -> None:
    account = await a_prepaid(store, 10)
    service = await a_service(store, account)

    async def start(n: int) -> bool:
        verification, message = a_verification(service, to=f"+346000{n:05d}")
        try:
            return await store.create_verification(
                verification, replace(message, price_units=CREDIT), body_masked="x"
            )
        except InsufficientCredit:
            return False

    assert (await asyncio.gather(*(start(n) for n in range(50)))).count(True) == 10


async def test_scheduled_messages_are_canceled_with_a_refund_or_released(store: Storage) -> None:
    account = await a_prepaid(store, 5)
    later = [
        PlainMessage(a_plain(account, f"+3460000000{n}", CREDIT).message, "Hi", not_before=at(600))
        for n in range(2)
    ]
    await store.create_messages(later)
    assert await store.claim_due(now=at(1), lease_seconds=30, limit=10) == []
    assert await store.cancel_scheduled(account.id, "batch-1", at(2)) == 2
    got = await store.get_account(account.id)
    assert got is not None and got.balance == 5 * CREDIT
    canceled = await store.get_message(account.id, later[0].message.id)
    assert canceled is not None and canceled.status is MessageStatus.CANCELED
    again = [
        PlainMessage(a_plain(account, "+34600000009", CREDIT).message, "Hi", not_before=at(600))
    ]
    await store.create_messages(again)
    assert await store.release_scheduled(account.id, "batch-1", at(3)) == 1
    (claimed,) = await store.claim_due(now=at(3), lease_seconds=30, limit=10)
    assert claimed.message.id == again[0].message.id and claimed.body == "Hi"
    assert await store.cancel_scheduled(account.id, "batch-1", at(4)) == 0  # leased: going out


async def test_a_report_on_a_message_with_an_ack_url_owes_a_callback(store: Storage) -> None:
    account = await an_account(store)
    plain = a_plain(account, "+34600000001", None)
    tracked = PlainMessage(replace(plain.message, ack_url="https://example.test/ack"), "Hi")
    await store.create_messages([tracked])
    message_id = tracked.message.id
    await store.mark_sent(message_id, provider="lm", receipt=SendReceipt("ref-1"), now=at(1))
    assert await store.claim_callbacks(now=at(1), lease_seconds=30, limit=10) == []
    assert await store.apply_report(
        "lm", DeliveryReport("ref-1", MessageStatus.DELIVERED, "DELIVRD"), at(2)
    )
    (callback,) = await store.claim_callbacks(now=at(2), lease_seconds=30, limit=10)
    assert callback.url == "https://example.test/ack" and callback.message_id == message_id
    assert callback.params["status"] == "delivered" and callback.params["client_ref"] == "batch-1"
    assert callback.params["to"] == "+34600000001" and callback.attempts == 1
    assert await store.claim_callbacks(now=at(3), lease_seconds=30, limit=10) == []  # leased
    await store.retry_callback(callback.id, error="503", next_attempt_at=at(100), now=at(4))
    assert await store.claim_callbacks(now=at(99), lease_seconds=30, limit=10) == []
    (again,) = await store.claim_callbacks(now=at(100), lease_seconds=30, limit=10)
    assert again.attempts == 2
    await store.finish_callback(again.id, delivered=True, error=None, now=at(101))
    assert await store.claim_callbacks(now=at(10_000), lease_seconds=30, limit=10) == []
    # A repeated report changes nothing and owes nothing more.
    assert await store.apply_report(
        "lm", DeliveryReport("ref-1", MessageStatus.DELIVERED, "DELIVRD"), at(200)
    )
    assert await store.claim_callbacks(now=at(10_000), lease_seconds=30, limit=10) == []


# --- the SMS-pumping defence -----------------------------------------------------------------


async def test_prefix_conversion_counts_decided_and_approved_across_accounts(
    store: Storage,
) -> None:
    _, service = await world(store)
    _, other = await world(store)
    # +34612345: two approved, one expired by status, one old pending (decided), one young
    # pending (not decided), one old pending whose code never went out (not decided); another
    # account's start counts too.
    approved_1, _ = await a_pending(store, service, to="+34612345001", when=10)
    approved_2, _ = await a_pending(store, other, to="+34612345002", when=10)
    _, old_pending = await a_pending(store, service, to="+34612345003", when=10)
    _, young = await a_pending(store, service, to="+34612345004", when=95)
    old, closed = await a_pending(store, service, to="+34612345005", when=20)
    await a_pending(store, service, to="+34612345007", when=10)  # still queued
    for verification in (approved_1, approved_2):
        assert await store.approve(verification.id, at(30), clear_failures=False)
    await store.close(old.id, VerificationStatus.EXPIRED, at(40))
    # Not the prefix: a neighbour range, a longer number, and a start before the window.
    _, neighbour = await a_pending(store, service, to="+34612346001", when=10)
    _, longer = await a_pending(store, service, to="+346123450011", when=10)
    _, before = await a_pending(store, service, to="+34612345006", when=-100)
    for message in (old_pending, young, closed, neighbour, longer, before):
        await store.mark_sent(message.id, provider="p", receipt=SendReceipt(), now=at(11))
    counts = await store.prefix_conversion("+34612345", since=at(0), matured=at(90))
    assert (counts.decided, counts.approved) == (4, 2)
    nothing = await store.prefix_conversion("+34699999", since=at(0), matured=at(90))
    assert (nothing.decided, nothing.approved) == (0, 0)
    country = await store.calling_code_conversion("+34", since=at(0), matured=at(90))
    assert (country.decided, country.approved) == (6, 2)


async def test_blocks_are_found_by_value_lifted_once_and_unique_per_seq(store: Storage) -> None:
    first = Block(
        id=new_id("blk"),
        kind=BlockKind.PREFIX,
        value="+63917555",
        country="PH",
        reason="pumping",
        created_at=at(0),
        expires_at=at(3_600),
        seq=1,
        automatic=True,
    )
    assert await store.create_block(first)
    assert not await store.create_block(replace(first, id=new_id("blk")))  # same (value, seq)
    country = replace(first, id=new_id("blk"), kind=BlockKind.COUNTRY, value="PH", seq=1)
    assert await store.create_block(country)
    assert await store.last_block_seq("+63917555") == 1
    assert await store.last_block_seq("+63917556") == 0
    found = await store.blocks_of(["+6391755", "+63917555", "PH"])
    assert {b.id for b in found} == {first.id, country.id}
    assert await store.get_block(first.id) == first
    assert [b.id for b in await store.blocks_in_force(at(10))] in (
        [first.id, country.id],
        [country.id, first.id],
    )
    assert await store.lift_block(first.id, at(20))
    assert not await store.lift_block(first.id, at(21))
    lifted = await store.get_block(first.id)
    assert lifted is not None and lifted.lifted_at == at(20)
    assert [b.id for b in await store.blocks_in_force(at(30))] == [country.id]
    assert await store.blocks_in_force(at(3_600)) == []
    assert not await store.lift_block(country.id, at(3_601))  # expired: not in force


async def test_list_entries_are_per_account_and_unique_per_list(store: Storage) -> None:
    account, _ = await world(store)
    stranger = await an_account(store)
    entry = ListEntry(
        id=new_id("sfe"),
        account_id=account.id,
        list=ListName.SAFE,
        kind=EntryKind.NUMBER,
        value="+34600000001",
        created_at=at(0),
    )
    assert await store.add_list_entry(entry) == entry
    assert await store.add_list_entry(replace(entry, id=new_id("sfe"))) == entry
    denied = replace(entry, id=new_id("dny"), list=ListName.DENY, kind=EntryKind.PREFIX)
    assert await store.add_list_entry(denied) == denied  # the same value on another list
    assert {e.id for e in await store.list_entries(account.id)} == {entry.id, denied.id}
    assert await store.list_entries(stranger.id) == []
    assert await store.remove_list_entry(stranger.id, ListName.SAFE, entry.id) is None
    assert await store.remove_list_entry(account.id, ListName.DENY, entry.id) is None
    assert await store.remove_list_entry(account.id, ListName.SAFE, entry.id) == entry
    assert [e.id for e in await store.list_entries(account.id)] == [denied.id]


# --- test numbers and daily spend caps -------------------------------------------------------


async def test_test_verifications_and_messages_round_trip_and_are_never_claimed(
    store: Storage,
) -> None:
    account, service = await world(store)
    verification, message = a_verification(service)
    verification = replace(verification, test=True)
    message = replace(message, status=MessageStatus.SENT, provider="test", test=True)
    assert await store.create_verification(verification, message, body_masked="x")
    got = await store.get_verification(account.id, verification.id)
    assert got is not None and got.test and got.messages[0].test
    assert await store.claim_due(now=at(1), lease_seconds=30, limit=10) == []


async def test_spend_caps_count_atomically_refuse_past_the_limit_and_give_refunds_back(
    store: Storage,
) -> None:
    account, service = await world(store)
    cap = SpendCap("service", service.id, 20_000)
    day = spend_day(at(0))

    async def start(to: str) -> Message:
        verification, message = a_verification(service, to=to)
        message = replace(message, spend_units=10_000)
        assert await store.create_verification(verification, message, body_masked="x", caps=[cap])
        return message

    first = await start("+34600000001")
    await start("+34600000002")
    assert await store.spent(cap.key, day) == 20_000
    verification, message = a_verification(service, to="+34600000003")
    with pytest.raises(SpendCapReached) as refused:
        await store.create_verification(
            verification, replace(message, spend_units=10_000), body_masked="x", caps=[cap]
        )
    assert (refused.value.scope, refused.value.limit, refused.value.spent) == (
        "service",
        20_000,
        20_000,
    )
    assert await store.get_verification(account.id, verification.id) is None
    # the first refusal of the day is noted once
    assert await store.note_cap_reached(cap.key, day, at(1))
    assert not await store.note_cap_reached(cap.key, day, at(2))
    # a message failed for good gives its amount back to the counter it was counted on
    await store.mark_failed(first.id, provider=None, error="refused", now=at(3))
    assert await store.spent(cap.key, day) == 10_000
    # an amount larger than the cap alone is refused without a counter of its own
    other = SpendCap("account", account.id, 5_000)
    plain = replace(a_message(verification), verification_id=None, spend_units=10_000)
    with pytest.raises(SpendCapReached):
        await store.create_messages([PlainMessage(plain, "hello")], caps=[other])
    assert await store.spent(other.key, day) == 0
    assert await store.get_message(account.id, plain.id) is None


async def test_an_account_cap_is_set_and_removed(store: Storage) -> None:
    account = await an_account(store)
    updated = await store.set_daily_spend_cap(account.id, 70_000)
    assert updated is not None and updated.daily_spend_cap == 70_000
    assert (await store.get_account(account.id)) == updated
    cleared = await store.set_daily_spend_cap(account.id, None)
    assert cleared is not None and cleared.daily_spend_cap is None
    assert await store.set_daily_spend_cap("acc_nothing", 1) is None
