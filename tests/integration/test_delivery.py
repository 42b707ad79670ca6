"""The outbox and the dispatcher against the LabsMobile stub, on every backend: retries with
capped backoff until the verification expires, permanent failures, a hanging provider, a route
of two providers, sends storage cannot record, leases, and a worker killed mid-send (S22, S23).

Time is the frozen clock wherever the dispatcher reads it; the tests drive ``drain()`` and move
the clock, so a minute-long outage takes no real minute."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from otpgate.adapters.providers.labsmobile import LabsMobileSender, subid_for
from otpgate.bootstrap import build, prepare_database
from otpgate.domain.model import Message, Principal, new_id
from otpgate.domain.ports import Storage
from otpgate.entrypoints.api.app import create_app
from otpgate.errors import Unavailable
from otpgate.services.verification import StartRequest
from otpgate.settings import Settings
from tests.conftest import Api, Database, FrozenClock, code_in, make_settings
from tests.support.labsmobile_stub import LabsMobileStub

OTPGATE = str(Path(sys.executable).with_name("otpgate"))


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as running:
        yield running


@pytest.fixture(scope="module")
def backup_stub() -> Iterator[LabsMobileStub]:
    """A second LabsMobile account on another port: the second provider of a route."""
    with LabsMobileStub(username="backup@example.com") as running:
        yield running


@contextlib.asynccontextmanager
async def app_with(
    database: Database, tmp_path: Path, *route: LabsMobileSender
) -> AsyncIterator[Api]:
    """The app at the product's delivery defaults with ``route`` as its providers, on a frozen
    clock; the test drives delivery (``Api.deliver``) and time."""
    clock = FrozenClock()
    container = build(make_settings(database, tmp_path), route=route, clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service()
            yield api


@pytest.fixture
async def lm_api(database: Database, tmp_path: Path, stub: LabsMobileStub) -> AsyncIterator[Api]:
    """The app with the real LabsMobile sender pointed at the stub; the test drives delivery."""
    stub.reset()
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    async with app_with(database, tmp_path, sender) as api:
        yield api


def frozen_reading(clock: FrozenClock) -> Callable[[], float]:
    """The frozen clock as the stub reads time (seconds), so an outage ends when the test
    moves the clock."""
    return lambda: clock.now().timestamp()


async def messages_of(api: Api, vid: str) -> list[Message]:
    """The verification's messages as stored, with what the API does not show (error, attempts)."""
    stored = await api.container.storage.get_verification(api.account_id, vid)
    assert stored is not None
    return list(stored.messages)


async def status_of(api: Api, vid: str) -> dict[str, object]:
    response = await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())
    body: dict[str, object] = response.json()
    return body


async def test_transient_error_is_retried_with_backoff(lm_api: Api, stub: LabsMobileStub) -> None:
    stub.fail_next(1, code="30")
    vid = (await lm_api.start()).json()["id"]
    await lm_api.deliver()
    assert [r.code for r in stub.requests] == ["30"]
    message = (await status_of(lm_api, vid))["messages"][0]  # type: ignore[index]
    assert message["status"] == "queued"
    await lm_api.deliver()  # not due yet: the backoff holds it back
    assert len(stub.requests) == 1
    lm_api.clock.advance(3)  # 2 s backoff plus at most 25 % jitter
    await lm_api.deliver()
    assert [r.code for r in stub.requests] == ["30", "0"]
    first, second = stub.requests
    assert code_in(first.body["message"]) == code_in(second.body["message"])
    message = (await status_of(lm_api, vid))["messages"][0]  # type: ignore[index]
    assert message["status"] == "sent" and message["provider"] == "labsmobile"


