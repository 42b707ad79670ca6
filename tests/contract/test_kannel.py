"""The sender contract and the Kannel adapter's own behaviour, against real Kannel 1.4.5 from
Debian (bearerbox, smsbox and fakesmsc) running in a network namespace of its own.

The sender's connections are made inside that namespace (see ``tests/support/kannel.py``), so
smsbox is reached on its own loopback and "smsbox down" is a real refused connection. Kannel's
delivery reports go to a small HTTP receiver listening on the namespace's loopback too.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from otpgate.adapters.providers.kannel import (
    DEFAULT_DLR_MASK,
    KannelSender,
    reference_for,
)
from otpgate.adapters.providers.registry import create_sender
from otpgate.domain.model import Channel, MessageStatus, OutboundMessage
from otpgate.domain.ports import DeliveryReport, ReceiptParser
from otpgate.errors import (
    ConfigurationError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.settings import Settings
from tests.contract.sender_contract import (
    MESSAGE_ID,
    OTHER_ID,
    TEXT,
    SenderCase,
    SenderContract,
    assert_no_secret,
    make_sms,
)
from tests.support.kannel import PASSWORD, UNAVAILABLE, Kannel, running_kannel

RECEIPT_PORT = 8765
TOKEN = "rcpt-token-Zq81_xY"
RECEIPT_URL = f"http://127.0.0.1:{RECEIPT_PORT}/v1/receipts/kannel?token={TOKEN}"


# --------------------------------------------------------------------------------------------
# Fixtures


class Receipts:
    """What Kannel sent to the receipt URL: each request's path and query parameters."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def add(self, target: str) -> None:
        parts = urllib.parse.urlsplit(target)
        with self._lock:
            self.requests.append((parts.path, dict(urllib.parse.parse_qsl(parts.query))))

    def wait_for(self, ref: str, kind: str, timeout: float = 10) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                for _, params in self.requests:
                    if params.get("ref") == ref and params.get("type") == kind:
                        return params
            assert time.monotonic() < deadline, f"no report of type {kind} for {ref}"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def kannel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kannel]:
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    with running_kannel(tmp_path_factory.mktemp("kannel")) as running:
        yield running


