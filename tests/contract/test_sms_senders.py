"""Contract suite of ``Sender`` (domain/ports.py), run against every sender, then the
LabsMobile adapter's own behaviour against the loopback LabsMobile stub.

Everything stays on 127.0.0.1: the stub serves LabsMobile's JSON API there, and the few answers
the stub cannot produce (an integer result code, a body that is not JSON, a redirect) come from
a bare ``aiohttp`` server started by the test itself, which also shows the raw request.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import RawTestServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from otpgate.adapters.providers import known_providers, register
from otpgate.adapters.providers.console import BANNER, ConsoleSender
from otpgate.adapters.providers.labsmobile import LabsMobileSender, subid_for
from otpgate.bootstrap import build, build_sender
from otpgate.domain.model import (
    Channel,
    MessageStatus,
    OutboundMessage,
    SendReceipt,
    SmsContent,
)
from otpgate.domain.ports import DeliveryReport, ReceiptParser, Sender
from otpgate.errors import (
    ConfigurationError,
    DeliveryError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.settings import Settings
from tests.contract.sender_contract import (
    CODE,
    MESSAGE_ID,
    TEXT,
    SenderCase,
    SenderContract,
    assert_no_secret,
    make_sms,
)
from tests.support.labsmobile_stub import LabsMobileStub, ThreadedServer

# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def stub_server() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as stub:
        yield stub


@pytest.fixture
def stub(stub_server: LabsMobileStub) -> Iterator[LabsMobileStub]:
    stub_server.reset()
    yield stub_server
    stub_server.reset()


@pytest.fixture
async def labsmobile(stub: LabsMobileStub) -> AsyncIterator[LabsMobileSender]:
    sender = LabsMobileSender(
        username=stub.username, token=stub.token, base_url=stub.url, timeout_seconds=5.0
    )
    yield sender
    await sender.aclose()


class _BrokenStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.broken = False

    def write(self, s: str) -> int:
        if self.broken:
            raise OSError("no space left on device")
        return super().write(s)


@pytest.fixture(params=["labsmobile", "console"])
async def case(request: pytest.FixtureRequest, stub: LabsMobileStub) -> AsyncIterator[SenderCase]:
    if request.param == "labsmobile":
        sender = LabsMobileSender(
            username=stub.username, token=stub.token, base_url=stub.url, timeout_seconds=5.0
        )
        yield SenderCase(
            sender=sender,
            secrets=(stub.token,),
            delivered_texts=lambda: [m.body["message"] for m in stub.messages],
            break_next_send=lambda: stub.fail_next(1, "30"),
            break_check=lambda: stub.http_status_next(1, 503),
        )
        await sender.aclose()
    else:
        stream = _BrokenStream()

        def delivered() -> list[str]:
            return [TEXT] * stream.getvalue().count(TEXT)

        def break_it() -> None:
            stream.broken = True

        console = ConsoleSender(stream=stream)
        yield SenderCase(
            sender=console, secrets=(), delivered_texts=delivered, break_next_send=break_it
        )
        await console.aclose()


class TestContract(SenderContract):
    """The shared contract, for LabsMobile (against its stub) and the console."""


# --------------------------------------------------------------------------------------------
# The registry: providers by name, each made from the settings by its own factory


def test_every_provider_module_is_registered_by_name() -> None:
    assert {"console", "labsmobile"} <= set(known_providers())
    assert isinstance(build_sender(Settings(sms_provider="console")), ConsoleSender)
    sender = build_sender(
        Settings(
            sms_provider="labsmobile",
            labsmobile_username="ops@example.com",
            labsmobile_token="tok-SECRET-42",
            labsmobile_url="http://127.0.0.1:9",
            provider_timeout_seconds=3,
        )
    )
    assert isinstance(sender, LabsMobileSender)
    assert "127.0.0.1:9" in repr(sender) and "tok-SECRET-42" not in repr(sender)


def test_an_unknown_provider_names_the_setting_and_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as info:
        build_sender(Settings(sms_provider="pigeon"))
    assert str(info.value) == (
        "OTPGATE_SMS_PROVIDER='pigeon' is not a provider; known providers: "
        + ", ".join(known_providers())
    )
    assert "console, kannel, labsmobile, smpp, smtp, twilio, vonage" in str(info.value)


@pytest.mark.parametrize(
    ("values", "named", "not_named"),
    [
        ({}, "OTPGATE_LABSMOBILE_USERNAME and OTPGATE_LABSMOBILE_TOKEN", None),
        ({"labsmobile_username": "ops@example.com"}, "needs OTPGATE_LABSMOBILE_TOKEN", "USERNAME"),
        ({"labsmobile_token": "tok-SECRET-42"}, "needs OTPGATE_LABSMOBILE_USERNAME", "TOKEN"),
        (
            {
                "labsmobile_username": "ops@example.com",
                "labsmobile_token": "tok-SECRET-42",
                "labsmobile_url": "ftp://api.labsmobile.com",
            },
            "OTPGATE_LABSMOBILE_URL",
            "ftp:",
        ),
    ],
)
def test_a_bad_provider_option_names_its_setting_never_a_secret(
    values: dict[str, str], named: str, not_named: str | None
) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_sender(Settings(sms_provider="labsmobile", **values))  # type: ignore[arg-type]
    shown = str(info.value)
    assert named in shown
    assert "tok-SECRET-42" not in shown and "ops@example.com" not in shown
    if not_named is not None:
        assert not_named not in shown


def test_console_is_refused_in_production() -> None:
    with pytest.raises(ConfigurationError, match="console only prints codes"):
        build_sender(Settings(sms_provider="console", env="production"))  # type: ignore[arg-type]


def test_a_name_is_registered_once_and_well_formed() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register("console")(lambda options, context: ConsoleSender())
    with pytest.raises(ValueError, match="must match"):
        register("Not A Name")
    assert {"console", "labsmobile"} <= set(known_providers())


def test_a_route_needs_distinct_provider_names() -> None:
    settings = Settings(secret_key="route-test-" + "k" * 40)  # type: ignore[arg-type]
    twins = [LabsMobileSender(username="u", token="t"), LabsMobileSender(username="v", token="t")]
    with pytest.raises(ConfigurationError, match="distinct names"):
        build(settings, route=twins)


# --------------------------------------------------------------------------------------------
# ConsoleSender specifics


async def test_console_banner_shows_the_message_for_development() -> None:
    stream = io.StringIO()
    sender = ConsoleSender(stream=stream)

    receipt = await sender.send(
        make_sms(encoding="UCS-2", segments=2, receipt_url="http://127.0.0.1/r?token=s3cr3t")
    )

    out = stream.getvalue()
    assert receipt == SendReceipt(provider_ref=MESSAGE_ID)
    assert BANNER in out
    assert "not delivered" in out
    assert "+34600000000" in out
    assert MESSAGE_ID in out
    assert "UCS-2" in out
    assert "2 segment" in out
    assert TEXT in out
    assert "s3cr3t" not in out  # the receipt URL carries the receipt secret


async def test_console_shows_a_message_of_another_channel_without_sms_details() -> None:
    stream = io.StringIO()
    voice = OutboundMessage(
        message_id=MESSAGE_ID, channel=Channel.VOICE, to="+34600000000", text=TEXT
    )

    await ConsoleSender(stream=stream).send(voice)

    out = stream.getvalue()
    assert "channel:    voice" in out
    assert TEXT in out
    assert "segment" not in out and "sender:" not in out


async def test_console_writes_to_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    await ConsoleSender().send(make_sms())

    assert TEXT in capsys.readouterr().out


async def test_console_never_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    await ConsoleSender(stream=io.StringIO()).send(make_sms())

    assert CODE not in caplog.text
    assert caplog.records == []


# --------------------------------------------------------------------------------------------
# LabsMobile: configuration and repr


@pytest.mark.parametrize(
    ("channel", "content"),
    [(Channel.SMS, None), (Channel.VOICE, SmsContent(None, "GSM-7", 1))],
)
def test_an_outbound_message_has_sms_content_exactly_when_it_is_sms(
    channel: Channel, content: SmsContent | None
) -> None:
    with pytest.raises(ValueError, match="SmsContent"):
        OutboundMessage(
            message_id=MESSAGE_ID, channel=channel, to="+34600000000", text=TEXT, sms=content
        )


def test_an_outbound_message_repr_hides_the_text() -> None:
    for message in (make_sms(), OutboundMessage(MESSAGE_ID, Channel.EMAIL, "a@example.com", TEXT)):
        assert TEXT not in repr(message) and CODE not in repr(message)
        assert MESSAGE_ID in repr(message)


def test_subid_is_the_first_20_characters_after_the_prefix() -> None:
    assert subid_for(MESSAGE_ID) == "0123456789abcdef0123"
    assert len(subid_for(MESSAGE_ID)) == 20
    assert subid_for("msg_abc") == "abc"
    with pytest.raises(ValueError, match="msg_"):
        subid_for("msg_")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"username": "", "token": "t"},
        {"username": "u", "token": ""},
        {"username": "u", "token": "t", "base_url": "api.labsmobile.com"},
        {"username": "u", "token": "t", "timeout_seconds": 0},
        {"username": "u", "token": "t", "name": "Labs Mobile"},
        {"username": "u", "token": "t", "name": ""},
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        LabsMobileSender(**kwargs)


async def test_repr_shows_the_account_but_never_the_token() -> None:
    async with LabsMobileSender(username="ops@example.com", token="tok-SECRET-42") as sender:
        shown = repr(sender)
    assert "ops@example.com" in shown
    assert "tok-SECRET-42" not in shown


async def test_own_client_is_closed_by_aclose_and_a_given_one_is_not(stub: LabsMobileStub) -> None:
    own = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    await own.aclose()
    with pytest.raises(TransientDeliveryError):  # a closed client cannot send any more
        await own.send(make_sms())

    async with aiohttp.ClientSession() as client:
        given = LabsMobileSender(
            username=stub.username, token=stub.token, base_url=stub.url, client=client
        )
        receipt = await given.send(make_sms())
        await given.aclose()
        assert not client.closed
        async with client.get(f"{stub.url}/json/balance") as still_usable:
            status = still_usable.status
    assert receipt.provider_ref == subid_for(MESSAGE_ID)
    assert status == 401  # answered: the client was left open


def test_it_implements_the_ports() -> None:
    sender: Sender = LabsMobileSender(username="u", token="t")
    parser: ReceiptParser = LabsMobileSender(username="u", token="t")
    assert sender.name == "labsmobile"
    assert sender.channels == {Channel.SMS}
    assert parser.parse_receipt({"subid": "x", "desc": "DELIVRD"}) is not None


def test_a_second_account_takes_a_name_of_its_own() -> None:
    backup = LabsMobileSender(username="u", token="t", name="labsmobile-b")
    assert backup.name == "labsmobile-b"
    assert "labsmobile-b" in repr(backup)
    assert LabsMobileSender(username="u", token="t").name == "labsmobile"


@pytest.mark.parametrize("channel", [Channel.VOICE, Channel.EMAIL])
async def test_labsmobile_refuses_other_channels_for_good(
    channel: Channel, stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    message = OutboundMessage(message_id=MESSAGE_ID, channel=channel, to="+34600000000", text=TEXT)

    with pytest.raises(PermanentDeliveryError, match="SMS only") as info:
        await labsmobile.send(message)

    assert_no_secret(info.value, stub.token)
    assert stub.arrivals == 0


# --------------------------------------------------------------------------------------------
# LabsMobile: the wire format


async def test_wire_format(stub: LabsMobileStub, labsmobile: LabsMobileSender) -> None:
    receipt_url = "http://127.0.0.1:9/receipts/labsmobile?token=rcpt-secret"
    receipt = await labsmobile.send(make_sms(receipt_url=receipt_url))

    (message,) = stub.wait_for_messages(1)
    expected_auth = base64.b64encode(f"{stub.username}:{stub.token}".encode()).decode()
    assert message.method == "POST"
    assert message.path == "/json/send"
    assert message.headers["authorization"] == f"Basic {expected_auth}"
    assert message.headers["content-type"].split(";")[0] == "application/json"
    assert message.body == {
        "recipient": [{"msisdn": "34600000000"}],
        "message": TEXT,
        "subid": "0123456789abcdef0123",
        "tpoa": "Acme",
        "ackurl": receipt_url,
    }
    assert receipt == SendReceipt(provider_ref="0123456789abcdef0123")
    assert message.subid == receipt.provider_ref  # what LabsMobile answered and will report


async def test_tpoa_and_ackurl_are_left_out_when_absent(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    await labsmobile.send(make_sms(sender_id=None, receipt_url=None))

    (message,) = stub.messages
    assert "tpoa" not in message.body
    assert "ackurl" not in message.body
    assert "ucs2" not in message.body
    assert "long" not in message.body


async def test_ucs2_flag_for_unicode_messages(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    await labsmobile.send(make_sms(text=f"Ваш код {CODE}", encoding="UCS-2"))

    (message,) = stub.messages  # accepted: the stub refuses non-GSM text without ucs2 (27)
    assert message.body["ucs2"] == "1"
    assert "long" not in message.body


async def test_long_flag_for_more_than_one_segment(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    await labsmobile.send(make_sms(text="x" * 200, segments=2))
    await labsmobile.send(make_sms(text="ü" + "я" * 100, encoding="UCS-2", segments=2))

    gsm, unicode = stub.messages
    assert gsm.body["long"] == "1"
    assert "ucs2" not in gsm.body
    assert unicode.body["long"] == "1"
    assert unicode.body["ucs2"] == "1"


async def test_non_gsm_text_without_ucs2_is_refused_for_good(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    # An upstream encoding bug: LabsMobile answers 27, which no retry can fix.
    with pytest.raises(PermanentDeliveryError, match="labsmobile code 27: "):
        await labsmobile.send(make_sms(text=f"Code {CODE} ✓", encoding="GSM-7"))

    assert stub.messages == []
    assert [r.code for r in stub.requests] == ["27"]


async def test_empty_message_is_refused_for_good(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    with pytest.raises(PermanentDeliveryError, match="labsmobile code 21: "):
        await labsmobile.send(make_sms(text=""))


# --------------------------------------------------------------------------------------------
# LabsMobile: answers and failures


@pytest.mark.parametrize("code", ["30", "35"])
async def test_transient_result_codes(
    code: str, stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    stub.fail_next(1, code)

    with pytest.raises(TransientDeliveryError) as info:
        await labsmobile.send(make_sms())

    assert str(info.value).startswith(f"labsmobile code {code}: ")
    assert_no_secret(info.value, stub.token)
    # the knob was used up: the retry goes through
    assert (await labsmobile.send(make_sms())).provider_ref == subid_for(MESSAGE_ID)


@pytest.mark.parametrize("code", ["10", "11", "20", "21", "23", "24", "27", "28", "39", "41", "99"])
async def test_permanent_result_codes(
    code: str, stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    stub.fail_next(1, code)

    with pytest.raises(PermanentDeliveryError) as info:
        await labsmobile.send(make_sms())

    assert not isinstance(info.value, TransientDeliveryError)
    assert str(info.value).startswith(f"labsmobile code {code}: ")
    assert_no_secret(info.value, stub.token)


async def test_wrong_credentials_are_transient(stub: LabsMobileStub) -> None:
    async with LabsMobileSender(
        username=stub.username, token="not-the-token", base_url=stub.url
    ) as sender:
        with pytest.raises(
            TransientDeliveryError, match=r"credentials refused \(HTTP 401\)"
        ) as info:
            await sender.send(make_sms())

    assert_no_secret(info.value, "not-the-token", stub.token)
    assert stub.requests[-1].http_status == 401
    assert stub.messages == []


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, PermanentDeliveryError),
        (401, TransientDeliveryError),
        (403, TransientDeliveryError),
        (404, TransientDeliveryError),
        (429, TransientDeliveryError),
        (500, TransientDeliveryError),
        (502, TransientDeliveryError),
        (503, TransientDeliveryError),
    ],
)
async def test_http_statuses(
    status: int,
    error: type[DeliveryError],
    stub: LabsMobileStub,
    labsmobile: LabsMobileSender,
) -> None:
    stub.http_status_next(1, status)

    with pytest.raises(DeliveryError) as info:
        await labsmobile.send(make_sms())

    assert type(info.value) is error
    assert f"HTTP {status}" in str(info.value)
    assert_no_secret(info.value, stub.token)


async def test_a_timeout_is_transient(stub: LabsMobileStub) -> None:
    stub.delay_seconds = 2.0
    async with LabsMobileSender(
        username=stub.username, token=stub.token, base_url=stub.url, timeout_seconds=0.2
    ) as sender:
        with pytest.raises(DeliveryTimeout, match="timeout") as info:
            await sender.send(make_sms())

    assert isinstance(info.value, TransientDeliveryError)  # retried, but as an unknown outcome
    assert isinstance(info.value.__cause__, TimeoutError)
    assert_no_secret(info.value, stub.token)
    assert stub.arrivals == 1  # the request went out: LabsMobile may have sent it


async def test_the_timeout_also_applies_to_a_given_client(stub: LabsMobileStub) -> None:
    stub.delay_seconds = 2.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30.0)) as client:
        sender = LabsMobileSender(
            username=stub.username,
            token=stub.token,
            base_url=stub.url,
            timeout_seconds=0.2,
            client=client,
        )
        with pytest.raises(DeliveryTimeout, match="timeout"):
            await sender.send(make_sms())


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A 127.0.0.1 port that refuses connections: bound, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_connection_refused_is_transient(refused_url: str) -> None:
    async with LabsMobileSender(username="u", token="tok-xyz", base_url=refused_url) as sender:
        with pytest.raises(TransientDeliveryError, match="transport error") as info:
            await sender.send(make_sms())

    assert isinstance(info.value.__cause__, aiohttp.ClientConnectionError)
    assert not isinstance(info.value, DeliveryTimeout)  # nothing went out: not an unknown outcome
    assert_no_secret(info.value, "tok-xyz")


@pytest.fixture
def unaccepting_url() -> Iterator[str]:
    """A 127.0.0.1 port whose backlog is full: a new connection is never established."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            for filler in fillers:
                filler.close()


