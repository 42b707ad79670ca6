"""The Vonage provider against the loopback Vonage stub (tests/support/vonage_stub.py): the
shared sender contract, then Vonage's own behaviour: the request as documented, the status
table, ``check`` by the balance, delivery receipts, and options that name their settings.

Receipts through the real app's ``/v1/receipts/vonage`` endpoint, on both databases, are in
``tests/integration/test_http_providers.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from otpgate.adapters.providers.vonage import VonageSender
from otpgate.bootstrap import build_sender
from otpgate.domain.model import MessageStatus
from otpgate.errors import (
    ConfigurationError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.settings import Settings
from tests.contract.sender_contract import (
    MESSAGE_ID,
    TEXT,
    SenderCase,
    SenderContract,
    assert_no_secret,
    make_sms,
)
from tests.support.vonage_stub import VonageStub

RECEIPT_URL = "https://otp.example.com/v1/receipts/vonage?token=tok"


@pytest.fixture(scope="module")
def stub_server() -> Iterator[VonageStub]:
    with VonageStub() as stub:
        yield stub


@pytest.fixture
def stub(stub_server: VonageStub) -> Iterator[VonageStub]:
    stub_server.reset()
    yield stub_server
    stub_server.reset()


def make_sender(stub: VonageStub, **overrides: object) -> VonageSender:
    values: dict[str, object] = {
        "api_key": stub.api_key,
        "api_secret": stub.api_secret,
        "base_url": stub.url,
        "timeout_seconds": 5.0,
    }
    values.update(overrides)
    return VonageSender(**values)  # type: ignore[arg-type]


@pytest.fixture
async def vonage(stub: VonageStub) -> AsyncIterator[VonageSender]:
    sender = make_sender(stub)
    yield sender
    await sender.aclose()


@pytest.fixture
async def case(stub: VonageStub) -> AsyncIterator[SenderCase]:
    sender = make_sender(stub)
    yield SenderCase(
        sender=sender,
        secrets=(stub.api_secret,),
        delivered_texts=lambda: [m.text for m in stub.sent],
        break_next_send=lambda: stub.fail_next(1, "1"),
        break_check=lambda: stub.http_status_next(1, 503),
    )
    await sender.aclose()


class TestContract(SenderContract):
    """The shared contract, for Vonage's SMS API."""


# --------------------------------------------------------------------------------------------
# The request


async def test_an_sms_is_one_form_post_with_the_documented_fields(
    vonage: VonageSender, stub: VonageStub
) -> None:
    receipt = await vonage.send(make_sms(receipt_url=RECEIPT_URL))

    (sms,) = stub.sent
    assert sms.form == {
        "api_key": stub.api_key,
        "api_secret": stub.api_secret,
        "from": "Acme",
        "to": "34600000000",
        "text": TEXT,
        "client-ref": MESSAGE_ID,
        "callback": RECEIPT_URL,
    }
    assert receipt.provider_ref == MESSAGE_ID


async def test_a_ucs2_text_goes_as_unicode(vonage: VonageSender, stub: VonageStub) -> None:
    text = "Ваш код 845201"
    await vonage.send(make_sms(text=text, encoding="UCS-2"))
    (sms,) = stub.sent
    assert sms.form["type"] == "unicode" and sms.text == text


async def test_a_gsm_text_is_sent_as_plain_text(vonage: VonageSender, stub: VonageStub) -> None:
    await vonage.send(make_sms())
    assert "type" not in stub.sent[0].form  # ``text`` is Vonage's default


async def test_a_long_text_is_one_send_of_several_parts_with_one_reference(
    vonage: VonageSender, stub: VonageStub
) -> None:
    text = "Código 845201. " + "x" * 300
    receipt = await vonage.send(make_sms(text=text, segments=3))
    (sms,) = stub.sent
    assert len(sms.message_ids) == 3 and receipt.provider_ref == MESSAGE_ID


async def test_the_providers_from_serves_a_service_without_a_sender_id(stub: VonageStub) -> None:
    sender = make_sender(stub, from_="OtpGate")
    try:
        await sender.send(make_sms(sender_id=None))
    finally:
        await sender.aclose()
    assert stub.sent[0].form["from"] == "OtpGate"


async def test_without_any_sender_the_message_fails_over(
    vonage: VonageSender, stub: VonageStub
) -> None:
    with pytest.raises(TransientDeliveryError, match="no sender"):
        await vonage.send(make_sms(sender_id=None))
    assert stub.sent == []


# --------------------------------------------------------------------------------------------
# Status codes


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("1", TransientDeliveryError),  # throttled
        ("2", PermanentDeliveryError),  # missing parameters
        ("3", PermanentDeliveryError),  # invalid parameters
        ("4", TransientDeliveryError),  # invalid credentials: this route
        ("5", TransientDeliveryError),  # internal error
        ("6", PermanentDeliveryError),  # invalid message
        ("7", PermanentDeliveryError),  # number barred
        ("8", TransientDeliveryError),  # account barred
        ("9", TransientDeliveryError),  # no credit
        ("15", PermanentDeliveryError),  # invalid sender address
        ("23", TransientDeliveryError),  # invalid callback URL: ours
        ("29", PermanentDeliveryError),  # non-whitelisted destination
        ("33", PermanentDeliveryError),  # number de-activated
        ("99", TransientDeliveryError),  # not documented
    ],
)
async def test_status_codes_are_classified(
    vonage: VonageSender, stub: VonageStub, status: str, expected: type[Exception]
) -> None:
    stub.fail_next(1, status)
    with pytest.raises(expected) as info:
        await vonage.send(make_sms())
    assert type(info.value) is expected
    assert f"status {status}" in str(info.value)
    assert_no_secret(info.value, stub.api_secret)
    assert stub.sent == []


