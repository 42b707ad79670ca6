"""The Twilio provider against the loopback Twilio stub (tests/support/twilio_stub.py): the
shared sender contract for SMS and for voice, then Twilio's own behaviour: the request as
documented, the error table, the voice TwiML (language, escaping), status callbacks and their
signatures, and options that name their settings.

Receipts through the real app's ``/v1/receipts/twilio`` endpoint, on both databases, are in
``tests/integration/test_http_providers.py``."""

from __future__ import annotations

import base64
import socket
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from twilio.request_validator import RequestValidator

from otpgate.adapters.providers.config import load_delivery
from otpgate.adapters.providers.twilio import TwilioSender, say_language, twiml_say
from otpgate.bootstrap import build_sender
from otpgate.domain.model import Channel, MessageStatus, OutboundMessage
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
from tests.support.twilio_stub import TwilioStub

NUMBER = "+15005550006"
RECEIPT_URL = "https://otp.example.com/v1/receipts/twilio?token=tok"


@pytest.fixture(scope="module")
def stub_server() -> Iterator[TwilioStub]:
    with TwilioStub(numbers=(NUMBER,)) as stub:
        yield stub


@pytest.fixture
def stub(stub_server: TwilioStub) -> Iterator[TwilioStub]:
    stub_server.reset()
    yield stub_server
    stub_server.reset()


def make_sender(stub: TwilioStub, **overrides: object) -> TwilioSender:
    values: dict[str, object] = {
        "account_sid": stub.account_sid,
        "auth_token": stub.auth_token,
        "from_": NUMBER,
        "base_url": stub.url,
        "timeout_seconds": 5.0,
    }
    values.update(overrides)
    return TwilioSender(**values)  # type: ignore[arg-type]


@pytest.fixture
async def twilio(stub: TwilioStub) -> AsyncIterator[TwilioSender]:
    sender = make_sender(stub)
    yield sender
    await sender.aclose()


def voice(message_id: str, text: str = TEXT, locale: str = "en") -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id, channel=Channel.VOICE, to="+34600000000", text=text, locale=locale
    )


@pytest.fixture(params=["sms", "voice"])
async def case(request: pytest.FixtureRequest, stub: TwilioStub) -> AsyncIterator[SenderCase]:
    sender = make_sender(stub)
    if request.param == "sms":
        yield SenderCase(
            sender=sender,
            secrets=(stub.auth_token,),
            delivered_texts=lambda: [m.body for m in stub.messages],
            break_next_send=lambda: stub.http_status_next(1, 503),
            break_check=lambda: stub.http_status_next(1, 503),
        )
    else:
        yield SenderCase(
            sender=sender,
            secrets=(stub.auth_token,),
            delivered_texts=lambda: [text for c in stub.calls for text, _ in c.said],
            break_next_send=lambda: stub.http_status_next(1, 500),
            message=voice,
            break_check=lambda: stub.http_status_next(1, 500),
        )
    await sender.aclose()


class TestContract(SenderContract):
    """The shared contract, for Twilio SMS and Twilio voice."""


# --------------------------------------------------------------------------------------------
# The requests, as documented