async def test_a_connection_never_made_is_transient_not_unknown(unaccepting_url: str) -> None:
    async with LabsMobileSender(
        username="u", token="tok-xyz", base_url=unaccepting_url, timeout_seconds=0.4
    ) as sender:
        with pytest.raises(TransientDeliveryError, match="no connection") as info:
            await sender.send(make_sms())

    assert not isinstance(info.value, DeliveryTimeout)
    assert isinstance(info.value.__cause__, aiohttp.ConnectionTimeoutError)


async def test_a_connection_dropped_before_the_answer_is_an_unknown_outcome() -> None:
    """The provider reads the whole request and closes the connection without answering."""
    received: list[bytes] = []

    async def read_and_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
        received.append(await reader.readexactly(length))
        writer.close()

    server = await asyncio.start_server(read_and_hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with (
        server,
        LabsMobileSender(
            username="u", token="tok-xyz", base_url=f"http://127.0.0.1:{port}"
        ) as sender,
    ):
        with pytest.raises(DeliveryTimeout, match="connection lost") as info:
            await sender.send(make_sms())

    assert len(received) == 1 and json.loads(received[0])["message"] == TEXT
    assert_no_secret(info.value, "tok-xyz")


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def _answering(
    handler: Handler, *, auth: tuple[str, str] = ("u", "t")
) -> AsyncIterator[LabsMobileSender]:
    """A sender whose requests reach ``handler`` on a bare loopback aiohttp server."""
    async with RawTestServer(handler, host="127.0.0.1") as server:
        base_url = str(server.make_url("/"))
        async with LabsMobileSender(username=auth[0], token=auth[1], base_url=base_url) as sender:
            yield sender


def _always(response: Callable[[], web.StreamResponse]) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return response()

    return handler


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        ({"code": 0, "message": "ok"}, None),
        ({"code": "0"}, None),
        ({"code": 35, "message": "no credit"}, TransientDeliveryError),
        ({"code": "21", "message": "empty"}, PermanentDeliveryError),
        ({"message": "no code"}, TransientDeliveryError),
        ({"code": True}, TransientDeliveryError),
        (["not", "an", "object"], TransientDeliveryError),
    ],
)
async def test_result_code_spellings(answer: Any, outcome: type[DeliveryError] | None) -> None:
    async with _answering(_always(lambda: web.json_response(answer))) as sender:
        if outcome is None:
            assert await sender.send(make_sms()) == SendReceipt(provider_ref=subid_for(MESSAGE_ID))
        else:
            with pytest.raises(outcome):
                await sender.send(make_sms())