async def test_a_60_second_outage_inside_the_validity_loses_no_code(
    lm_api: Api, stub: LabsMobileStub
) -> None:
    """The provider answers 503 for 60 s while 20 codes are started, at the product's defaults
    (10-minute validity, 2 s first backoff doubling up to 30 s): after it recovers, every code is
    sent exactly once and checks as valid."""
    clock = lm_api.clock
    stub.outage(60, status=503, clock=frozen_reading(clock))
    started: dict[str, str] = {}  # destination -> verification id
    for second in range(150):  # the outage, then more than one capped backoff (37.5 s at most)
        if second % 3 == 0 and len(started) < 20:  # one start every 3 s, all inside the outage
            to = f"+34600{len(started):03d}000"  # one per prefix: under the per_prefix limit
            response = await lm_api.start(to)
            assert response.status_code == 201, response.text
            started[to] = response.json()["id"]
        await lm_api.deliver()
        clock.advance(1)

    assert len(started) == 20
    refused = [r for r in stub.requests if r.http_status == 503]
    assert {r.msisdns[0] for r in refused} <= {to.removeprefix("+") for to in started}
    # Five failures in a row open the provider's circuit: from then on only one trial every
    # 30 s cool-off meets the outage, instead of every message's every retry.
    assert 5 <= len(refused) < 20
    assert lm_api.container.dispatcher.health["labsmobile"].state.value == "closed"
    sent = {m.msisdns[0]: m for m in stub.messages}
    assert len(stub.messages) == len(sent) == 20  # each destination once: no loss, no duplicate
    for to, vid in started.items():
        body = await status_of(lm_api, vid)
        assert body["status"] == "pending"
        assert [m["status"] for m in body["messages"]] == ["sent"]  # type: ignore[union-attr]
        check = await lm_api.check(vid, code_in(sent[to.removeprefix("+")].body["message"]))
        assert check.json()["valid"] is True, to


async def test_retries_back_off_up_to_the_cap_and_stop_when_the_verification_expires(
    lm_api: Api, stub: LabsMobileStub
) -> None:
    """A provider down for good: the waits double from 2 s and stay at the 30 s cap (each plus
    at most 25 % jitter); no attempt is made at or after ``expires_at``, and the message and its
    verification then fail."""
    clock = lm_api.clock
    service_id = await lm_api.new_service(name="Short", ttl_seconds=300)
    stub.outage(10_000, status=503, clock=frozen_reading(clock))
    vid = (await lm_api.start(service_id=service_id)).json()["id"]
    attempts_at: list[int] = []
    for second in range(400):
        before = len(stub.requests)
        await lm_api.deliver()
        attempts_at += [second] * (len(stub.requests) - before)
        clock.advance(1)

    waits = [b - a for a, b in itertools.pairwise(attempts_at)]
    for wait, step in zip(waits, [2, 4, 8, 16, 30, 30, 30], strict=False):
        assert step <= wait <= step * 1.25 + 1, waits  # +1: the test moves time in whole seconds
    assert max(waits) <= 30 * 1.25 + 1
    assert attempts_at[-1] < 300 <= attempts_at[-1] + 30 * 1.25 + 1  # kept on until the end
    (message,) = await messages_of(lm_api, vid)
    assert message.status.value == "failed"
    assert message.error is not None and "expires before the next attempt" in message.error
    body = await status_of(lm_api, vid)
    assert body["status"] == "failed"
    check = await lm_api.check(vid, "123456")
    assert check.json()["valid"] is False


async def test_a_hanging_provider_gets_each_message_at_most_twice(
    database: Database, tmp_path: Path, stub: LabsMobileStub
) -> None:
    """Sends time out (the stub answers after 5 s, the sender waits 0.3 s): each message is sent
    once more through the same provider, then fails instead of multiplying the code; every
    unanswered send is counted in ``otpgate_message_send_timeout_total``."""
    stub.reset()
    stub.delay_seconds = 5.0
    sender = LabsMobileSender(
        username=stub.username, token=stub.token, base_url=stub.url, timeout_seconds=0.3
    )
    async with app_with(database, tmp_path, sender) as api:
        vids = [(await api.start(f"+3460000100{i}")).json()["id"] for i in range(3)]
        for _ in range(4):  # more rounds than the rule allows sends
            await api.deliver()
            api.clock.advance(40)

        for vid in vids:
            (message,) = await messages_of(api, vid)
            assert stub.arrivals_for(subid_for(message.id)) == 2
            assert message.status.value == "failed"
            assert message.error is not None and "[unanswered: labsmobile=2]" in message.error
            assert (await status_of(api, vid))["status"] == "failed"
        assert stub.arrivals == 6
        metrics = api.container.metrics.render().decode()
        assert 'otpgate_message_send_timeout_total{provider="labsmobile"} 6.0' in metrics
    stub.reset()


