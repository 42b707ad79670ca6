"""E-mail through an SMTP server (``aiosmtplib``): the ``email`` channel.

Options (environment form ``OTPGATE_SMTP_URL``, ``OTPGATE_EMAIL_FROM``,
``OTPGATE_SMTP_CA_FILE``; TOML form ``url``, ``from``, ``ca_file`` in a ``[providers.NAME]``
table with ``type = "smtp"``):

* ``url``: ``smtp://[USER:PASSWORD@]HOST[:PORT][?starttls=1]`` (plain connection, upgraded by
  STARTTLS when ``starttls=1``; port 587 with STARTTLS, 25 without) or
  ``smtps://[USER:PASSWORD@]HOST[:PORT]`` (TLS from the first byte, port 465). User and password
  are percent-decoded. A password is never sent in clear: credentials need ``smtps://`` or
  ``starttls=1`` unless the host is a loopback address.
* ``from``: the From address, ``no-reply@example.com`` or ``Acme <no-reply@example.com>``; also
  the envelope sender and the domain of the Message-ID.
* ``ca_file``: a PEM bundle of the CAs that may sign the server's certificate (default:
  certifi's bundle, as for the HTTPS providers). Certificates and host names are always checked.

One message per send, on its own connection: connect, EHLO, STARTTLS (if asked), AUTH (if
credentials), MAIL, RCPT, DATA, QUIT. The message is ``multipart/alternative`` with a plain-text
part (``OutboundMessage.text``) and an HTML part (``OutboundMessage.email.html``), both UTF-8 in
quoted-printable so no 8BITMIME is needed; Subject from ``OutboundMessage.email.subject``;
``Message-ID: <msg_…@FROM-DOMAIN>`` (the message id, so a resend of the same message keeps it);
``Auto-Submitted: auto-generated`` (RFC 3834: no out-of-office answers). The sender adds no
tracking pixel, link or header of its own.

Failure classification (``Sender`` contract):

* no connection, TLS failure, a 4xx reply at any step, a reply other than 2xx/3xx to the
  greeting, EHLO, STARTTLS or AUTH (including 535 bad credentials: the route is misconfigured,
  not the message wrong), a server without STARTTLS or AUTH when they are needed:
  ``TransientDeliveryError`` (the message was not taken; retry or fail over);
* a 5xx reply to MAIL, RCPT or DATA (550 unknown mailbox, 552 too big, 554 refused):
  ``PermanentDeliveryError``;
* no answer in time before DATA: ``TransientDeliveryError`` (nothing was handed over);
  no answer in time, or the connection lost, once DATA has started: ``DeliveryTimeout``
  (the server may have taken the message).

Error texts name the step and the reply code (``smtp: RCPT answered 550``) and nothing else:
never the server's reply text (it may echo an address), the message, the code or the password.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import format_datetime, parseaddr
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

import aiosmtplib
import certifi
from pydantic import ConfigDict, Field, SecretStr

from otpgate.adapters.providers.registry import (
    PROVIDER_NAME,
    ProviderContext,
    ProviderOptions,
    register,
)
from otpgate.domain.model import Channel, OutboundMessage, SendReceipt
from otpgate.errors import (
    ConfigurationError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)

__all__ = ["SmtpOptions", "SmtpSender", "SmtpServer", "from_options", "parse_smtp_url"]

_DEFAULT_PORTS: Final = {"smtps": 465, "starttls": 587, "smtp": 25}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})
# An address otpgate puts on the wire: ASCII, one @, no spaces, brackets or control characters.
_ADDRESS: Final = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?"
)
_LANGUAGE_TAG: Final = re.compile(r"[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*")
#: Replies that say the route needs TLS or other credentials, whatever step they answer: the
#: configuration is wrong, not the message (530 authentication or STARTTLS required, 534
#: mechanism too weak, 535 bad credentials, 538 encryption required for this mechanism).
_ROUTE_REPLIES: Final = frozenset({530, 534, 535, 538})
_MESSAGE_ID_PART: Final = re.compile(r"[^A-Za-z0-9_.-]")


class SmtpOptions(ProviderOptions):
    """``OTPGATE_SMTP_URL`` / ``OTPGATE_EMAIL_FROM`` / ``OTPGATE_SMTP_CA_FILE``, or ``url`` /
    ``from`` / ``ca_file`` in a ``[providers.NAME]`` table with ``type = "smtp"``."""

    model_config = ConfigDict(populate_by_name=False)  # "from" only, as the docs name it

    url: SecretStr = SecretStr("")
    from_: str = Field(default="", alias="from")
    ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class SmtpServer:
    """Where and how to connect, as parsed from the URL. ``password`` is a secret: this class
    has no repr of its own that shows it (see ``__repr__``)."""

    host: str
    port: int
    implicit_tls: bool
    starttls: bool
    username: str | None
    password: str | None

    def __repr__(self) -> str:
        return (
            f"SmtpServer(host={self.host!r}, port={self.port}, implicit_tls={self.implicit_tls},"
            f" starttls={self.starttls}, auth={self.username is not None})"
        )


def parse_smtp_url(url: str, *, setting: str) -> SmtpServer:
    """The server of an ``smtp://`` or ``smtps://`` URL, or ``ConfigurationError`` naming
    ``setting`` (never the URL, which holds the password).

    >>> parse_smtp_url("smtp://u:p%40ss@mail.example.com?starttls=1", setting="X")
    SmtpServer(host='mail.example.com', port=587, implicit_tls=False, starttls=True, auth=True)
    >>> parse_smtp_url("smtps://mail.example.com", setting="X").port
    465
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise ConfigurationError(f"{setting} is not a valid smtp:// or smtps:// URL") from None
    if parts.scheme not in ("smtp", "smtps"):
        raise ConfigurationError(f"{setting} must start with smtp:// or smtps://")
    if not host:
        raise ConfigurationError(f"{setting} must name the server's host")
    if parts.path not in ("", "/") or parts.fragment:
        raise ConfigurationError(f"{setting} must have no path: smtp://USER:PASSWORD@HOST:PORT")
    starttls = False
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "starttls":
            raise ConfigurationError(
                f"{setting}: unknown option {key!r}; the one option is starttls"
            )
        if value.lower() not in _TRUE | _FALSE:
            raise ConfigurationError(f"{setting}: starttls must be 1 or 0")
        starttls = value.lower() in _TRUE
    implicit_tls = parts.scheme == "smtps"
    if implicit_tls and starttls:
        raise ConfigurationError(
            f"{setting}: smtps:// is TLS already; starttls=1 goes with smtp:// only"
        )
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and username is None:
        raise ConfigurationError(f"{setting} has a password without a user")
    if username is not None and not (implicit_tls or starttls) and not _is_loopback(host):
        raise ConfigurationError(
            f"{setting} would send the password in clear: use smtps:// or add ?starttls=1"
        )
    if port is None:
        port = _DEFAULT_PORTS["smtps" if implicit_tls else "starttls" if starttls else "smtp"]
    return SmtpServer(host, port, implicit_tls, starttls, username, password)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_from(value: str, *, setting: str) -> Address:
    """The From address (with its display name, if given), or ``ConfigurationError``.

    >>> str(parse_from("Acme <no-reply@acme.example>", setting="X"))
    'Acme <no-reply@acme.example>'
    """
    if not value.strip():
        raise ConfigurationError(f"{setting} is required: the address e-mails are sent from")
    if any(ch in value for ch in "\r\n\x00"):
        raise ConfigurationError(f"{setting} must be one line")
    name, addr = parseaddr(value.strip())
    if not addr or not _ADDRESS.fullmatch(addr) or ".." in addr.split("@")[1]:
        raise ConfigurationError(
            f"{setting} must be an address such as no-reply@example.com "
            "or Acme <no-reply@example.com>"
        )
    local, domain = addr.split("@")
    return Address(display_name=name, username=local, domain=domain.lower())