async def test_a_body_that_is_not_json_is_transient() -> None:
    page = _always(lambda: web.Response(text="<html>oops</html>", content_type="text/html"))
    async with _answering(page) as sender:
        with pytest.raises(TransientDeliveryError, match="unreadable"):
            await sender.send(make_sms())


@pytest.mark.parametrize("echoed", [TEXT, f"near {CODE}", f"in '{CODE}.'"])
async def test_an_echoed_text_or_code_is_scrubbed_from_the_error(echoed: str) -> None:
    echo = _always(lambda: web.json_response({"code": "27", "message": f"Invalid: {echoed}"}))
    async with _answering(echo) as sender:
        with pytest.raises(PermanentDeliveryError, match="labsmobile code 27: Invalid") as info:
            await sender.send(make_sms())
    assert_no_secret(info.value)


async def test_http_400_carries_the_result_code_when_there_is_one() -> None:
    refusal = _always(
        lambda: web.json_response({"code": "11", "message": "Badly formed"}, status=400)
    )
    async with _answering(refusal) as sender:
        with pytest.raises(PermanentDeliveryError, match=r"labsmobile code 11: Badly formed"):
            await sender.send(make_sms())


async def test_429_passes_retry_after_on() -> None:
    throttled = _always(lambda: web.Response(status=429, headers={"Retry-After": "7"}))
    async with _answering(throttled) as sender:
        with pytest.raises(TransientDeliveryError) as info:
            await sender.send(make_sms())
    assert info.value.retry_after == 7