async def test_a_timed_out_send_is_sent_once_more_and_can_succeed(
    database: Database, tmp_path: Path, stub: LabsMobileStub
) -> None:
    stub.reset()
    stub.delay_seconds = 5.0
    sender = LabsMobileSender(
        username=stub.username, token=stub.token, base_url=stub.url, timeout_seconds=0.3
    )
    async with app_with(database, tmp_path, sender) as api:
        vid = (await api.start()).json()["id"]
        await api.deliver()
        assert stub.arrivals == 1 and stub.messages == []
        stub.delay_seconds = 0.0  # the provider answers again
        api.clock.advance(3)  # the first backoff
        await api.deliver()
        (message,) = await messages_of(api, vid)
        assert message.status.value == "sent"
        assert stub.arrivals_for(subid_for(message.id)) == 2
        (sent,) = stub.messages
        assert (await api.check(vid, code_in(sent.body["message"]))).json()["valid"] is True
    stub.reset()


# --- a route of several providers --------------------------------------------------------------


@pytest.mark.parametrize("failure", ["http-503", "no-answer"])
async def test_a_route_fails_over_to_its_next_provider_without_a_duplicate(
    database: Database,
    tmp_path: Path,
    stub: LabsMobileStub,
    backup_stub: LabsMobileStub,
    failure: str,
) -> None:
    stub.reset()
    backup_stub.reset()
    if failure == "http-503":
        stub.outage(3600, status=503)
    else:
        stub.delay_seconds = 5.0
    first = LabsMobileSender(
        username=stub.username, token=stub.token, base_url=stub.url, timeout_seconds=0.3
    )
    backup = LabsMobileSender(
        username=backup_stub.username,
        token=backup_stub.token,
        base_url=backup_stub.url,
        name="labsmobile-b",
    )
    async with app_with(database, tmp_path, first, backup) as api:
        vid = (await api.start()).json()["id"]
        await api.deliver()  # the first provider fails; the next attempt is at once, on the backup
        for _ in range(3):  # and nothing is sent again later
            api.clock.advance(60)
            await api.deliver()

        assert stub.arrivals == 1 and stub.messages == []
        (sent,) = backup_stub.requests
        assert sent.accepted
        (message,) = await messages_of(api, vid)
        assert message.status.value == "sent" and message.provider == "labsmobile-b"
        assert (await api.check(vid, code_in(sent.body["message"]))).json()["valid"] is True
        # The backup's delivery reports come back to its own receipt URL.
        ackurl = httpx.URL(sent.ackurl or "")
        assert ackurl.path == "/v1/receipts/labsmobile-b"
        _, params = backup_stub.report_params(sent.body["subid"], "DELIVRD")
        answer = await api.http.get(ackurl.copy_merge_params(params))
        assert answer.status_code == 200
        assert (await messages_of(api, vid))[0].status.value == "delivered"
    stub.reset()


async def test_a_permanent_error_fails_the_message_on_any_route(
    database: Database, tmp_path: Path, stub: LabsMobileStub, backup_stub: LabsMobileStub
) -> None:
    stub.reset()
    backup_stub.reset()
    stub.fail_next(1, code="23")
    first = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    backup = LabsMobileSender(
        username=backup_stub.username,
        token=backup_stub.token,
        base_url=backup_stub.url,
        name="labsmobile-b",
    )
    async with app_with(database, tmp_path, first, backup) as api:
        vid = (await api.start()).json()["id"]
        await api.deliver()
        api.clock.advance(60)
        await api.deliver()
        assert len(stub.requests) == 1 and backup_stub.requests == []
        assert (await status_of(api, vid))["status"] == "failed"


