"""The Python SDK (:mod:`otpgate.client`) against a real ``otpgate serve`` process, on SQLite
and PostgreSQL, sending through the LabsMobile provider to a loopback stub: the codes are read
where a phone would read them, from the SMS the stub received.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from otpgate.client import (
    Account,
    AsyncClient,
    CheckResult,
    Client,
    Message,
    OtpgateError,
    Page,
    Service,
    Verification,
)
from otpgate.errors import InvalidRequest, NotFound, ResendTooSoon, Unauthorized, Unavailable
from tests.conftest import Database, code_in
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import Server, free_port, running_server


@pytest.fixture
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="ops@example.com") as running:
        yield running


@pytest.fixture
def server(stub: LabsMobileStub, database: Database, tmp_path: Path) -> Iterator[Server]:
    env: dict[str, str] = {}
    if database.backend == "postgres":
        env = {"OTPGATE_DATABASE_URL": database.url, "OTPGATE_DATABASE_SCHEMA": database.schema}
    with running_server(stub, tmp_path, extra_env=env) as running:
        yield running


def wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


def test_full_flow_with_the_sync_client(server: Server, stub: LabsMobileStub) -> None:
    with Client(server.url, api_key=server.key) as otp:
        key = str(uuid.uuid4())
        service = otp.create_service(
            "Shop", code_length=6, resend_interval_seconds=0, idempotency_key=key
        )
        assert isinstance(service, Service) and service.name == "Shop"
        assert service.code_length == 6 and isinstance(service.created_at, datetime)
        assert service.webhook_secret  # in the create answer only
        # The same Idempotency-Key replays the first answer: no second service.
        again = otp.create_service(
            "Shop", code_length=6, resend_interval_seconds=0, idempotency_key=key
        )
        assert again.id == service.id
        assert otp.get_service(service.id).webhook_secret is None

        renamed = otp.update_service(service.id, name="Shop EU", max_check_attempts=3)
        assert renamed.name == "Shop EU" and renamed.max_check_attempts == 3
        listed = otp.list_services(limit=200)
        assert service.id in {s.id for s in listed}

        started = otp.start_verification(service.id, "+34600000001")
        assert isinstance(started, Verification)
        assert started.status == "pending" and started.to == "+34600000001"
        assert started.send_attempts == 1 and started.max_check_attempts == 3
        assert started.expires_at > started.created_at
        (sms,) = stub.wait_for_messages(1, timeout=10)
        code = code_in(sms.body["message"])
        assert len(code) == 6

        bad = otp.check_verification(started.id, wrong(code))
        assert bad == CheckResult(started.id, "pending", False, 2)
        good = otp.check_verification(started.id, code)
        assert good.valid and good.status == "approved"
        fetched = otp.get_verification(started.id)
        assert fetched.status == "approved" and fetched.check_attempts == 1  # the wrong one
        assert fetched.messages and fetched.messages[0].segments >= 1

        # By destination: the most recent verification of the number in the service.
        second = otp.start_verification(service.id, "+34600000002", metadata={"order": 7})
        stub.wait_for_messages(2, timeout=10)
        second_code = code_in(stub.messages[1].body["message"])
        by_destination = otp.check_destination(service.id, "+34600000002", second_code)
        assert by_destination.id == second.id and by_destination.valid

        # Resend (no cooldown on this service): the same verification, one more send.
        third = otp.start_verification(service.id, "+34600000003")
        resent = otp.resend_verification(third.id)
        assert resent.id == third.id and resent.send_attempts == 2
        canceled = otp.cancel_verification(third.id)
        assert canceled.status == "canceled"
        assert otp.check_verification(third.id, code).valid is False

        # Paging: three verifications, two per page, newest first.
        first_page = otp.list_verifications(service_id=service.id, limit=2)
        assert isinstance(first_page, Page) and len(first_page) == 2
        assert first_page.next_cursor is not None
        rest = otp.list_verifications(service_id=service.id, limit=2, cursor=first_page.next_cursor)
        assert [v.id for v in [*first_page, *rest]] == [third.id, second.id, started.id]
        assert rest.next_cursor is None
        approved = otp.list_verifications(service_id=service.id, status="approved")
        assert {v.id for v in approved} == {started.id, second.id}

        message = otp.send_message("+34600000009", "Your parcel is on its way")
        assert isinstance(message, Message) and message.to == "+34600000009"
        plain = stub.wait_for_messages(5, timeout=10)[-1]
        assert plain.body["message"] == "Your parcel is on its way"
        assert otp.get_message(message.id).id == message.id

        account = otp.get_account()
        assert isinstance(account, Account) and account.username == server.username
        assert isinstance(account.balance, Decimal)
        ledger = otp.list_ledger(limit=5)
        assert isinstance(ledger, Page) and len(ledger) <= 5

        otp.delete_service(service.id)
        with pytest.raises(NotFound):
            otp.get_service(service.id)


async def test_full_flow_with_the_async_client(server: Server, stub: LabsMobileStub) -> None:
    async with AsyncClient(server.url, api_key=server.key) as otp:
        service = await otp.create_service("Async shop", idempotency_key=str(uuid.uuid4()))
        started = await otp.start_verification(service.id, "+34600000011", locale="es")
        assert started.status == "pending"
        (sms,) = await stub.wait_for_messages_async(1, 10)
        code = code_in(sms.body["message"])

        bad = await otp.check_verification(started.id, wrong(code))
        assert bad.valid is False and bad.status == "pending"
        good = await otp.check_verification(started.id, code)
        assert good.valid is True and good.status == "approved"

        other = await otp.start_verification(service.id, "+34600000012")
        await stub.wait_for_messages_async(2, 10)
        by_destination = await otp.check_destination(
            service.id, "+34600000012", wrong(code_in(stub.messages[1].body["message"]))
        )
        assert by_destination.id == other.id and not by_destination.valid
        canceled = await otp.cancel_verification(other.id)
        assert canceled.status == "canceled"
        assert (await otp.get_verification(other.id)).status == "canceled"

        page = await otp.list_verifications(service_id=service.id, limit=1)
        assert [v.id for v in page] == [other.id] and page.next_cursor
        rest = await otp.list_verifications(service_id=service.id, cursor=page.next_cursor)
        assert [v.id for v in rest] == [started.id] and rest.next_cursor is None

        message = await otp.send_message("+34600000019", "Hola", idempotency_key=str(uuid.uuid4()))
        assert (await otp.get_message(message.id)).to == "+34600000019"
        assert (await stub.wait_for_messages_async(3, 10))[-1].body["message"] == "Hola"

        updated = await otp.update_service(service.id, resend_interval_seconds=0)
        assert updated.resend_interval_seconds == 0
        assert service.id in {s.id for s in await otp.list_services(limit=200)}
        assert (await otp.get_account()).username == server.username
        assert isinstance(await otp.list_ledger(), Page)
        await otp.delete_service(service.id)
        with pytest.raises(NotFound) as missing:
            await otp.get_service(service.id)
        assert missing.value.status == 404 and missing.value.code == "not_found"


def test_errors_carry_code_status_param_and_retry_after(
    server: Server, stub: LabsMobileStub
) -> None:
    with Client(server.url, api_key=server.key) as otp:
        with pytest.raises(OtpgateError) as missing:
            otp.get_verification("ver_doesnotexist")
        assert isinstance(missing.value, NotFound)
        assert (missing.value.status, missing.value.code) == (404, "not_found")

        with pytest.raises(OtpgateError) as invalid:
            otp.create_service("Too long codes", code_length=99)
        assert isinstance(invalid.value, InvalidRequest)
        assert (invalid.value.status, invalid.value.code) == (400, "invalid_request")
        assert invalid.value.param == "code_length" and invalid.value.detail
        # A refused create changed nothing.
        assert "Too long codes" not in {s.name for s in otp.list_services(limit=200)}

        with pytest.raises(InvalidRequest) as bad_limit:
            otp.list_verifications(limit=1000)
        assert bad_limit.value.param == "limit"

        # 429 resend_too_soon, with the seconds to wait; nothing is retried by the client.
        service = otp.create_service("Cooldown", resend_interval_seconds=60)
        started = otp.start_verification(service.id, "+34600000021")
        stub.wait_for_messages(1, timeout=10)
        with pytest.raises(OtpgateError) as too_soon:
            otp.resend_verification(started.id)
        assert isinstance(too_soon.value, ResendTooSoon)
        assert (too_soon.value.status, too_soon.value.code) == (429, "resend_too_soon")
        assert too_soon.value.retry_after is not None and 0 < too_soon.value.retry_after <= 60
        assert otp.get_verification(started.id).send_attempts == 1
        assert len(stub.messages) == 1

    with Client(server.url, api_key="otpgate_" + "x" * 43) as stranger:
        with pytest.raises(Unauthorized) as refused:
            stranger.get_account()
        assert (refused.value.status, refused.value.code) == (401, "unauthorized")

    offline = Client(f"http://127.0.0.1:{free_port()}", api_key=server.key, timeout=2)
    with offline, pytest.raises(Unavailable):
        offline.get_account()


async def test_async_errors(server: Server) -> None:
    async with AsyncClient(server.url, api_key=server.key) as otp:
        with pytest.raises(NotFound):
            await otp.cancel_verification("ver_doesnotexist")
        with pytest.raises(InvalidRequest) as invalid:
            await otp.start_verification(server.service_id, "+34600000031", channel="pigeon")
        assert invalid.value.param == "channel"


async def test_reprs_hide_the_key_and_the_webhook_secret(server: Server) -> None:
    with Client(server.url, api_key=server.key) as otp:
        service = otp.create_service("Secretive")
        assert service.webhook_secret
        for text in (repr(otp), str(otp), repr(service), str(service), repr(otp.__dict__)):
            assert server.key not in text
            assert service.webhook_secret not in text
        assert server.url in repr(otp)
        with pytest.raises(NotFound) as missing:
            otp.get_service("svc_doesnotexist")
        assert server.key not in repr(missing.value) and server.key not in str(missing.value)
    async with AsyncClient(server.url, api_key=server.key) as aotp:
        assert server.key not in repr(aotp) and server.key not in repr(aotp.__dict__)


async def test_rate_limited_carries_retry_after(server: Server, stub: LabsMobileStub) -> None:
    """The default per-number limit (10 starts an hour) answers 429 rate_limited with the seconds
    to wait; the refused start sends nothing (the pumping detector is off: ten abandoned
    verifications of one number would trip it first)."""
    async with AsyncClient(server.url, api_key=server.key) as otp:
        service = await otp.create_service("Limits", resend_interval_seconds=0, fraud_guard="off")
        for _ in range(10):
            started = await otp.start_verification(service.id, "+34600000041")
            await otp.cancel_verification(started.id)
        await stub.wait_for_messages_async(10, 10)
        with pytest.raises(OtpgateError) as limited:
            await otp.start_verification(service.id, "+34600000041")
        assert (limited.value.status, limited.value.code) == (429, "rate_limited")
        assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 3600
        assert len(stub.messages) == 10
        page = await otp.list_verifications(service_id=service.id, limit=200)
        assert len(page) == 10