@pytest.fixture(scope="module")
def receipts(kannel: Kannel) -> Iterator[Receipts]:
    """An HTTP server on the namespace's 127.0.0.1:RECEIPT_PORT, recording each request."""
    seen = Receipts()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.add(self.path)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = kannel.ns.listen(RECEIPT_PORT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield seen
    server.shutdown()
    server.server_close()


@pytest.fixture
async def sender(kannel: Kannel) -> AsyncIterator[KannelSender]:
    kannel.mark_seen()
    session = kannel.ns.session()
    sender = KannelSender(url=kannel.url(), client=session, timeout_seconds=5)
    try:
        yield sender
    finally:
        await sender.aclose()
        await session.close()  # the sender does not close a session it was given
        if not kannel.smsbox_running():
            kannel.start_smsbox()
        if not kannel.smsc_running():
            kannel.start_smsc()


def settled_texts(kannel: Kannel) -> list[str]:
    """The texts fakesmsc received since the test began, once nothing new came for 0.3 s
    (Kannel answers sendsms when bearerbox has the message, before the SMSC has it)."""
    deadline = time.monotonic() + 10
    count = -1
    while True:
        found = kannel.received()[kannel.seen :]
        if len(found) == count or time.monotonic() > deadline:
            return [m.text for m in found]
        count = len(found)
        time.sleep(0.3)


@pytest.fixture
async def case(kannel: Kannel, receipts: Receipts, sender: KannelSender) -> SenderCase:
    return SenderCase(
        sender=sender,
        secrets=(PASSWORD, TOKEN),
        delivered_texts=lambda: settled_texts(kannel),
        break_next_send=kannel.stop_smsbox,
        message=lambda message_id: make_sms(message_id=message_id, receipt_url=RECEIPT_URL),
        break_check=kannel.stop_smsbox,
    )


class TestContract(SenderContract):
    pass


# --------------------------------------------------------------------------------------------
# What arrives at the SMSC


async def test_a_gsm7_text_arrives_as_7_bit_text_with_sender_and_destination(
    kannel: Kannel, sender: KannelSender
) -> None:
    # Every character is in GSM-7 (the basic table or, for € [ ] { }, its extension).
    text = "Tu codigo es 845201. ¿Ñandù? Über à è é ù ø Å ß Ç €[]{}"
    await sender.send(make_sms(text=text, to="+34600000001", sender_id="Acme"))

    (arrived,) = kannel.new_messages(1)
    assert (arrived.sender, arrived.receiver, arrived.kind) == ("Acme", "+34600000001", "text")
    assert arrived.text == text


@pytest.mark.parametrize(
    "text",
    ["Ο κωδικός σας είναι 845201", "Ваш код: 845201. Никому его не сообщайте."],
    ids=["greek", "russian"],
)
async def test_a_ucs2_text_arrives_as_ucs2(kannel: Kannel, sender: KannelSender, text: str) -> None:
    await sender.send(make_sms(text=text, encoding="UCS-2", to="+306900000000"))

    (arrived,) = kannel.new_messages(1)
    assert (arrived.kind, arrived.receiver) == ("ucs-2", "+306900000000")
    assert arrived.text == text


async def test_without_a_sender_id_kannel_needs_its_global_sender(
    kannel: Kannel, sender: KannelSender
) -> None:
    """No global-sender in the test configuration: the route is misconfigured (transient,
    fail over), not the message."""
    with pytest.raises(TransientDeliveryError) as info:
        await sender.send(make_sms(sender_id=None))

    assert not isinstance(info.value, DeliveryTimeout)
    assert "global-sender" in str(info.value)
    assert settled_texts(kannel) == []


# --------------------------------------------------------------------------------------------
# Delivery reports


async def test_the_dlr_url_carries_the_token_and_the_report_makes_the_message_delivered(
    kannel: Kannel, receipts: Receipts, sender: KannelSender
) -> None:
    message_id = "msg_" + "7" * 32  # no other test's reports carry its reference
    receipt = await sender.send(make_sms(message_id=message_id, receipt_url=RECEIPT_URL))
    assert receipt.provider_ref == reference_for(message_id)

    params = receipts.wait_for(receipt.provider_ref, "1")
    assert params.pop("token") == TOKEN
    assert isinstance(sender, ReceiptParser)
    assert sender.parse_receipt(params) == DeliveryReport(
        receipt.provider_ref, MessageStatus.DELIVERED, "kannel report 1: delivered to the phone"
    )
    # The default mask asks for the reports that change a message: no SMSC acknowledgement.
    assert DEFAULT_DLR_MASK == 19
    assert [p["type"] for path, p in receipts.requests if p.get("ref") == receipt.provider_ref] == [
        "1"
    ]
    assert {path for path, _ in receipts.requests} == {"/v1/receipts/kannel"}


async def test_with_mask_31_the_smsc_acknowledgement_comes_too_and_changes_nothing(
    kannel: Kannel, receipts: Receipts
) -> None:
    async with kannel.ns.session() as session:
        sender = KannelSender(url=kannel.url(), client=session, dlr_mask=31)
        receipt = await sender.send(make_sms(message_id=OTHER_ID, receipt_url=RECEIPT_URL))
        assert receipt.provider_ref is not None
        ack = receipts.wait_for(receipt.provider_ref, "8")
        receipts.wait_for(receipt.provider_ref, "1")
    report = sender.parse_receipt({k: v for k, v in ack.items() if k != "token"})
    assert report == DeliveryReport(
        receipt.provider_ref, None, "kannel report 8: accepted by the SMSC"
    )


async def test_a_percent_in_the_receipt_url_reaches_otpgate_unchanged(
    kannel: Kannel, receipts: Receipts, sender: KannelSender
) -> None:
    """Kannel reads ``%`` as an escape (``%A`` is the report text): ours are doubled."""
    url = f"http://127.0.0.1:{RECEIPT_PORT}/v1/receipts/kannel?token=a%41b%25c"
    message_id = "msg_" + "5" * 32
    receipt = await sender.send(make_sms(message_id=message_id, receipt_url=url))

    assert receipt.provider_ref is not None
    params = receipts.wait_for(receipt.provider_ref, "1")
    assert params["token"] == "aAb%c"


async def test_when_the_smsc_is_down_kannel_keeps_the_message_and_reports_it_later(
    kannel: Kannel, receipts: Receipts, sender: KannelSender
) -> None:
    kannel.stop_smsc()
    message_id = "msg_" + "6" * 32
    receipt = await sender.send(make_sms(message_id=message_id, receipt_url=RECEIPT_URL))
    assert settled_texts(kannel) == []

    kannel.start_smsc()
    (arrived,) = kannel.new_messages(1)
    assert arrived.text == TEXT
    assert receipt.provider_ref is not None
    receipts.wait_for(receipt.provider_ref, "1")


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("1", MessageStatus.DELIVERED),
        ("2", MessageStatus.UNDELIVERED),
        ("16", MessageStatus.UNDELIVERED),
        ("4", None),
        ("8", None),
        ("32", None),
        ("", None),
        ("x", None),
    ],
)
def test_report_types_map_to_message_statuses(kind: str, status: MessageStatus | None) -> None:
    sender = KannelSender(url="http://127.0.0.1:9/cgi-bin/sendsms?username=u&password=p")
    ref = reference_for(MESSAGE_ID)

    report = sender.parse_receipt({"ref": ref, "type": kind})

    assert report is not None
    assert (report.provider_ref, report.status) == (ref, status)