async def test_when_every_provider_fails_the_route_comes_round_after_the_backoff(
    database: Database, tmp_path: Path, stub: LabsMobileStub, backup_stub: LabsMobileStub
) -> None:
    stub.reset()
    backup_stub.reset()
    stub.http_status_next(2, 503)
    backup_stub.http_status_next(1, 503)
    first = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    backup = LabsMobileSender(
        username=backup_stub.username,
        token=backup_stub.token,
        base_url=backup_stub.url,
        name="labsmobile-b",
    )
    async with app_with(database, tmp_path, first, backup) as api:
        vid = (await api.start()).json()["id"]
        await api.deliver()  # first, then at once the backup: both fail
        assert (len(stub.requests), len(backup_stub.requests)) == (1, 1)
        await api.deliver()  # coming round to the first provider waits for the backoff
        assert (len(stub.requests), len(backup_stub.requests)) == (1, 1)
        api.clock.advance(3)  # 2 s plus at most 25 %
        await api.deliver()  # first fails again, the backup takes it
        assert (len(stub.requests), len(backup_stub.requests)) == (2, 2)
        assert len(backup_stub.messages) == 1 and stub.messages == []
        (message,) = await messages_of(api, vid)
        assert message.status.value == "sent" and message.provider == "labsmobile-b"
        assert message.attempts == 4


# --- a send that storage cannot record -------------------------------------------------------


def refuse_sent_marks(
    monkeypatch: pytest.MonkeyPatch, storage: Storage, refusals: int
) -> tuple[list[str], asyncio.Event]:
    """Make the real store refuse its first ``refusals`` ``mark_sent`` calls with
    ``Unavailable``, as a store that is down would. Returns the calls so far and an event set
    once a mark is recorded."""
    real = storage.mark_sent
    calls: list[str] = []
    recorded = asyncio.Event()

    async def flaky(message_id: str, **fields: Any) -> None:
        calls.append(message_id)
        if len(calls) <= refusals:
            raise Unavailable("storage is down (test)")
        await real(message_id, **fields)
        recorded.set()

    monkeypatch.setattr(storage, "mark_sent", flaky)
    return calls, recorded


