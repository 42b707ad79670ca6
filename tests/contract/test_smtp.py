"""The SMTP sender against a real SMTP server: ``aiosmtpd``, started by each test on 127.0.0.1
in the test's own event loop, with a handler that records what it accepts and can be told to
answer 451 or 550, require AUTH, offer STARTTLS with a certificate made here, or hang.

First the shared ``Sender`` contract, then what only SMTP has: the MIME structure, headers,
TLS, AUTH, reply classification and the option errors.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import ipaddress
import ssl
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from otpgate.adapters.providers.config import load_delivery
from otpgate.adapters.providers.registry import (
    create_provider,
    create_sender,
    known_providers,
    provider_type,
)
from otpgate.adapters.providers.smtp import SmtpSender, from_options, parse_smtp_url
from otpgate.domain.texts import email_content
from otpgate.errors import (
    ConfigurationError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from otpgate.settings import Settings
from tests.contract.sender_contract import (
    CODE,
    MESSAGE_ID,
    OTHER_ID,
    TEXT,
    SenderCase,
    SenderContract,
    assert_no_secret,
    make_email,
    make_sms,
)

USER = "otpgate"
PASSWORD = "s3cret-Pa55-word"
FROM = "Acme <no-reply@acme.example>"

# --------------------------------------------------------------------------------------------
# The SMTP server


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    authenticated: bool
    tls: bool


@dataclass
class Recorder:
    """aiosmtpd handler: records accepted messages; replies and hangs on demand."""

    received: list[Received] = field(default_factory=list)
    #: replies given (one each, in order) to the next RCPT / DATA commands instead of 250
    rcpt_replies: list[str] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    hang_data: bool = False
    accept_password: str = PASSWORD
    sessions: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: Any
    ) -> Any:
        self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.rcpt_replies:
            return self.rcpt_replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.hang_data:
            await self.release.wait()
            return "451 4.3.0 released"
        if self.data_replies:
            return self.data_replies.pop(0)
        raw = envelope.original_content or b""
        # stored with local line ends, as a mailbox would
        parsed = email.message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        self.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                message=parsed,
                raw=raw,
                authenticated=bool(session.authenticated),
                # implicit TLS (smtps) is the transport's; STARTTLS also sets session.ssl
                tls=server.transport is not None
                and server.transport.get_extra_info("sslcontext") is not None,
            )
        )
        return "250 2.0.0 Ok: queued"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login == USER.encode()
            and data.password == self.accept_password.encode()
        )
        return AuthResult(success=ok, handled=False)

    def texts(self) -> list[str]:
        return [plain_text(r.message) for r in self.received]


def plain_text(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    content = part.get_content()
    assert isinstance(content, str)
    # MIME text ends with a line break; the text is what comes before it.
    return content.removesuffix("\n")


@dataclass
class Server:
    recorder: Recorder
    port: int
    server: asyncio.Server


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def smtp_server() -> AsyncIterator[ServerFactory]:
    """Starts aiosmtpd servers on 127.0.0.1 with the given options; stops them all after."""
    started: list[Server] = []
    protocols: list[SMTP] = []

    async def start(*, implicit_tls: ssl.SSLContext | None = None, **options: Any) -> Server:
        recorder = Recorder()
        if options.get("auth_required") or options.get("authenticator") is True:
            options["authenticator"] = recorder.authenticate

        def protocol() -> SMTP:
            with warnings.catch_warnings():
                # aiosmtpd warns about AUTH without TLS; here that is loopback on purpose
                warnings.simplefilter("ignore", UserWarning)
                made = SMTP(recorder, hostname="mx.test", **options)
            protocols.append(made)
            return made

        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            protocol,
            "127.0.0.1",
            0,
            ssl=implicit_tls,
        )
        port = server.sockets[0].getsockname()[1]
        running = Server(recorder, port, server)
        started.append(running)
        return running

    yield start
    for running in started:
        running.recorder.release.set()
        running.server.close()
        await running.server.wait_closed()
    # Python 3.11's wait_closed does not wait for open connections: end them, then let their
    # handlers finish while the loop still runs.
    for made in protocols:
        if made.transport is not None:
            made.transport.close()
    for _ in range(5):
        await asyncio.sleep(0)


def sender(
    port: int,
    *,
    url: str | None = None,
    sender_from: str = FROM,
    timeout: float = 5.0,
    ca_file: Path | None = None,
    name: str = "smtp",
) -> SmtpSender:
    """The sender the registry builds from the TOML form of the options."""
    options: dict[str, Any] = {
        "url": url or f"smtp://127.0.0.1:{port}",
        "from": sender_from,
        "timeout_seconds": timeout,
    }
    if ca_file is not None:
        options["ca_file"] = str(ca_file)
    names = {k: f"providers.{name}.{k} in otpgate.toml" for k in ("url", "from", "ca_file")}
    built, _ = create_provider(
        name,
        "smtp",
        options,
        Settings(secret_key="smtp-test-" + "k" * 40),  # type: ignore[arg-type]
        setting_names=names,
        type_setting=f"providers.{name}.type in otpgate.toml",
    )
    assert isinstance(built, SmtpSender)
    return built


@dataclass
class Tls:
    server: ssl.SSLContext
    ca_file: Path


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for 127.0.0.1 and localhost, made here with ``cryptography``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otpgate test SMTP")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return Tls(server=context, ca_file=cert_file)


# --------------------------------------------------------------------------------------------
# The shared contract


@pytest.fixture
async def case(smtp_server: ServerFactory) -> SenderCase:
    # AUTH over a plain connection is allowed only on loopback, which this is.
    running = await smtp_server(auth_required=True, auth_require_tls=False)
    recorder = running.recorder
    url = f"smtp://{USER}:{PASSWORD}@127.0.0.1:{running.port}"

    def break_check() -> None:
        recorder.accept_password = "not-the-password"

    return SenderCase(
        sender=sender(running.port, url=url),
        secrets=(PASSWORD, url),
        delivered_texts=recorder.texts,
        break_next_send=lambda: recorder.data_replies.append("451 4.3.0 Try again later"),
        message=lambda message_id: make_email(message_id=message_id),
        break_check=break_check,
    )


class TestContract(SenderContract):
    pass


# --------------------------------------------------------------------------------------------
# The message on the wire


async def test_one_multipart_alternative_message_with_text_and_html(
    smtp_server: ServerFactory,
) -> None:
    running = await smtp_server()
    subject, text, html = email_content(CODE, "Acme <Bank>", 10, "es")
    message = make_email(to="ana@example.com", text=text, subject=subject, html=html, locale="es")

    receipt = await sender(running.port).send(message)

    (got,) = running.recorder.received
    mail = got.message
    assert got.mail_from == "no-reply@acme.example"
    assert got.rcpt_tos == ["ana@example.com"]
    assert mail.get_content_type() == "multipart/alternative"
    parts = list(mail.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in parts)
    assert plain_text(mail) == text.removesuffix("\n")
    html_part = mail.get_body(preferencelist=("html",))
    assert html_part is not None and html_part.get_content() == html
    assert mail["Subject"] == subject == "Tu código de verificación de Acme <Bank>"
    assert mail["From"] == FROM
    assert mail["To"] == "ana@example.com"
    assert mail["Message-ID"] == f"<{MESSAGE_ID}@acme.example>"
    assert receipt.provider_ref == MESSAGE_ID
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["Content-Language"] == "es"
    assert mail["Date"] is not None
    # 7-bit clean on the wire (no 8BITMIME needed): accents travel quoted-printable / RFC 2047
    assert all(byte < 128 for byte in got.raw)


async def test_nothing_is_added_that_could_track_the_reader(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    subject, text, html = email_content(CODE, "Acme", 10, "en")

    await sender(running.port).send(make_email(text=text, subject=subject, html=html))

    (got,) = running.recorder.received
    raw = got.raw.decode("ascii")
    assert "http" not in raw.lower()
    assert "<img" not in raw.lower()
    # only the headers this sender writes, plus MIME's own
    assert {k.lower() for k in got.message} == {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "auto-submitted",
        "content-language",
        "mime-version",
        "content-type",
    }


async def test_a_subject_with_a_line_break_stays_one_header(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    message = make_email(subject="Code\r\nBcc: victim@example.com")

    await sender(running.port).send(message)

    (got,) = running.recorder.received
    assert got.message["Bcc"] is None
    assert got.rcpt_tos == ["ana@example.com"]
    assert got.message["Subject"] == "Code Bcc: victim@example.com"


async def test_the_ehlo_name_is_the_from_domain(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    names: list[str] = []
    original = running.recorder.handle_EHLO

    async def spy(server: SMTP, session: Session, envelope: Envelope, hostname: str, r: Any) -> Any:
        names.append(hostname)
        return await original(server, session, envelope, hostname, r)

    running.recorder.handle_EHLO = spy  # type: ignore[method-assign]
    await sender(running.port).send(make_email())
    assert names and set(names) == {"acme.example"}


@pytest.mark.parametrize(
    "message",
    [
        make_sms(),
        make_email(to="not an address"),
        make_email(to="ana@example.com\r\nRCPT TO:<x@example.com>"),
        make_email(to="añа@example.com"),
    ],
    ids=["sms", "no-at", "crlf", "non-ascii"],
)
async def test_what_cannot_be_an_email_is_refused_for_good(
    smtp_server: ServerFactory, message: Any
) -> None:
    running = await smtp_server()
    with pytest.raises(PermanentDeliveryError) as info:
        await sender(running.port).send(message)
    assert_no_secret(info.value)
    assert running.recorder.sessions == 0  # refused before connecting


# --------------------------------------------------------------------------------------------
# Reply classification


async def test_451_on_data_is_transient_and_nothing_is_delivered(
    smtp_server: ServerFactory,
) -> None:
    running = await smtp_server()
    running.recorder.data_replies.append("451 4.3.0 Mailbox busy")

    with pytest.raises(TransientDeliveryError) as info:
        await sender(running.port).send(make_email())

    assert not isinstance(info.value, DeliveryTimeout)
    assert str(info.value) == "smtp: DATA answered 451"
    assert running.recorder.received == []
    # and the next one goes through
    await sender(running.port).send(make_email())
    assert running.recorder.texts() == [TEXT]


async def test_450_on_rcpt_is_transient(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    running.recorder.rcpt_replies.append("450 4.2.1 Greylisted, come back later")

    with pytest.raises(TransientDeliveryError, match="RCPT answered 450"):
        await sender(running.port).send(make_email())


async def test_550_unknown_mailbox_is_permanent(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    running.recorder.rcpt_replies.append("550 5.1.1 <ana@example.com>: unknown mailbox")

    with pytest.raises(PermanentDeliveryError) as info:
        await sender(running.port).send(make_email())

    assert str(info.value) == "smtp: RCPT answered 550"
    assert "ana@example.com" not in str(info.value)  # the server's text is not repeated
    assert_no_secret(info.value)


async def test_554_on_data_is_permanent(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    running.recorder.data_replies.append(f"554 5.7.1 Rejected: {CODE} looks like spam")

    with pytest.raises(PermanentDeliveryError) as info:
        await sender(running.port).send(make_email())

    assert str(info.value) == "smtp: DATA answered 554"
    assert_no_secret(info.value)


async def test_connection_refused_is_transient(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    running.server.close()
    await running.server.wait_closed()

    with pytest.raises(TransientDeliveryError) as info:
        await sender(running.port).send(make_email())

    assert not isinstance(info.value, DeliveryTimeout)
    assert str(info.value) == "smtp: cannot connect at connect"


async def test_a_server_that_hangs_after_data_is_a_delivery_timeout(
    smtp_server: ServerFactory,
) -> None:
    running = await smtp_server()
    running.recorder.hang_data = True

    with pytest.raises(DeliveryTimeout) as info:
        await sender(running.port, timeout=0.5).send(make_email())

    assert "DATA" in str(info.value)
    assert_no_secret(info.value)


async def test_a_server_that_never_greets_is_transient_not_a_timeout() -> None:
    # Nothing was handed over: a plain transient error, so failover may send at once.
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TransientDeliveryError) as info:
            await sender(port, timeout=0.5).send(make_email())
        assert not isinstance(info.value, DeliveryTimeout)
        assert str(info.value) == "smtp: no answer in time at connect"
        await asyncio.wait_for(done.wait(), 5)  # the client hung up
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------------------------
# AUTH


async def test_auth_logs_in_with_the_url_credentials(smtp_server: ServerFactory) -> None:
    running = await smtp_server(auth_required=True, auth_require_tls=False)
    url = f"smtp://{USER}:{PASSWORD}@127.0.0.1:{running.port}"

    await sender(running.port, url=url).send(make_email())

    (got,) = running.recorder.received
    assert got.authenticated


async def test_percent_encoded_credentials_are_decoded(smtp_server: ServerFactory) -> None:
    running = await smtp_server(auth_required=True, auth_require_tls=False)
    running.recorder.accept_password = "p@ss:w/rd%"
    url = f"smtp://{USER}:p%40ss%3Aw%2Frd%25@127.0.0.1:{running.port}"

    await sender(running.port, url=url).send(make_email())

    assert running.recorder.texts() == [TEXT]


async def test_wrong_credentials_are_transient_and_never_shown(
    smtp_server: ServerFactory,
) -> None:
    # 535 is the route's configuration, not this message: fail over, do not fail the message.
    running = await smtp_server(auth_required=True, auth_require_tls=False)
    running.recorder.accept_password = "the-real-one"
    url = f"smtp://{USER}:{PASSWORD}@127.0.0.1:{running.port}"
    smtp = sender(running.port, url=url)

    with pytest.raises(TransientDeliveryError) as info:
        await smtp.send(make_email())
    assert str(info.value) == "smtp: AUTH answered 535"
    assert_no_secret(info.value, PASSWORD, url)

    with pytest.raises(TransientDeliveryError) as checked:
        await smtp.check()
    assert str(checked.value) == "smtp: AUTH answered 535"
    assert running.recorder.received == []


async def test_no_credentials_where_auth_is_required_is_transient(
    smtp_server: ServerFactory,
) -> None:
    running = await smtp_server(auth_required=True, auth_require_tls=False)

    with pytest.raises(TransientDeliveryError) as info:
        await sender(running.port).send(make_email())

    assert not isinstance(info.value, PermanentDeliveryError)
    assert str(info.value) == "smtp: MAIL answered 530"


# --------------------------------------------------------------------------------------------
# TLS


async def test_starttls_with_a_self_signed_certificate_and_its_ca_file(
    smtp_server: ServerFactory, tls: Tls
) -> None:
    running = await smtp_server(
        tls_context=tls.server, require_starttls=True, auth_required=True
    )  # AUTH only after STARTTLS (aiosmtpd's default)
    url = f"smtp://{USER}:{PASSWORD}@127.0.0.1:{running.port}?starttls=1"
    smtp = sender(running.port, url=url, ca_file=tls.ca_file)

    await smtp.check()
    await smtp.send(make_email())

    (got,) = running.recorder.received
    assert got.tls and got.authenticated
    assert plain_text(got.message) == TEXT


async def test_starttls_refuses_a_certificate_it_cannot_verify(
    smtp_server: ServerFactory, tls: Tls
) -> None:
    running = await smtp_server(tls_context=tls.server, require_starttls=True)
    smtp = sender(running.port, url=f"smtp://127.0.0.1:{running.port}?starttls=1")

    with pytest.raises(TransientDeliveryError) as info:
        await smtp.send(make_email())

    assert str(info.value) == "smtp: TLS failed at STARTTLS"
    assert running.recorder.received == []


async def test_starttls_asked_of_a_server_without_it_is_transient(
    smtp_server: ServerFactory, tls: Tls
) -> None:
    running = await smtp_server()
    smtp = sender(
        running.port, url=f"smtp://127.0.0.1:{running.port}?starttls=1", ca_file=tls.ca_file
    )

    with pytest.raises(TransientDeliveryError, match="does not offer STARTTLS"):
        await smtp.check()


async def test_a_server_requiring_starttls_refuses_a_plain_sender_transiently(
    smtp_server: ServerFactory, tls: Tls
) -> None:
    running = await smtp_server(tls_context=tls.server, require_starttls=True)

    with pytest.raises(TransientDeliveryError) as info:
        await sender(running.port).send(make_email())

    assert not isinstance(info.value, PermanentDeliveryError)
    assert running.recorder.received == []


async def test_smtps_implicit_tls(smtp_server: ServerFactory, tls: Tls) -> None:
    # aiosmtpd knows STARTTLS only; told that AUTH needs no TLS, it offers AUTH on this one
    running = await smtp_server(implicit_tls=tls.server, auth_required=True, auth_require_tls=False)
    url = f"smtps://{USER}:{PASSWORD}@127.0.0.1:{running.port}"

    await sender(running.port, url=url, ca_file=tls.ca_file).send(make_email())

    (got,) = running.recorder.received
    assert got.tls and got.authenticated


# --------------------------------------------------------------------------------------------
# check(), and the sender's lifecycle


async def test_check_greets_and_says_goodbye_without_sending(smtp_server: ServerFactory) -> None:
    running = await smtp_server()

    await sender(running.port).check()

    assert running.recorder.sessions == 1
    assert running.recorder.received == []


async def test_each_send_is_its_own_session(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    smtp = sender(running.port)

    await smtp.send(make_email(message_id=MESSAGE_ID))
    await smtp.send(make_email(message_id=OTHER_ID))

    assert running.recorder.sessions == 2
    assert [r.message["Message-ID"] for r in running.recorder.received] == [
        f"<{MESSAGE_ID}@acme.example>",
        f"<{OTHER_ID}@acme.example>",
    ]


async def test_concurrent_sends_each_arrive_once(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    smtp = sender(running.port)
    ids = [f"msg_{i:032x}" for i in range(20)]

    receipts = await asyncio.gather(*(smtp.send(make_email(message_id=i)) for i in ids))

    assert sorted(r.provider_ref or "" for r in receipts) == sorted(ids)
    assert len(running.recorder.received) == 20


async def test_a_closed_sender_sends_nothing(smtp_server: ServerFactory) -> None:
    running = await smtp_server()
    smtp = sender(running.port)
    await smtp.aclose()

    with pytest.raises(TransientDeliveryError, match="closed"):
        await smtp.send(make_email())
    assert running.recorder.sessions == 0


# --------------------------------------------------------------------------------------------
# Options


def test_smtp_is_a_registered_provider_type() -> None:
    assert "smtp" in known_providers()


def test_environment_form_reads_url_and_from() -> None:
    settings = Settings(
        sms_provider="smtp",
        smtp_url=SecretStr(f"smtps://{USER}:{PASSWORD}@mail.example.com"),
        email_from="no-reply@example.com",
    )  # type: ignore[call-arg]
    built = create_sender("smtp", settings)
    assert isinstance(built, SmtpSender)
    assert built.name == "smtp"
    shown = repr(built)
    assert "mail.example.com" in shown and "465" in shown
    assert PASSWORD not in shown and USER not in shown


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"email_from": "no-reply@example.com"}, "OTPGATE_SMTP_URL is required"),
        ({"smtp_url": "smtp://127.0.0.1:2525"}, "OTPGATE_EMAIL_FROM is required"),
        (
            {"smtp_url": f"http://{USER}:{PASSWORD}@h", "email_from": "a@b.example"},
            "OTPGATE_SMTP_URL must start with smtp:// or smtps://",
        ),
        (
            {"smtp_url": f"smtp://{USER}:{PASSWORD}@h:99999", "email_from": "a@b.example"},
            "OTPGATE_SMTP_URL is not a valid",
        ),
        (
            {"smtp_url": f"smtp://{USER}:{PASSWORD}@h?tls={PASSWORD}", "email_from": "a@b.ex"},
            "OTPGATE_SMTP_URL: unknown option 'tls'",
        ),
        (
            {"smtp_url": f"smtps://{USER}:{PASSWORD}@h?starttls=1", "email_from": "a@b.ex"},
            "OTPGATE_SMTP_URL: smtps:// is TLS already",
        ),
        (
            {"smtp_url": f"smtp://{USER}:{PASSWORD}@mail.example.com", "email_from": "a@b.ex"},
            "OTPGATE_SMTP_URL would send the password in clear",
        ),
        (
            {"smtp_url": f"smtps://{USER}:{PASSWORD}@h", "email_from": f"{PASSWORD}"},
            "OTPGATE_EMAIL_FROM must be an address",
        ),
        (
            {"smtp_url": "smtp://h", "email_from": "Acme <no-reply@>"},
            "OTPGATE_EMAIL_FROM must be an address",
        ),
        (
            {"smtp_url": "smtp://h", "email_from": "a@b.example\r\nBcc: c@d.example"},
            "OTPGATE_EMAIL_FROM must be one line",
        ),
        (
            {
                "smtp_url": "smtps://h",
                "email_from": "a@b.example",
                "smtp_ca_file": Path("/nonexistent/ca.pem"),
            },
            "OTPGATE_SMTP_CA_FILE cannot be read",
        ),
    ],
)
def test_bad_options_name_the_setting_never_the_value(values: dict[str, Any], named: str) -> None:
    settings = Settings(sms_provider="smtp", **values)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError) as info:
        create_sender("smtp", settings)
    shown = str(info.value)
    assert named in shown
    assert PASSWORD not in shown
    assert USER not in shown


def test_a_toml_option_that_does_not_exist_is_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_provider(
            "mail",
            "smtp",
            {"url": "smtp://h", "from": "a@b.example", "password": PASSWORD},
            Settings(),
            setting_names={"password": "providers.mail.password in otpgate.toml"},
            type_setting="providers.mail.type",
        )
    assert "providers.mail.password in otpgate.toml is not an option" in str(info.value)
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("url", "port", "implicit_tls", "starttls"),
    [
        ("smtp://h", 25, False, False),
        ("smtp://h?starttls=1", 587, False, True),
        ("smtp://h:2525?starttls=true", 2525, False, True),
        ("smtp://h?starttls=0", 25, False, False),
        ("smtps://h", 465, True, False),
        ("smtps://u:p@h:1465", 1465, True, False),
        ("smtp://u:p@127.0.0.1:2525", 2525, False, False),  # clear AUTH on loopback only
    ],
)
def test_url_forms(url: str, port: int, implicit_tls: bool, starttls: bool) -> None:
    server = parse_smtp_url(url, setting="X")
    assert (server.port, server.implicit_tls, server.starttls) == (port, implicit_tls, starttls)


def test_from_options_is_the_registered_factory() -> None:
    assert provider_type("smtp", setting="X").factory is from_options


def test_load_delivery_environment_form_names_email_from(tmp_path: Path) -> None:
    # OTPGATE_SMTP_URL beside an SMS provider adds the smtp provider; its options are named
    # by their environment variables.
    settings = Settings(
        sms_provider="console", smtp_url=SecretStr(f"smtps://{USER}:{PASSWORD}@mail.example.com")
    )  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError) as info:
        load_delivery(settings)
    assert "OTPGATE_EMAIL_FROM is required" in str(info.value)
    assert PASSWORD not in str(info.value)

    delivery = load_delivery(settings.model_copy(update={"email_from": "a@b.example"}))
    assert [(p.name, p.type) for p in delivery.providers] == [
        ("console", "console"),
        ("smtp", "smtp"),
    ]


def test_load_delivery_file_form(tmp_path: Path) -> None:
    path = tmp_path / "otpgate.toml"
    path.write_text(
        "[providers.mail]\n"
        'type = "smtp"\n'
        f'url = "smtps://{USER}:{PASSWORD}@mail.example.com"\n'
        'from = "Acme <no-reply@acme.example>"\n'
        "[[routes]]\n"
        'countries = ["*"]\n'
        'providers = ["mail"]\n'
    )
    delivery = load_delivery(Settings(config=path))  # type: ignore[call-arg]
    (provider,) = delivery.providers
    assert isinstance(provider.sender, SmtpSender) and provider.sender.name == "mail"
    assert PASSWORD not in repr(provider.sender)

    path.write_text(
        "[providers.mail]\n"
        'type = "smtp"\n'
        f'url = "smtps://{USER}:{PASSWORD}@mail.example.com"\n'
        'from = "nobody"\n'
        "[[routes]]\n"
        'countries = ["*"]\n'
        'providers = ["mail"]\n'
    )
    with pytest.raises(ConfigurationError) as info:
        load_delivery(Settings(config=path))  # type: ignore[call-arg]
    assert f"providers.mail.from in {path} must be an address" in str(info.value)
    assert PASSWORD not in str(info.value) and "nobody" not in str(info.value)