@pytest.mark.parametrize("ref", [None, "", "a b", "x" * 65, "../etc", "0123%00"])
def test_a_report_without_one_of_our_references_names_no_message(ref: str | None) -> None:
    sender = KannelSender(url="http://127.0.0.1:9/cgi-bin/sendsms?username=u&password=p")
    params = {"type": "1"} if ref is None else {"ref": ref, "type": "1"}

    assert sender.parse_receipt(params) is None


# --------------------------------------------------------------------------------------------
# Failures


async def test_a_wrong_password_is_a_transient_error_without_the_password(
    kannel: Kannel,
) -> None:
    wrong = "Wrong-pw-4471"
    url = kannel.url().replace(urllib.parse.quote_plus(PASSWORD), wrong)
    assert wrong in url
    async with kannel.ns.session() as session:
        sender = KannelSender(url=url, client=session)
        with pytest.raises(TransientDeliveryError) as sent:
            await sender.send(make_sms(receipt_url=RECEIPT_URL))
        with pytest.raises(TransientDeliveryError) as checked:
            await sender.check()

    for error in (sent.value, checked.value):
        assert not isinstance(error, DeliveryTimeout)
        assert "credentials" in str(error)
        assert_no_secret(error, wrong, PASSWORD, TOKEN)
    assert settled_texts(kannel) == []


async def test_smsbox_down_is_transient_and_certainly_not_sent(
    kannel: Kannel, sender: KannelSender
) -> None:
    kannel.stop_smsbox()

    with pytest.raises(TransientDeliveryError) as info:
        await sender.send(make_sms(receipt_url=RECEIPT_URL))

    assert not isinstance(info.value, DeliveryTimeout)
    assert "cannot connect" in str(info.value)
    assert_no_secret(info.value, PASSWORD, TOKEN)