async def test_a_send_storage_cannot_record_is_never_sent_again(
    lm_api: Api, stub: LabsMobileStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    dispatcher = lm_api.container.dispatcher
    calls, _ = refuse_sent_marks(monkeypatch, lm_api.container.storage, refusals=4)
    vid = (await lm_api.start()).json()["id"]
    await lm_api.deliver()  # sent; storage refuses the mark, and once more at the drain's end
    assert stub.arrivals == 1 and len(calls) == 2
    (message_id,) = dispatcher.unrecorded_sends

    lm_api.clock.advance(31)  # the claim's lease lapses: the row can be claimed again...
    await lm_api.deliver()
    (message,) = await messages_of(lm_api, vid)
    assert message.attempts == 2  # ...and was claimed,
    assert stub.arrivals == 1  # but not handed to the sender
    assert dispatcher.unrecorded_sends == {message_id} and len(calls) == 4

    lm_api.clock.advance(31)
    await lm_api.deliver()  # storage is back: the kept mark is recorded
    assert dispatcher.unrecorded_sends == frozenset()
    (message,) = await messages_of(lm_api, vid)
    assert message.status.value == "sent"
    assert message.provider_ref == subid_for(message_id)
    lm_api.clock.advance(60)
    await lm_api.deliver()
    assert stub.arrivals == 1


async def test_the_running_dispatcher_records_a_refused_send_in_the_background(
    database: Database, tmp_path: Path, stub: LabsMobileStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.reset()
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    container = build(make_settings(database, tmp_path), sender=sender)
    container.dispatcher._poll_seconds = 0.05  # the recorder's first wait; it doubles
    calls, recorded = refuse_sent_marks(monkeypatch, container.storage, refusals=3)
    app = create_app(container)  # the embedded dispatcher runs
    async with app.router.lifespan_context(app):
        _, issued = await container.access.ensure_default_account()
        assert issued is not None
        headers = {"Authorization": f"Bearer {issued.secret}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            service = (await http.post("/v1/services", json={"name": "A"}, headers=headers)).json()
            started = await http.post(
                "/v1/verifications",
                json={"service_id": service["id"], "to": "+34600000001"},
                headers=headers,
            )
            assert started.status_code == 201
            await asyncio.wait_for(recorded.wait(), timeout=10)
            assert len(calls) == 4 and stub.arrivals == 1
            assert container.dispatcher.unrecorded_sends == frozenset()
            status = await http.get(f"/v1/verifications/{started.json()['id']}", headers=headers)
            assert status.json()["messages"][0]["status"] == "sent"


async def test_permanent_error_fails_at_once(lm_api: Api, stub: LabsMobileStub) -> None:
    stub.fail_next(1, code="23")
    vid = (await lm_api.start()).json()["id"]
    await lm_api.deliver()
    lm_api.clock.advance(60)
    await lm_api.deliver()
    assert len(stub.requests) == 1
    body = await status_of(lm_api, vid)
    assert body["messages"][0]["status"] == "failed"  # type: ignore[index]
    assert body["status"] == "failed"


async def test_a_failed_resend_does_not_fail_a_delivered_verification(
    lm_api: Api, stub: LabsMobileStub
) -> None:
    vid = (await lm_api.start()).json()["id"]
    await lm_api.deliver()
    lm_api.clock.advance(30)
    stub.fail_next(1, code="23")
    assert (await lm_api.start()).status_code == 200
    await lm_api.deliver()
    body = await status_of(lm_api, vid)
    assert [m["status"] for m in body["messages"]] == ["sent", "failed"]  # type: ignore[union-attr]
    assert body["status"] == "pending"


async def test_a_message_whose_verification_closed_is_not_sent(
    lm_api: Api, stub: LabsMobileStub
) -> None:
    vid = (await lm_api.start()).json()["id"]
    await lm_api.http.post(f"/v1/verifications/{vid}/cancel", headers=lm_api.auth())
    await lm_api.deliver()
    assert stub.requests == []
    body = await status_of(lm_api, vid)
    assert body["messages"][0]["status"] == "failed"  # type: ignore[index]
    assert body["status"] == "canceled"


async def test_claims_are_exclusive_until_the_lease_lapses(lm_api: Api) -> None:
    await lm_api.start()
    storage, clock = lm_api.container.storage, lm_api.clock
    first = await storage.claim_due(now=clock.now(), lease_seconds=30, limit=10)
    assert len(first) == 1 and first[0].message.attempts == 1
    assert await storage.claim_due(now=clock.now(), lease_seconds=30, limit=10) == []
    clock.advance(31)  # the claimer died: its lease lapses
    again = await storage.claim_due(now=clock.now(), lease_seconds=30, limit=10)
    assert [c.message.id for c in again] == [first[0].message.id]
    assert again[0].message.attempts == 2
    assert again[0].verification is not None
    assert again[0].verification.code_sealed is not None


async def test_housekeeping_erases_codes_of_expired_verifications(lm_api: Api) -> None:
    vid = (await lm_api.start()).json()["id"]
    storage = lm_api.container.storage
    lm_api.clock.advance(601)
    assert await storage.expire_due(lm_api.clock.now()) == 1
    stored = await storage.get_verification(lm_api.account_id, vid)
    assert stored is not None
    assert stored.status.value == "expired" and stored.code_sealed is None


async def test_receipts_update_message_status(lm_api: Api, stub: LabsMobileStub) -> None:
    vid = (await lm_api.start()).json()["id"]
    await lm_api.deliver()
    (request,) = stub.messages
    ackurl = httpx.URL(request.ackurl or "")
    path_and_query = ackurl.raw_path.decode()
    assert path_and_query.startswith("/v1/receipts/labsmobile?token=")
    forged = await lm_api.http.get(
        "/v1/receipts/labsmobile", params={"subid": request.body["subid"], "desc": "DELIVRD"}
    )
    assert forged.status_code == 403
    assert (await status_of(lm_api, vid))["messages"][0]["status"] == "sent"  # type: ignore[index]
    _, params = stub.report_params(request.body["subid"], "UNDELIV")
    answer = await lm_api.http.get(httpx.URL(path_and_query).copy_merge_params(params))
    assert answer.status_code == 200
    assert (await status_of(lm_api, vid))["messages"][0]["status"] == "undelivered"  # type: ignore[index]
    unknown_provider = await lm_api.http.get("/v1/receipts/nobody?token=x")
    assert unknown_provider.status_code == 404


async def test_a_report_that_arrives_before_the_sent_mark_is_applied_once_the_mark_lands(
    lm_api: Api, stub: LabsMobileStub
) -> None:
    """An SMSC can report before otpgate has stored the message as sent: the report is held
    and applied as soon as the message is known, not lost."""
    vid = (await lm_api.start()).json()["id"]
    message_id = (await status_of(lm_api, vid))["messages"][0]["id"]  # type: ignore[index]
    subid = subid_for(message_id)
    token = lm_api.container.keys.receipt_token("labsmobile")
    # LabsMobile's ACK parameters, as its stub would send them once it had the message.
    params = {"acklevel": "handset", "status": "ok", "desc": "DELIVRD", "subid": subid}
    early = await lm_api.http.get("/v1/receipts/labsmobile", params={"token": token, **params})
    assert early.status_code == 200  # acknowledged, so the provider does not retry
    receipts = lm_api.container.receipts
    assert receipts.held == 1
    assert (await status_of(lm_api, vid))["messages"][0]["status"] == "queued"  # type: ignore[index]

    await lm_api.deliver()  # the provider accepts it and the sent-mark is stored
    assert await receipts.apply_held() == 0
    assert (await status_of(lm_api, vid))["messages"][0]["status"] == "delivered"  # type: ignore[index]

    # A report for a message that never comes is dropped after its time.
    await lm_api.http.get(
        "/v1/receipts/labsmobile", params={"token": token, **params, "subid": "f" * 20}
    )
    assert receipts.held == 1
    assert await receipts.apply_held() == 1
    lm_api.clock.advance(receipts.EARLY_REPORT_SECONDS)
    assert await receipts.apply_held() == 0


# --- S22: a worker killed between claim and provider answer ------------------------------------


def test_worker_killed_mid_send_resends_the_same_code_once(
    database: Database, tmp_path: Path, stub: LabsMobileStub
) -> None:
    """On every backend: the worker processes share the test's database."""
    stub.reset()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "OTPGATE_DATA_DIR": str(tmp_path),
        "OTPGATE_DATABASE_URL": database.url,
        "OTPGATE_DATABASE_SCHEMA": database.schema,
        "OTPGATE_SECRET_KEY": "s22-secret-" + "y" * 40,
        "OTPGATE_SMS_PROVIDER": "labsmobile",
        "OTPGATE_LABSMOBILE_URL": stub.url,
        "OTPGATE_LABSMOBILE_USERNAME": stub.username,
        "OTPGATE_LABSMOBILE_TOKEN": stub.token,
        "OTPGATE_DELIVERY_LEASE_SECONDS": "3",
        "OTPGATE_PROVIDER_TIMEOUT_SECONDS": "2",
    }

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k.removeprefix("OTPGATE_").lower(): v for k, v in env.items() if k != "PATH"},
    )

    async def queue_one() -> tuple[str, str]:
        await prepare_database(settings)
        container = build(settings)
        try:
            account, _ = await container.access.ensure_default_account()
            me = Principal(account=account, key_id="test")
            service = await container.catalog.create(me, {"name": "Acme"})
            verification, _ = await container.verifications.start(
                me, StartRequest(service_id=service.id, to="+34600000001")
            )
            return account.id, verification.id
        finally:
            await container.aclose()

    account_id, vid = asyncio.run(queue_one())
    stub.delay_seconds = 30  # the provider takes the request and does not answer
    worker = subprocess.Popen(
        [OTPGATE, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        stub.wait_for_arrivals(1, timeout=30)
        worker.send_signal(signal.SIGKILL)  # between claim and provider answer
        worker.wait(timeout=10)
    finally:
        if worker.poll() is None:
            worker.kill()
        assert worker.stderr is not None
        worker.stderr.close()
    stub.reset()  # the provider answers again; the killed attempt's answer is dropped
    restarted = subprocess.Popen(
        [OTPGATE, "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        (sent,) = stub.wait_for_messages(1, timeout=30)
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=15)
    assert stub.arrivals == 1  # since the reset: exactly one more send, not two
    code = code_in(sent.body["message"])

    async def check() -> bool:
        container = build(settings)
        try:
            account = await container.access.get_account(account_id)
            me = Principal(account=account, key_id="test")
            return (await container.verifications.check(me, vid, code)).valid
        finally:
            await container.aclose()

    assert asyncio.run(check()) is True  # the code the user got is the verification's code


async def test_a_leased_message_is_not_claimed_until_the_lease_lapses(lm_api: Api) -> None:
    """What a start writes when it hands its message to the in-process dispatcher."""
    storage, clock = lm_api.container.storage, lm_api.clock
    vid = (await lm_api.start()).json()["id"]
    stored = await storage.get_verification(lm_api.account_id, vid)
    assert stored is not None
    message = replace(stored.messages[0], id=new_id("msg"))
    leased = await storage.record_resend(
        vid,
        message,
        body_masked="masked",
        now=clock.now(),
        interval_seconds=0,
        lease_until=clock.now() + timedelta(seconds=30),
    )
    assert leased is not None
    claimed = await storage.claim_due(now=clock.now(), lease_seconds=30, limit=10)
    assert message.id not in [c.message.id for c in claimed]  # held by its sender
    clock.advance(31)  # the sender died: the lease lapses
    again = await storage.claim_due(now=clock.now(), lease_seconds=30, limit=10)
    (taken,) = [c for c in again if c.message.id == message.id]
    assert taken.message.attempts == 2  # the handed-over attempt counted


async def test_handed_over_messages_are_sent_once(
    database: Database, tmp_path: Path, stub: LabsMobileStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running dispatcher with a slow provider: the claim loop polls all through the send and
    must not take the handed-over message a second time."""
    stub.reset()
    stub.delay_seconds = 1.5
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    container = build(make_settings(database, tmp_path), sender=sender)
    container.dispatcher._poll_seconds = 0.1  # claim as often as possible meanwhile
    storage = container.storage
    claimed: list[int] = []  # rows taken by each claim poll
    real_claim, real_mark = storage.claim_due, storage.mark_sent
    recorded = asyncio.Event()

    async def observed_claim(**fields: Any) -> Any:
        rows = await real_claim(**fields)
        claimed.append(len(rows))
        return rows

    async def observed_mark(message_id: str, **fields: Any) -> None:
        await real_mark(message_id, **fields)
        recorded.set()

    monkeypatch.setattr(storage, "claim_due", observed_claim)
    monkeypatch.setattr(storage, "mark_sent", observed_mark)
    app = create_app(container)  # the embedded dispatcher runs
    async with app.router.lifespan_context(app):
        _, issued = await container.access.ensure_default_account()
        assert issued is not None
        headers = {"Authorization": f"Bearer {issued.secret}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            service = (await http.post("/v1/services", json={"name": "A"}, headers=headers)).json()
            polls_before = len(claimed)
            started = await http.post(
                "/v1/verifications",
                json={"service_id": service["id"], "to": "+34600000001"},
                headers=headers,
            )
            assert started.status_code == 201
            await asyncio.wait_for(recorded.wait(), timeout=10)  # sent and recorded
            # The claim loop polled while the provider took its 1.5 s, and took nothing.
            assert len(claimed) - polls_before >= 3
            assert sum(claimed) == 0
            assert stub.arrivals == 1
            status = await http.get(f"/v1/verifications/{started.json()['id']}", headers=headers)
            message = status.json()["messages"][0]
            assert message["status"] == "sent"
    stub.reset()