async def test_the_stubs_own_refusals_are_classified(
    vonage: VonageSender, stub: VonageStub
) -> None:
    with pytest.raises(PermanentDeliveryError, match="status 3"):
        await vonage.send(make_sms(to="+0123"))
    with pytest.raises(PermanentDeliveryError, match="status 15"):
        await vonage.send(make_sms(sender_id="Far too long a sender"))


async def test_wrong_credentials_are_transient_and_never_shown(stub: VonageStub) -> None:
    sender = make_sender(stub, api_secret="wrong-SECRET-1")
    try:
        with pytest.raises(TransientDeliveryError, match="status 4") as info:
            await sender.send(make_sms())
        assert_no_secret(info.value, "wrong-SECRET-1", stub.api_secret)
        with pytest.raises(TransientDeliveryError, match="HTTP 401") as checked:
            await sender.check()
        assert_no_secret(checked.value, "wrong-SECRET-1", stub.api_secret)
    finally:
        await sender.aclose()


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_http_failures_are_transient(
    vonage: VonageSender, stub: VonageStub, status: int
) -> None:
    stub.http_status_next(1, status)
    with pytest.raises(TransientDeliveryError) as info:
        await vonage.send(make_sms())
    assert not isinstance(info.value, DeliveryTimeout)
    if status == 429:
        assert info.value.retry_after == 1


async def test_a_hanging_vonage_is_an_unknown_outcome(stub: VonageStub) -> None:
    stub.delay_seconds = 5.0
    sender = make_sender(stub, timeout_seconds=0.3)
    try:
        with pytest.raises(DeliveryTimeout) as info:
            await sender.send(make_sms())
        assert_no_secret(info.value, stub.api_secret)
        with pytest.raises(DeliveryTimeout) as checked:  # its URL holds the secret
            await sender.check()
        assert_no_secret(checked.value, stub.api_secret)
    finally:
        await sender.aclose()


async def test_check_reads_the_balance(vonage: VonageSender, stub: VonageStub) -> None:
    await vonage.check()
    assert stub.sent == []


# --------------------------------------------------------------------------------------------
# Delivery receipts


@pytest.mark.parametrize(
    ("state", "err_code", "status", "detail"),
    [
        ("delivered", "0", MessageStatus.DELIVERED, "delivered"),
        ("failed", "6", MessageStatus.UNDELIVERED, "failed (err-code 6)"),
        ("rejected", "4", MessageStatus.UNDELIVERED, "rejected (err-code 4)"),
        ("expired", "5", MessageStatus.UNDELIVERED, "expired (err-code 5)"),
        ("accepted", "0", None, "accepted"),
        ("buffered", "0", None, "buffered"),
        ("unknown", "99", None, "unknown (err-code 99)"),
    ],
)
async def test_delivery_receipts_are_parsed(
    vonage: VonageSender,
    stub: VonageStub,
    state: str,
    err_code: str,
    status: MessageStatus | None,
    detail: str,
) -> None:
    await vonage.send(make_sms(receipt_url=RECEIPT_URL))
    url, params = stub.receipt(MESSAGE_ID, state, err_code=err_code)
    assert url == RECEIPT_URL

    report = vonage.parse_receipt(params)

    assert report is not None
    assert (report.provider_ref, report.status, report.detail) == (MESSAGE_ID, status, detail)


def test_a_receipt_without_client_ref_names_no_message(vonage: VonageSender) -> None:
    assert vonage.parse_receipt({"messageId": "0A", "status": "delivered"}) is None


# --------------------------------------------------------------------------------------------
# Options


def test_the_environment_builds_a_vonage_sender(stub: VonageStub) -> None:
    sender = build_sender(
        Settings(
            sms_provider="vonage",
            vonage_api_key=stub.api_key,
            vonage_api_secret=stub.api_secret,  # type: ignore[arg-type]
            vonage_url=stub.url,
            vonage_from="OtpGate",
        )
    )
    assert isinstance(sender, VonageSender)
    assert stub.api_secret not in repr(sender)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({}, "needs OTPGATE_VONAGE_API_KEY and OTPGATE_VONAGE_API_SECRET"),
        ({"vonage_api_key": "key"}, "needs OTPGATE_VONAGE_API_SECRET"),
        (
            {
                "vonage_api_key": "key",
                "vonage_api_secret": "hush-1",
                "vonage_url": "ftp://hush.example",
            },
            "OTPGATE_VONAGE_URL must be an http:// or https:// URL",
        ),
    ],
)
def test_bad_options_name_their_setting_never_a_value(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_sender(Settings(sms_provider="vonage", **values))  # type: ignore[arg-type]
    assert named in str(info.value)
    assert "hush" not in str(info.value)