@register("smtp", options=SmtpOptions, env={"url": "smtp_url", "from": "email_from"})
def from_options(options: SmtpOptions, context: ProviderContext) -> SmtpSender:
    """The sender for these options; a missing or bad one is named (never its value)."""
    url = options.url.get_secret_value()
    if not url:
        raise ConfigurationError(
            f"{context.setting('url')} is required for provider {context.name!r}"
        )
    server = parse_smtp_url(url, setting=context.setting("url"))
    sender_address = parse_from(options.from_, setting=context.setting("from"))
    tls: ssl.SSLContext | None = None
    if server.implicit_tls or server.starttls:
        try:
            tls = _tls_context(str(options.ca_file) if options.ca_file else None)
        except (OSError, ssl.SSLError):
            raise ConfigurationError(
                f"{context.setting('ca_file')} cannot be read as a PEM CA bundle"
            ) from None
    return SmtpSender(
        server=server,
        from_address=sender_address,
        tls_context=tls,
        timeout_seconds=context.timeout_seconds,
        name=context.name,
    )


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificates and host names checked, against ``ca_file`` or certifi's bundle."""
    if ca_file is None:
        return _default_tls_context()
    return ssl.create_default_context(cafile=ca_file)


@functools.cache
def _default_tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


class SmtpSender:
    """``Sender`` of the e-mail channel through one SMTP server (see the module docstring).

    Holds no connection between sends, so ``aclose`` only marks it closed; a send after that
    raises ``TransientDeliveryError``."""

    name = "smtp"
    channels = frozenset({Channel.EMAIL})

    def __init__(
        self,
        *,
        server: SmtpServer,
        from_address: Address,
        tls_context: ssl.SSLContext | None = None,
        timeout_seconds: float = 10.0,
        name: str = "smtp",
    ) -> None:
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigurationError(f"smtp: name must match {PROVIDER_NAME.pattern}")
        if (server.implicit_tls or server.starttls) and tls_context is None:
            raise ConfigurationError("smtp: TLS needs a tls_context")
        if timeout_seconds <= 0:
            raise ConfigurationError("smtp: timeout_seconds must be positive")
        self.name = name
        self._server = server
        self._from = from_address
        self._tls = tls_context
        self._timeout = timeout_seconds
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"SmtpSender(name={self.name!r}, host={self._server.host!r}, "
            f"port={self._server.port}, from={self._from.addr_spec!r})"
        )

    # ----------------------------------------------------------------------------------------
    # Sender

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Send one e-mail; the receipt's ``provider_ref`` is the message id (the local part of
        the Message-ID). A message of another channel, without its e-mail content, or to an
        address that cannot go on the wire is refused (``PermanentDeliveryError``)."""
        if message.channel is not Channel.EMAIL or message.email is None:
            raise PermanentDeliveryError(
                f"{self.name}: SMTP carries e-mail with its subject and HTML only, "
                f"not {message.channel.value}"
            )
        if not _ADDRESS.fullmatch(message.to):
            raise PermanentDeliveryError(f"{self.name}: the recipient is not an e-mail address")
        reference = _MESSAGE_ID_PART.sub("", message.message_id) or "msg"
        content = self._compose(message, reference)
        steps = _Steps()
        try:
            async with asyncio.timeout(self._timeout):
                client = await self._session(steps)
                try:
                    steps.now = "MAIL"
                    await client.mail(self._from.addr_spec)
                    steps.now = "RCPT"
                    await client.rcpt(message.to)
                    steps.now = "DATA"
                    await client.data(content)
                    steps.now = "QUIT"
                    await client.quit()
                finally:
                    client.close()
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            if steps.now == "QUIT":
                # DATA was answered 250: the message is taken, however the goodbye went.
                return SendReceipt(provider_ref=reference)
            raise self._failure(steps.now, exc) from None
        return SendReceipt(provider_ref=reference)

    async def check(self) -> None:
        """Connect, EHLO, STARTTLS if asked, AUTH if credentials, QUIT: proves reachability,
        TLS and credentials without sending anything. Raises ``TransientDeliveryError``."""
        steps = _Steps()
        try:
            async with asyncio.timeout(self._timeout):
                client = await self._session(steps)
                try:
                    steps.now = "QUIT"
                    await client.quit()
                finally:
                    client.close()
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            raise self._failure(steps.now, exc) from None

    async def aclose(self) -> None:
        """Nothing is held between sends; later sends are refused."""
        self._closed = True

    # ----------------------------------------------------------------------------------------
    # Internals

    async def _session(self, steps: _Steps) -> aiosmtplib.SMTP:
        """A connected client, greeted, upgraded and logged in as configured."""
        if self._closed:
            raise TransientDeliveryError(f"{self.name}: the sender is closed")
        server = self._server
        client = aiosmtplib.SMTP(
            hostname=server.host,
            port=server.port,
            use_tls=server.implicit_tls,
            start_tls=False,  # done below, as a step of its own
            tls_context=self._tls if server.implicit_tls else None,
            timeout=self._timeout,
            # Not socket.getfqdn(): a DNS lookup per send, and the host's name is nobody's
            # business. The From domain is what the server sees in the message anyway.
            local_hostname=self._from.domain,
        )
        try:
            steps.now = "connect"
            await client.connect()
            steps.now = "EHLO"
            await client.ehlo()
            if server.starttls:
                steps.now = "STARTTLS"
                await client.starttls(tls_context=self._tls)
                steps.now = "EHLO"
                await client.ehlo()
            if server.username is not None:
                steps.now = "AUTH"
                await client.login(server.username, server.password or "")
        except BaseException:
            client.close()
            raise
        return client

    def _compose(self, message: OutboundMessage, reference: str) -> bytes:
        assert message.email is not None  # send() refuses messages without it
        mail = EmailMessage(policy=SMTP_POLICY)
        mail["From"] = self._from
        mail["To"] = message.to
        # A subject is one line: the domain builds it so, and a stray break would start a header.
        mail["Subject"] = " ".join(message.email.subject.split())
        mail["Date"] = format_datetime(datetime.now(UTC))
        mail["Message-ID"] = f"<{reference}@{self._from.domain}>"
        mail["Auto-Submitted"] = "auto-generated"
        mail.set_content(message.text, subtype="plain", charset="utf-8", cte="quoted-printable")
        mail.add_alternative(
            message.email.html, subtype="html", charset="utf-8", cte="quoted-printable"
        )
        # After the parts: setting content clears the Content-* headers.
        if _LANGUAGE_TAG.fullmatch(message.locale):
            mail["Content-Language"] = message.locale
        return mail.as_bytes()

    def _failure(
        self, step: str, exc: BaseException
    ) -> TransientDeliveryError | PermanentDeliveryError:
        """The ``DeliveryError`` for a failure at ``step``."""
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return self._refused(step, exc.code)
        if isinstance(exc, TimeoutError | OSError | aiosmtplib.SMTPServerDisconnected):
            return self._lost(step, exc)
        return self._unusable(step, exc)

    def _lost(self, step: str, exc: BaseException) -> TransientDeliveryError:
        """No answer in time, or the connection gone: unknown outcome once DATA has begun."""
        what = "no answer in time" if isinstance(exc, TimeoutError) else "connection lost"
        if step == "DATA":
            return DeliveryTimeout(f"{self.name}: {what} during DATA; the message may be taken")
        if step == "connect" and not isinstance(exc, TimeoutError):
            what = "cannot connect"
        if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
            what = "TLS failed"
        return TransientDeliveryError(f"{self.name}: {what} at {step}")

    def _refused(self, step: str, code: int) -> TransientDeliveryError | PermanentDeliveryError:
        """A reply code: 5xx to MAIL, RCPT or DATA is this message's; anything else is the
        route's (or a passing state) and worth another try or another provider."""
        text = f"{self.name}: {step} answered {code}"
        if 500 <= code < 600 and step in ("MAIL", "RCPT", "DATA") and code not in _ROUTE_REPLIES:
            return PermanentDeliveryError(text)
        return TransientDeliveryError(text)

    def _unusable(self, step: str, exc: BaseException) -> TransientDeliveryError:
        """The server cannot do what the configuration asks (no STARTTLS, no AUTH)."""
        if step == "STARTTLS":
            return TransientDeliveryError(f"{self.name}: the server does not offer STARTTLS")
        if step == "AUTH":
            return TransientDeliveryError(f"{self.name}: the server offers no usable AUTH")
        return TransientDeliveryError(f"{self.name}: SMTP failed at {step} ({type(exc).__name__})")


class _Steps:
    """The SMTP step in progress, for classifying a failure."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = "connect"
