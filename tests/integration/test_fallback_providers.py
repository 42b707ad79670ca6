"""Channel fallback across real provider counterparts, configured by an ``OTPGATE_CONFIG`` file:
an SMS that LabsMobile refuses for good becomes a call through Twilio (its loopback stub reads
the TwiML), and when no check arrives in time, an e-mail through a real SMTP server (aiosmtpd
on loopback) — the same code on every channel, which then approves the verification.

Time is the frozen clock; the test drives delivery."""

from __future__ import annotations

import contextlib
import email
import email.policy
import re
import socket
from collections.abc import AsyncIterator, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from otpgate.bootstrap import build
from otpgate.entrypoints.api.app import create_app
from tests.conftest import Api, Database, FrozenClock, make_settings
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.twilio_stub import TwilioStub

CALLER = "+15005550006"


class Mailbox:
    """An aiosmtpd handler that keeps every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = (envelope.original_content or b"").replace(b"\r\n", b"\n")
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(parsed)
        self.recipients.append(list(envelope.rcpt_tos))
        return "250 2.0.0 Ok: queued"


@pytest.fixture(scope="module")
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    handler = Mailbox()
    with socket.socket() as probe:  # a free loopback port (the controller's own check needs one)
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def labsmobile() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as stub:
        yield stub


@pytest.fixture(scope="module")
def twilio() -> Iterator[TwilioStub]:
    with TwilioStub(numbers=(CALLER,)) as stub:
        yield stub


def config_file(
    tmp_path: Path, labsmobile: LabsMobileStub, twilio: TwilioStub, smtp_port: int
) -> Path:
    path = tmp_path / "delivery.toml"
    path.write_text(
        f"""
[providers.sms]
type = "labsmobile"
username = "{labsmobile.username}"
token = "{labsmobile.token}"
url = "{labsmobile.url}"

[providers.calls]
type = "twilio"
account_sid = "{twilio.account_sid}"
auth_token = "{twilio.auth_token}"
from = "{CALLER}"
url = "{twilio.url}"

[providers.mail]
type = "smtp"
url = "smtp://127.0.0.1:{smtp_port}"
from = "Acme <codes@acme.example>"

[[routes]]
countries = ["*"]
providers = ["sms", "calls"]
""",
        encoding="utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def app_for(database: Database, tmp_path: Path, config: Path) -> AsyncIterator[Api]:
    clock = FrozenClock()
    container = build(make_settings(database, tmp_path, config=config), clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service(
                channels=["sms", "voice", "email"], fallback_after_seconds=60
            )
            yield api


def plain_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    text: Any = part.get_content()
    assert isinstance(text, str)
    return text


async def test_a_refused_sms_becomes_a_call_then_an_email_with_the_same_code(
    database: Database,
    tmp_path: Path,
    labsmobile: LabsMobileStub,
    twilio: TwilioStub,
    mailbox: tuple[Mailbox, int],
) -> None:
    inbox, port = mailbox
    labsmobile.reset()
    twilio.reset()
    inbox.messages.clear()
    inbox.recipients.clear()
    config = config_file(tmp_path, labsmobile, twilio, port)
    async with app_for(database, tmp_path, config) as api:
        labsmobile.fail_next(1, "27")  # LabsMobile: invalid characters, a permanent refusal
        started = await api.start("+34600000001", locale="es", email="ana@example.com")
        assert started.status_code == 201, started.text
        vid = started.json()["id"]
        await api.deliver()

        # The SMS was refused for good; the code went out as a call, read twice in Spanish.
        assert len(labsmobile.requests) == 1 and labsmobile.messages == []
        (call,) = twilio.calls
        assert call.form["To"] == "+34600000001" and call.form["From"] == CALLER
        ((said, language),) = call.said
        assert language == "es-ES"
        spelled = re.findall(r"((?:\d, )+\d)\.", said)
        assert len(spelled) == 2 and spelled[0] == spelled[1]
        code = spelled[0].replace(", ", "")
        assert inbox.messages == []

        # No check within 60 s: the same code by e-mail, through the real SMTP server.
        api.clock.advance(60)
        await api.deliver()
        (mail,) = inbox.messages
        assert inbox.recipients == [["ana@example.com"]]
        assert mail["To"] == "ana@example.com" and code not in str(mail["Subject"])
        assert re.search(rf"^{code}$", plain_text(mail), re.MULTILINE)
        html = mail.get_body(preferencelist=("html",))
        assert html is not None and code in html.get_content()

        body = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
        assert body["status"] == "pending" and body["channel"] == "email"
        assert {m["channel"]: (m["status"], m["provider"]) for m in body["messages"]} == {
            "sms": ("failed", "sms"),
            "voice": ("sent", "calls"),
            "email": ("sent", "mail"),
        }
        checked = await api.check(vid, code)
        assert checked.json() == {
            "id": vid,
            "status": "approved",
            "valid": True,
            "remaining_attempts": 5,
        }