async def test_an_smsc_id_kannel_does_not_have_is_permanent(
    kannel: Kannel,
) -> None:
    """The fake SMSC, Kannel's only one, is configured with ``denied-smsc-id = nowhere``."""
    async with kannel.ns.session() as session:
        sender = KannelSender(url=kannel.url(), client=session, smsc="nowhere")
        with pytest.raises(PermanentDeliveryError) as info:
            await sender.send(make_sms())

    assert "Not routable" in str(info.value)
    assert settled_texts(kannel) == []


async def test_no_answer_in_time_is_a_delivery_timeout(kannel: Kannel) -> None:
    """A server that takes the connection and never answers (a stuck smsbox)."""
    silent = kannel.ns.listen(13999)
    try:
        async with kannel.ns.session() as session:
            url = "http://127.0.0.1:13999/cgi-bin/sendsms?username=u&password=p"
            sender = KannelSender(url=url, client=session, timeout_seconds=0.5)
            with pytest.raises(DeliveryTimeout) as info:
                await sender.send(make_sms(receipt_url=RECEIPT_URL))
    finally:
        silent.close()

    assert_no_secret(info.value, TOKEN)


async def test_the_check_proves_credentials_and_queues_nothing(
    kannel: Kannel, sender: KannelSender
) -> None:
    await sender.check()
    await sender.check()

    assert settled_texts(kannel) == []
    assert "Missing receiver number" in kannel.log("smsbox")


async def test_an_email_message_is_refused_permanently(sender: KannelSender) -> None:
    sms = make_sms()
    email = OutboundMessage(message_id=MESSAGE_ID, channel=Channel.EMAIL, to="a@b.c", text=sms.text)
    with pytest.raises(PermanentDeliveryError):
        await sender.send(email)


# --------------------------------------------------------------------------------------------
# Configuration


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, env="test", sms_provider="kannel", **values)  # type: ignore[call-arg, arg-type]


def test_the_environment_form_builds_the_sender() -> None:
    sender = create_sender(
        "kannel",
        _settings(
            kannel_url="http://127.0.0.1:13013/cgi-bin/sendsms?username=u&password=Secret-9",
            kannel_smsc="fake",
            kannel_dlr_mask=31,
        ),
    )
    assert isinstance(sender, KannelSender)
    assert sender.name == "kannel"
    assert "Secret-9" not in repr(sender) and "Secret-9" not in str(sender)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "needs OTPGATE_KANNEL_URL"),
        ("ftp://h/cgi-bin/sendsms?username=u&password=Secret-9", "http:// or https://"),
        ("http://h/cgi-bin/sendsms?username=u", "username and password"),
        ("http://h/cgi-bin/sendsms?password=Secret-9", "username and password"),
        ("http://u:Secret-9@h/cgi-bin/sendsms", "in its query"),
        ("http://h/cgi-bin/sendsms?username=u&password=Secret-9&to=1", "must not set to"),
        ("http://h:99999/x?username=u&password=Secret-9", "not a valid URL"),
    ],
)
def test_a_bad_url_is_named_without_its_value(url: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        create_sender("kannel", _settings(kannel_url=url))

    assert problem in str(info.value)
    assert "OTPGATE_KANNEL_URL" in str(info.value)
    assert "Secret-9" not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "setting"),
    [
        ("kannel_dlr_mask", 32, "OTPGATE_KANNEL_DLR_MASK"),
        ("kannel_smsc", "a b", "OTPGATE_KANNEL_SMSC"),
    ],
)
def test_bad_options_are_named(field: str, value: object, setting: str) -> None:
    url = "http://h/cgi-bin/sendsms?username=u&password=Secret-9"
    with pytest.raises(ConfigurationError) as info:
        create_sender("kannel", _settings(kannel_url=url, **{field: value}))

    assert setting in str(info.value)
    assert "Secret-9" not in str(info.value)


def test_reference_for_refuses_an_id_that_cannot_travel_in_a_url() -> None:
    with pytest.raises(ValueError, match="letters, digits"):
        reference_for("msg_a b")