async def test_a_redirect_is_not_followed() -> None:
    requests: list[str] = []

    async def moved(request: web.BaseRequest) -> web.StreamResponse:
        requests.append(request.path)
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    async with _answering(moved) as sender:
        with pytest.raises(TransientDeliveryError, match=r"unexpected answer \(HTTP 302\)"):
            await sender.send(make_sms())
    assert requests == ["/json/send"]


async def test_the_request_on_the_wire() -> None:
    """Basic credentials in UTF-8, a compact UTF-8 JSON body (as httpx's ``json=`` wrote it),
    and no Content-Type on the body-less balance request."""
    seen: list[tuple[str, str, dict[str, str], bytes]] = []

    async def record(request: web.BaseRequest) -> web.StreamResponse:
        seen.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.json_response({"code": "0", "credits": "1"})

    async with _answering(record, auth=("ñu@example.com", "tök")) as sender:
        await sender.send(make_sms(text="Código 845201 €"))
        await sender.balance()

    (post, get) = seen
    method, path, headers, body = post
    assert (method, path) == ("POST", "/json/send")
    assert headers["Content-Type"] == "application/json"
    assert headers["Authorization"] == "Basic " + base64.b64encode(
        "ñu@example.com:tök".encode()
    ).decode("ascii")
    assert body == json.dumps(
        {
            "recipient": [{"msisdn": "34600000000"}],
            "message": "Código 845201 €",
            "subid": subid_for(MESSAGE_ID),
            "tpoa": "Acme",
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    method, path, headers, body = get
    assert (method, path, body) == ("GET", "/json/balance", b"")
    assert "Content-Type" not in headers
    assert headers["Authorization"] == post[2]["Authorization"]


# --------------------------------------------------------------------------------------------
# LabsMobile: delivery reports


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"desc": "DELIVRD", "acklevel": "handset"}, MessageStatus.DELIVERED),
        ({"desc": "READ", "acklevel": "handset"}, MessageStatus.DELIVERED),
        ({"desc": "delivrd"}, MessageStatus.DELIVERED),
        ({"desc": "UNDELIV", "acklevel": "error"}, MessageStatus.UNDELIVERED),
        ({"desc": "REJECTD", "acklevel": "error"}, MessageStatus.UNDELIVERED),
        ({"desc": "EXPIRED", "acklevel": "error"}, MessageStatus.UNDELIVERED),
        ({"desc": "BLOCKED", "acklevel": "operator"}, MessageStatus.UNDELIVERED),
        ({"desc": "UNKNOWN", "acklevel": "operator"}, None),
        ({"desc": "UNKNOWN", "acklevel": "error"}, None),
        ({"desc": "SOMETHING_NEW"}, None),
        ({"acklevel": "error"}, MessageStatus.UNDELIVERED),
        ({"acklevel": "ERROR", "desc": ""}, MessageStatus.UNDELIVERED),
        ({"acklevel": "operator"}, None),
        ({}, None),
    ],
)
def test_parse_receipt_mapping(params: dict[str, str], status: MessageStatus | None) -> None:
    sender = LabsMobileSender(username="u", token="t")
    report = sender.parse_receipt(
        {"subid": "0123456789abcdef0123", "msisdn": "34600000000", **params}
    )

    assert report is not None
    assert report.provider_ref == "0123456789abcdef0123"
    assert report.status is status
    assert report.detail == (params["desc"].upper() if params.get("desc") else None)


