"""The outbox and the dispatcher against the LabsMobile stub, on SQLite and PostgreSQL:
retries with backoff, permanent failures, leases, and a worker killed mid-send (S22, S23)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from otpgate.adapters.providers.labsmobile import LabsMobileSender
from otpgate.bootstrap import build, prepare_database
from otpgate.domain.model import Principal, new_id
from otpgate.entrypoints.api.app import create_app
from otpgate.services.verification import StartRequest
from otpgate.settings import Settings
from tests.conftest import Api, Database, FrozenClock, code_in, make_settings
from tests.support.labsmobile_stub import LabsMobileStub

OTPGATE = str(Path(sys.executable).with_name("otpgate"))


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as running:
        yield running


@pytest.fixture
async def lm_api(database: Database, tmp_path: Path, stub: LabsMobileStub) -> AsyncIterator[Api]:
    """The app with the real LabsMobile sender pointed at the stub; the test drives delivery."""
    stub.reset()
    clock = FrozenClock()
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    settings = make_settings(
        database,
        tmp_path,
        delivery_max_attempts=3,
        delivery_backoff_seconds=2.0,
        delivery_lease_seconds=30,
    )
    container = build(settings, sender=sender, clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service()
            yield api


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


async def test_transient_errors_give_up_after_max_attempts(
    lm_api: Api, stub: LabsMobileStub
) -> None:
    stub.http_status_next(3, 503)
    vid = (await lm_api.start()).json()["id"]
    for _ in range(3):
        await lm_api.deliver()
        lm_api.clock.advance(10)
    assert len(stub.requests) == 3
    body = await status_of(lm_api, vid)
    assert body["messages"][0]["status"] == "failed"  # type: ignore[index]
    assert body["status"] == "failed"
    check = await lm_api.check(vid, "123456")
    assert check.json()["status"] == "failed" and check.json()["valid"] is False


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


# --- S22: a worker killed between claim and provider answer ------------------------------------


def test_worker_killed_mid_send_resends_the_same_code_once(
    tmp_path: Path, stub: LabsMobileStub
) -> None:
    stub.reset()
    db = tmp_path / "otpgate.db"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "OTPGATE_DATA_DIR": str(tmp_path),
        "OTPGATE_DATABASE_URL": f"sqlite:///{db}",
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
    database: Database, tmp_path: Path, stub: LabsMobileStub
) -> None:
    """A running dispatcher with a slow provider: the claim loop polls meanwhile and must not
    send the handed-over message a second time."""
    stub.reset()
    stub.delay_seconds = 1.5
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    container = build(make_settings(database, tmp_path), sender=sender)
    container.dispatcher._poll_seconds = 0.1  # claim as often as possible meanwhile
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
            await asyncio.to_thread(stub.wait_for_messages, 1, 10)
            await asyncio.sleep(1.0)  # several claim polls after the send
            assert stub.arrivals == 1
            status = await http.get(f"/v1/verifications/{started.json()['id']}", headers=headers)
            message = status.json()["messages"][0]
            assert message["status"] == "sent"
    stub.reset()