async def test_an_sms_is_one_form_post_with_basic_auth(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    receipt = await twilio.send(make_sms(receipt_url=RECEIPT_URL))

    (message,) = stub.messages
    assert receipt.provider_ref == message.sid and message.sid.startswith("SM")
    assert message.form == {
        "To": "+34600000000",
        "From": NUMBER,
        "Body": TEXT,
        "StatusCallback": RECEIPT_URL,
    }
    credentials = base64.b64encode(f"{stub.account_sid}:{stub.auth_token}".encode()).decode()
    assert message.headers["authorization"] == f"Basic {credentials}"
    assert message.headers["content-type"] == "application/x-www-form-urlencoded"


async def test_without_a_receipt_url_no_status_callback_is_asked(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    await twilio.send(make_sms())
    assert "StatusCallback" not in stub.messages[0].form


async def test_a_messaging_service_replaces_the_from_number(stub: TwilioStub) -> None:
    service = stub.services[0]
    sender = make_sender(stub, from_="", messaging_service_sid=service)
    try:
        await sender.send(make_sms())
        with pytest.raises(PermanentDeliveryError, match="does not carry voice"):
            await sender.send(voice(MESSAGE_ID))
    finally:
        await sender.aclose()
    (message,) = stub.messages
    assert message.form["MessagingServiceSid"] == service and "From" not in message.form
    assert sender.channels == {Channel.SMS}


async def test_a_unicode_text_goes_as_it_is(twilio: TwilioSender, stub: TwilioStub) -> None:
    text = "Κωδικός 845201 — код"
    await twilio.send(make_sms(text=text, encoding="UCS-2"))
    assert stub.messages[0].body == text


async def test_email_is_refused_for_good(twilio: TwilioSender) -> None:
    from otpgate.domain.model import EmailContent

    message = OutboundMessage(
        message_id=MESSAGE_ID,
        channel=Channel.EMAIL,
        to="a@example.com",
        text=TEXT,
        email=EmailContent(subject="Code", html="<p>x</p>"),
    )
    with pytest.raises(PermanentDeliveryError):
        await twilio.send(message)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        (21211, 400, PermanentDeliveryError),  # invalid To
        (21610, 400, PermanentDeliveryError),  # unsubscribed (STOP)
        (21614, 400, PermanentDeliveryError),  # not a mobile number
        (21612, 400, PermanentDeliveryError),  # To not reachable
        (21617, 400, PermanentDeliveryError),  # body too long
        (21999, 400, PermanentDeliveryError),  # any other refusal of this request
        (21408, 400, TransientDeliveryError),  # no permission for the region: this account
        (21606, 400, TransientDeliveryError),  # From not usable: this account
        (21608, 400, TransientDeliveryError),  # unverified To on a trial account
        (20003, 401, TransientDeliveryError),  # credentials
        (20404, 404, TransientDeliveryError),  # wrong account or URL
        (20429, 429, TransientDeliveryError),  # too many requests
        (20500, 500, TransientDeliveryError),
        (20503, 503, TransientDeliveryError),
    ],
)
async def test_twilio_errors_are_classified(
    twilio: TwilioSender,
    stub: TwilioStub,
    code: int,
    status: int,
    expected: type[Exception],
) -> None:
    stub.fail_next(1, code, status)

    with pytest.raises(expected) as info:
        await twilio.send(make_sms())

    assert type(info.value) is expected  # a DeliveryTimeout would be the wrong answer
    assert f"Twilio error {code}" in str(info.value) and f"HTTP {status}" in str(info.value)
    assert_no_secret(info.value, stub.auth_token)
    assert stub.messages == []