@pytest.mark.parametrize("params", [{"desc": "DELIVRD"}, {"subid": "", "desc": "DELIVRD"}])
def test_parse_receipt_without_subid_is_none(params: dict[str, str]) -> None:
    assert LabsMobileSender(username="u", token="t").parse_receipt(params) is None


async def test_a_report_from_the_stub_parses_to_delivered(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    received: list[dict[str, str]] = []

    async def receipts(request: Request) -> PlainTextResponse:
        received.append(dict(request.query_params))
        return PlainTextResponse("OK")

    app = Starlette(routes=[Route("/receipts/labsmobile", receipts)])
    with ThreadedServer(app, name="receipt-receiver") as receiver:
        ackurl = f"{receiver.url}/receipts/labsmobile?token=rcpt-secret"
        receipt = await labsmobile.send(make_sms(receipt_url=ackurl))
        assert receipt.provider_ref is not None
        answer = await stub.deliver_report_async(receipt.provider_ref, "DELIVRD")

    assert answer.status_code == 200
    (params,) = received
    assert params["token"] == "rcpt-secret"  # the ackurl's own query is kept
    assert {"acklevel", "status", "desc", "subid", "msisdn", "timestamp"} <= params.keys()
    assert params["msisdn"] == "34600000000"
    assert labsmobile.parse_receipt(params) == DeliveryReport(
        provider_ref=receipt.provider_ref, status=MessageStatus.DELIVERED, detail="DELIVRD"
    )


# --------------------------------------------------------------------------------------------
# LabsMobile: balance


async def test_balance(stub: LabsMobileStub, labsmobile: LabsMobileSender) -> None:
    assert await labsmobile.balance() == "123.45"
    stub.credits = "7.5"
    assert await labsmobile.balance() == "7.5"


async def test_balance_with_wrong_credentials(stub: LabsMobileStub) -> None:
    async with LabsMobileSender(username=stub.username, token="nope", base_url=stub.url) as s:
        with pytest.raises(TransientDeliveryError, match="HTTP 401"):
            await s.balance()


# --------------------------------------------------------------------------------------------
# The stub itself keeps to the documented API (it stands in for LabsMobile in other suites)


@pytest.mark.parametrize(
    ("content", "headers", "http_status", "code"),
    [
        (b"", {"content-type": "application/json"}, 400, "10"),
        (b'{"message": "hi"', {"content-type": "application/json"}, 400, "11"),
        (b'{"message": "hi"}', {"content-type": "text/plain"}, 400, "10"),
        (b'{"recipient": [{"msisdn": "34600000000"}]}', {}, 200, "20"),
        (b'{"message": "", "recipient": [{"msisdn": "34600000000"}]}', {}, 200, "21"),
        (b'{"message": "hi", "recipient": []}', {}, 200, "23"),
        (
            b'{"message": "hi", "recipient": [{"msisdn": "34600000000"}],'
            b' "subid": "123456789012345678901"}',
            {},
            200,
            "28",
        ),
        (
            b'{"message": "hi", "recipient": [{"msisdn": "34600000000"}], "scheduled": "tomorrow"}',
            {},
            200,
            "39",
        ),
        (
            b'{"message": "hi", "recipient": [{"msisdn": "34600000000"}],'
            b' "scheduled": "2030-01-01 10:00:00", "test": "1"}',
            {},
            200,
            "41",
        ),
    ],
)
def test_stub_validates_like_labsmobile(
    stub: LabsMobileStub, content: bytes, headers: dict[str, str], http_status: int, code: str
) -> None:
    answer = httpx.post(
        f"{stub.url}/json/send",
        content=content,
        headers={"content-type": "application/json", **headers},
        auth=(stub.username, stub.token),
    )

    assert answer.status_code == http_status
    assert answer.json()["code"] == code
    assert stub.messages == []


def test_stub_answers_and_records_a_valid_send(stub: LabsMobileStub) -> None:
    body = {"message": "hi €", "recipient": [{"msisdn": "34600000000"}], "subid": "abc"}
    answer = httpx.post(f"{stub.url}/json/send", json=body, auth=(stub.username, stub.token))

    assert answer.status_code == 200
    assert answer.json() == {
        "code": "0",
        "message": "Message has been successfully sent",
        "subid": "abc",
    }
    (message,) = stub.wait_for_messages(1, timeout=1.0)
    assert message.body == body
    assert message.msisdns == ["34600000000"]


def test_stub_refuses_bad_credentials(stub: LabsMobileStub) -> None:
    for auth in [(stub.username, "wrong"), ("someone@example.com", stub.token)]:
        answer = httpx.get(f"{stub.url}/json/balance", auth=auth)
        assert answer.status_code == 401
    assert httpx.get(f"{stub.url}/json/balance").status_code == 401


def test_stub_balance_and_prices(stub: LabsMobileStub) -> None:
    auth = (stub.username, stub.token)
    balance = httpx.get(f"{stub.url}/json/balance", auth=auth).json()
    assert balance == {"code": 0, "credits": "123.45"}

    prices = httpx.post(
        f"{stub.url}/json/prices", json={"format": "JSON", "countries": ["ES", "CO"]}, auth=auth
    ).json()
    assert set(prices) == {"ES", "CO"}
    assert prices["ES"] == {"isocode": "ES", "prefix": "34", "name": "Spain", "credits": 0.07}
    every = httpx.post(f"{stub.url}/json/prices", json={"format": "JSON"}, auth=auth).json()
    assert {"ES", "CO"} < set(every)


def test_stub_wait_for_messages_times_out(stub: LabsMobileStub) -> None:
    with pytest.raises(TimeoutError, match="0 of 1"):
        stub.wait_for_messages(1, timeout=0.05)


async def test_stub_wait_for_messages_async_while_sending(
    stub: LabsMobileStub, labsmobile: LabsMobileSender
) -> None:
    waiter = asyncio.create_task(stub.wait_for_messages_async(2, timeout_seconds=5.0))
    await labsmobile.send(make_sms())
    await labsmobile.send(make_sms(message_id="msg_" + "f" * 32))

    messages = await waiter
    assert [m.subid for m in messages] == ["0123456789abcdef0123", "f" * 20]


def test_stub_reports_only_to_loopback_and_never_in_test_mode(stub: LabsMobileStub) -> None:
    auth = (stub.username, stub.token)
    for subid, extra, refusal in [
        ("remote", {"ackurl": "https://example.com/ack"}, "loopback"),
        ("testmode", {"ackurl": "http://127.0.0.1:9/ack", "test": "1"}, "test mode"),
        ("noack", {}, "without an ackurl"),
    ]:
        body = {"message": "hi", "recipient": [{"msisdn": "34600000000"}], "subid": subid}
        httpx.post(f"{stub.url}/json/send", json={**body, **extra}, auth=auth)
        with pytest.raises(ValueError, match=refusal):
            stub.deliver_report(subid)
    with pytest.raises(KeyError):
        stub.deliver_report("never-sent")