async def test_the_stubs_own_refusal_of_a_bad_number_is_permanent(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    with pytest.raises(PermanentDeliveryError, match="21211"):
        await twilio.send(make_sms(to="+0123"))


async def test_429_carries_retry_after(twilio: TwilioSender, stub: TwilioStub) -> None:
    stub.http_status_next(1, 429)
    with pytest.raises(TransientDeliveryError) as info:
        await twilio.send(make_sms())
    assert info.value.retry_after == 2


async def test_wrong_credentials_are_transient_and_never_shown(stub: TwilioStub) -> None:
    sender = make_sender(stub, auth_token="wrong-token-SECRET")
    try:
        with pytest.raises(TransientDeliveryError) as info:
            await sender.send(make_sms())
        assert "20003" in str(info.value)
        assert_no_secret(info.value, "wrong-token-SECRET", stub.auth_token)
        with pytest.raises(TransientDeliveryError) as checked:
            await sender.check()
        assert_no_secret(checked.value, "wrong-token-SECRET")
    finally:
        await sender.aclose()


async def test_a_hanging_twilio_is_an_unknown_outcome(stub: TwilioStub) -> None:
    stub.delay_seconds = 5.0
    sender = make_sender(stub, timeout_seconds=0.3)
    try:
        with pytest.raises(DeliveryTimeout) as info:
            await sender.send(make_sms())
        assert_no_secret(info.value, stub.auth_token)
    finally:
        await sender.aclose()


async def test_a_refused_connection_certainly_sent_nothing(stub: TwilioStub) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = make_sender(stub, base_url=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(TransientDeliveryError) as info:
            await sender.send(make_sms())
        assert not isinstance(info.value, DeliveryTimeout)
    finally:
        await sender.aclose()


async def test_check_reads_the_account_and_never_shows_its_token(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    await twilio.check()  # the Account resource carries the auth token: nothing keeps it
    assert stub.messages == [] and stub.calls == []
    stub.http_status_next(1, 503)
    with pytest.raises(TransientDeliveryError) as info:
        await twilio.check()
    assert_no_secret(info.value, stub.auth_token)


# --------------------------------------------------------------------------------------------
# Voice


@pytest.mark.parametrize(
    ("locale", "language"),
    [
        ("en", "en-US"),
        ("en-GB", "en-GB"),
        ("es", "es-ES"),
        ("fr", "fr-FR"),
        ("de", "de-DE"),
        ("it", "it-IT"),
        ("pt", "pt-PT"),
        ("pt-BR", "pt-BR"),
        ("pt_br", "pt-BR"),
        ("ca", "ca-ES"),
        ("nl", "nl-NL"),
        ("es-AR", "es-ES"),  # a region Twilio does not speak: the language's default
        ("xx", "en-US"),
    ],
)
async def test_a_call_says_the_text_in_the_locales_language(
    twilio: TwilioSender, stub: TwilioStub, locale: str, language: str
) -> None:
    text = "Su código es 8 4 5 2 0 1. Repito: 8 4 5 2 0 1."
    receipt = await twilio.send(voice(MESSAGE_ID, text, locale))

    (call,) = stub.calls
    assert receipt.provider_ref == call.sid and call.sid.startswith("CA")
    assert call.said == [(text, language)]
    assert say_language(locale) == language
    assert call.form["From"] == NUMBER and call.form["To"] == "+34600000000"
    assert set(call.form) == {"To", "From", "Twiml"}


async def test_the_spoken_text_is_escaped_not_interpreted(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    text = "A & B <\"'> </Say><Play>http://evil.example/x.mp3</Play><Say> 1 2 3"
    await twilio.send(voice(MESSAGE_ID, text))

    (call,) = stub.calls
    root = ET.fromstring(call.form["Twiml"])  # noqa: S314
    assert [child.tag for child in root] == ["Say"]
    assert root[0].text == text


def test_twiml_drops_characters_xml_cannot_carry() -> None:
    document = twiml_say("1\x002\x1b3", "de")
    assert ET.fromstring(document).find("Say").text == "1 2 3"  # type: ignore[union-attr]  # noqa: S314


async def test_a_voice_text_too_long_for_inline_twiml_is_refused(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    with pytest.raises(PermanentDeliveryError):
        await twilio.send(voice(MESSAGE_ID, "1 " * 2100))
    assert stub.calls == []


async def test_a_call_gets_the_status_callback(twilio: TwilioSender, stub: TwilioStub) -> None:
    message = OutboundMessage(
        message_id=MESSAGE_ID,
        channel=Channel.VOICE,
        to="+34600000000",
        text=TEXT,
        receipt_url=RECEIPT_URL,
    )
    await twilio.send(message)
    assert stub.calls[0].form["StatusCallback"] == RECEIPT_URL


# --------------------------------------------------------------------------------------------
# Status callbacks


@pytest.mark.parametrize(
    ("params", "ref", "status", "detail"),
    [
        (
            {"MessageSid": "SM1", "MessageStatus": "delivered"},
            "SM1",
            MessageStatus.DELIVERED,
            "delivered",
        ),
        (
            {"MessageSid": "SM1", "MessageStatus": "undelivered", "ErrorCode": "30003"},
            "SM1",
            MessageStatus.UNDELIVERED,
            "undelivered (error 30003)",
        ),
        (
            {"MessageSid": "SM1", "MessageStatus": "failed"},
            "SM1",
            MessageStatus.UNDELIVERED,
            "failed",
        ),
        ({"MessageSid": "SM1", "MessageStatus": "sent"}, "SM1", None, "sent"),
        ({"SmsSid": "SM2", "SmsStatus": "delivered"}, "SM2", MessageStatus.DELIVERED, "delivered"),
        (
            {"CallSid": "CA1", "CallStatus": "completed"},
            "CA1",
            MessageStatus.DELIVERED,
            "completed",
        ),
        ({"CallSid": "CA1", "CallStatus": "busy"}, "CA1", MessageStatus.UNDELIVERED, "busy"),
        (
            {"CallSid": "CA1", "CallStatus": "no-answer"},
            "CA1",
            MessageStatus.UNDELIVERED,
            "no-answer",
        ),
        ({"CallSid": "CA1", "CallStatus": "failed"}, "CA1", MessageStatus.UNDELIVERED, "failed"),
        ({"CallSid": "CA1", "CallStatus": "ringing"}, "CA1", None, "ringing"),
    ],
)
def test_status_callbacks_are_parsed(
    twilio: TwilioSender,
    params: dict[str, str],
    ref: str,
    status: MessageStatus | None,
    detail: str,
) -> None:
    report = twilio.parse_receipt(params)
    assert report is not None
    assert (report.provider_ref, report.status, report.detail) == (ref, status, detail)


def test_a_callback_without_a_sid_names_no_message(twilio: TwilioSender) -> None:
    assert twilio.parse_receipt({"MessageStatus": "delivered"}) is None


async def test_a_signed_callback_from_the_stub_is_authentic_and_a_changed_one_is_not(
    twilio: TwilioSender, stub: TwilioStub
) -> None:
    receipt = await twilio.send(make_sms(receipt_url=RECEIPT_URL))
    url, params, headers = stub.callback_request(receipt.provider_ref or "", "delivered")
    lower = {k.lower(): v for k, v in headers.items()}

    assert twilio.authenticate_receipt(url, params, lower)
    assert not twilio.authenticate_receipt(url, {**params, "MessageStatus": "failed"}, lower)
    assert not twilio.authenticate_receipt(url.replace("tok", "other"), params, lower)
    assert not twilio.authenticate_receipt(url, params, {})
    forged = RequestValidator("not-the-token").compute_signature(url, params)
    assert not twilio.authenticate_receipt(url, params, {"x-twilio-signature": forged})


# --------------------------------------------------------------------------------------------
# Options


def test_the_environment_builds_a_twilio_sender(stub: TwilioStub) -> None:
    sender = build_sender(
        Settings(
            sms_provider="twilio",
            twilio_account_sid=stub.account_sid,
            twilio_auth_token=stub.auth_token,  # type: ignore[arg-type]
            twilio_from=NUMBER,
            twilio_url=stub.url,
        )
    )
    assert isinstance(sender, TwilioSender)
    assert sender.channels == {Channel.SMS, Channel.VOICE}
    assert stub.auth_token not in repr(sender)


SID = "AC" + "0" * 32


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({}, "needs OTPGATE_TWILIO_ACCOUNT_SID and OTPGATE_TWILIO_AUTH_TOKEN"),
        ({"twilio_account_sid": SID}, "needs OTPGATE_TWILIO_AUTH_TOKEN"),
        (
            {"twilio_account_sid": "SECRET-ish", "twilio_auth_token": "tok-SECRET-42"},
            "OTPGATE_TWILIO_ACCOUNT_SID must be a Twilio account SID",
        ),
        (
            {"twilio_account_sid": SID, "twilio_auth_token": "tok-SECRET-42"},
            "needs OTPGATE_TWILIO_FROM or OTPGATE_TWILIO_MESSAGING_SERVICE_SID",
        ),
        (
            {
                "twilio_account_sid": SID,
                "twilio_auth_token": "tok-SECRET-42",
                "twilio_messaging_service_sid": "MG-SECRET",
            },
            "OTPGATE_TWILIO_MESSAGING_SERVICE_SID must be a Messaging Service SID",
        ),
        (
            {
                "twilio_account_sid": SID,
                "twilio_auth_token": "tok-SECRET-42",
                "twilio_from": NUMBER,
                "twilio_url": "ftp://SECRET.example",
            },
            "OTPGATE_TWILIO_URL must be an http:// or https:// URL",
        ),
    ],
)
def test_bad_options_name_their_setting_never_a_value(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_sender(Settings(sms_provider="twilio", **values))  # type: ignore[arg-type]
    assert named in str(info.value)
    assert "SECRET" not in str(info.value)


def test_the_file_form_names_from_as_the_operator_wrote_it(tmp_path: Path) -> None:
    config = tmp_path / "otpgate.toml"
    config.write_text(
        f'[providers.tw]\ntype = "twilio"\naccount_sid = "{SID}"\nauth_token = "tok-SECRET"\n'
        '[[routes]]\ncountries = ["*"]\nproviders = ["tw"]\n'
    )
    with pytest.raises(ConfigurationError) as info:
        load_delivery(Settings(config=config))
    assert f"providers.tw.from in {config}" in str(info.value)
    assert "providers.tw.messaging_service_sid" in str(info.value)
    assert "tok-SECRET" not in str(info.value)

    config.write_text(
        f'[providers.tw]\ntype = "twilio"\naccount_sid = "{SID}"\nauth_token = "tok-SECRET"\n'
        f'from = "{NUMBER}"\n[[routes]]\ncountries = ["*"]\nproviders = ["tw"]\n'
    )
    delivery = load_delivery(Settings(config=config))
    (provider,) = delivery.providers
    assert provider.sender.name == "tw" and Channel.VOICE in provider.sender.channels
