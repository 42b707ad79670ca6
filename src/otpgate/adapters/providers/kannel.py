"""Kannel as an SMS provider, through smsbox's ``sendsms`` HTTP interface.

Wire format (Kannel 1.4 user guide, "Sending SMS messages"; checked against Kannel 1.4.5 from
Debian, see ``tests/contract/test_kannel.py``):

* ``GET <url>&to=…&text=…&from=…&coding=…&charset=UTF-8&dlr-mask=…&dlr-url=…`` where ``<url>``
  is the operator's ``sendsms`` URL with ``username`` and ``password`` in its query (as Kannel's
  own examples write it). Every value we add is percent-encoded (``+`` as ``%2B``: Kannel's CGI
  decoding reads a bare ``+`` as a space).
* ``coding`` is ``0`` (7-bit: smsbox converts the UTF-8 text to the SMSC's GSM alphabet) for
  ``GSM-7`` and ``2`` (UCS-2: smsbox converts the UTF-8 text to UCS-2) for ``UCS-2``; ``charset``
  is always ``UTF-8``, the encoding of the text we send. ``from`` is left out when the message
  has no sender id (Kannel then uses its ``global-sender``). ``smsc`` is sent when the option
  is set (the ``smsc-id`` to route to).
* ``dlr-url`` is the message's receipt URL (it carries otpgate's secret token) plus ``ref``
  (:func:`reference_for` the message id, the provider reference) and ``type=%d`` (Kannel puts
  the report's type there). A ``%`` of the receipt URL is doubled, as Kannel reads ``%`` as the
  start of an escape. We do not ask for ``%A`` (the report's text): an SMPP report's text
  carries the first 20 characters of the message, which may hold the code.

Answers (the body is a fixed phrase of smsbox; the status decides, the phrase refines):

====  =============================================  ==============================================
HTTP  smsbox's answer                                outcome
====  =============================================  ==============================================
202   ``0: Accepted for delivery``, ``Sent.``,        accepted
      ``3: Queued for later delivery``
403   ``Authorization failed for sendsms``           transient: the route's credentials are wrong;
                                                     fail over and alert rather than fail the code
403   ``Not routable. Do not try again.``            permanent: no SMSC of this Kannel takes it
400   ``Sender missing and no global set, …``        transient: the route is misconfigured
400   any other (``Number(s) has/have been           permanent: this message is refused as it is
      denied…``, ``Charset or body misformed…``)
503   ``Temporal failure, try again later.``         transient
5xx   ``Sending failed.`` or any                     transient
any   other status (3xx, 404, 200…)                  transient: the URL is not smsbox's sendsms
====  =============================================  ==============================================

A connection that cannot be made is transient; a request that went out and got no answer in
time, or whose connection was lost before the answer, raises ``DeliveryTimeout`` (Kannel may
have taken the message). Exceptions never carry the text, the password or the receipt URL:
nothing of aiohttp's exceptions (some of which print the request URL) is chained.

Delivery reports: Kannel calls the ``dlr-url`` by GET. Types (``%d``): 1 delivered to the phone,
2 undelivered, 4 queued on the SMSC, 8 accepted by the SMSC, 16 rejected by the SMSC. 1 makes
the message ``delivered``, 2 and 16 ``undelivered``; 4 and 8 change nothing. ``dlr_mask``
(default 19 = 1 + 2 + 16) asks only for the reports that change a message, so the receipt
endpoint is not called twice per message for nothing.

``check`` sends ``GET <url>`` with the credentials and no ``to``: smsbox checks the credentials
first (403 when wrong) and then answers ``400 Missing receiver number, rejected`` without
queueing anything, which proves smsbox is reachable and takes these credentials. It does not
prove that bearerbox or an SMSC is up.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Final, NamedTuple

import aiohttp
import yarl
from pydantic import Field, SecretStr

from otpgate.adapters.providers.registry import (
    PROVIDER_NAME,
    ProviderContext,
    ProviderOptions,
    register,
)
from otpgate.domain.model import Channel, MessageStatus, OutboundMessage, SendReceipt
from otpgate.domain.ports import DeliveryReport
from otpgate.errors import (
    ConfigurationError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)

__all__ = [
    "DEFAULT_DLR_MASK",
    "KannelOptions",
    "KannelSender",
    "from_options",
    "reference_for",
]

#: Kannel's report types (the ``%d`` of a ``dlr-url``).
DLR_DELIVERED: Final = 1
DLR_UNDELIVERED: Final = 2
DLR_QUEUED: Final = 4
DLR_SMSC_ACK: Final = 8
DLR_SMSC_NACK: Final = 16

#: Delivered, undelivered and rejected by the SMSC: the reports that change a message.
DEFAULT_DLR_MASK: Final = DLR_DELIVERED | DLR_UNDELIVERED | DLR_SMSC_NACK

#: What each report type does to the message, and how the report is described.
_DLR_TYPES: Final[Mapping[int, tuple[MessageStatus | None, str]]] = {
    DLR_DELIVERED: (MessageStatus.DELIVERED, "delivered to the phone"),
    DLR_UNDELIVERED: (MessageStatus.UNDELIVERED, "not delivered"),
    DLR_QUEUED: (None, "queued on the SMSC"),
    DLR_SMSC_ACK: (None, "accepted by the SMSC"),
    DLR_SMSC_NACK: (MessageStatus.UNDELIVERED, "rejected by the SMSC"),
}

#: A reference we gave Kannel: what :func:`reference_for` makes of a message id.
_REFERENCE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")

# smsbox answers with short fixed phrases; cap them anyway before they reach an exception.
_MAX_ANSWER: Final = 120


def reference_for(message_id: str) -> str:
    """The provider reference of a message: its id without the ``msg_`` prefix (128 random
    bits as 32 hex digits), carried in the ``dlr-url`` and echoed back in every report.

    >>> reference_for("msg_0123456789abcdef0123456789abcdef")
    '0123456789abcdef0123456789abcdef'
    """
    ref = message_id.removeprefix("msg_")
    if not _REFERENCE.fullmatch(ref):
        raise ValueError("a message id must be msg_ and up to 64 letters, digits, - or _")
    return ref


class KannelOptions(ProviderOptions):
    """``OTPGATE_KANNEL_URL`` / ``_SMSC`` / ``_DLR_MASK``, or ``url`` / ``smsc`` / ``dlr_mask``
    in a ``[providers.NAME]`` table with ``type = "kannel"``."""

    #: smsbox's sendsms URL with ``username`` and ``password`` in its query.
    url: SecretStr = SecretStr("")
    #: The ``smsc-id`` to route to (Kannel's ``smsc`` parameter); empty: Kannel's routing.
    smsc: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    #: Which reports Kannel sends (sum of 1, 2, 4, 8, 16); 0 asks for none.
    dlr_mask: int = Field(default=DEFAULT_DLR_MASK, ge=0, le=31)


@register("kannel", options=KannelOptions)
def from_options(options: KannelOptions, context: ProviderContext) -> KannelSender:
    """The sender for these options; a missing or bad URL is named (never its value)."""
    url = options.url.get_secret_value()
    setting = context.setting("url")
    if not url:
        raise ConfigurationError(f"provider {context.name!r} (kannel) needs {setting}")
    problem = _url_problem(url)
    if problem is not None:
        raise ConfigurationError(f"{setting} {problem}")
    return KannelSender(
        url=url,
        smsc=options.smsc or None,
        dlr_mask=options.dlr_mask,
        timeout_seconds=context.timeout_seconds,
        name=context.name,
    )


def _url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a sendsms URL with credentials, without quoting any of it."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    del port
    if parts.fragment or parts.username or parts.password:
        return "must carry the credentials in its query (username=…&password=…), not elsewhere"
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    user = query.get("username") or query.get("user")
    password = query.get("password") or query.get("pass")
    if not user or not user[0] or not password or not password[0]:
        return "must have username and password in its query"
    ours = {"to", "text", "from", "coding", "charset", "smsc", "dlr-mask", "dlr-url"}
    if ours & set(query):
        return f"must not set {', '.join(sorted(ours & set(query)))}: otpgate sets them"
    return None


class _Answer(NamedTuple):
    status: int
    body: str


class KannelSender:
    """``Sender`` (SMS only) and ``ReceiptParser`` for Kannel's smsbox.

    The sender owns (and ``aclose`` closes) its ``aiohttp.ClientSession`` unless one is passed
    in; ``timeout_seconds`` bounds every request either way. After ``aclose`` every request
    raises ``TransientDeliveryError``.
    """

    name = "kannel"
    channels = frozenset({Channel.SMS})

    def __init__(
        self,
        *,
        url: str,
        smsc: str | None = None,
        dlr_mask: int = DEFAULT_DLR_MASK,
        timeout_seconds: float = 10.0,
        client: aiohttp.ClientSession | None = None,
        name: str = "kannel",
    ) -> None:
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigurationError(f"kannel: name must match {PROVIDER_NAME.pattern}")
        problem = _url_problem(url)
        if problem is not None:
            raise ConfigurationError(f"kannel: the sendsms URL {problem}")
        if not 0 <= dlr_mask <= 31:
            raise ConfigurationError("kannel: dlr_mask must be between 0 and 31")
        if timeout_seconds <= 0:
            raise ConfigurationError("kannel: timeout_seconds must be positive")
        self.name = name
        # The password lives only in this string (and the URLs made from it); nothing here
        # prints it. The operator's query is kept exactly as written.
        self._url = url
        self._separator = "&" if urllib.parse.urlsplit(url).query else "?"
        self._password = _password_of(url)
        self._host = urllib.parse.urlsplit(url).netloc
        self._smsc = smsc
        self._dlr_mask = dlr_mask
        # Connecting gets half the budget: a connection not made in that time carried nothing.
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=timeout_seconds / 2)
        self._client = client
        self._owns_client = client is None
        self._closed = False

    def __repr__(self) -> str:
        return f"KannelSender(name={self.name!r}, host={self._host!r}, smsc={self._smsc!r})"

    __str__ = __repr__

    # ----------------------------------------------------------------------------------------
    # Sender

    async def send(self, message: OutboundMessage) -> SendReceipt:
        if message.channel is not Channel.SMS or message.sms is None:
            raise PermanentDeliveryError(f"kannel: cannot carry {message.channel.value} messages")
        ref = reference_for(message.message_id)
        answer = await self._get(self._send_url(message, ref))
        self._raise_unless_accepted(answer, text=message.text)
        return SendReceipt(provider_ref=ref)

    async def check(self) -> None:
        answer = await self._get(self._url)
        if answer.status == 400 and answer.body.startswith("Missing receiver"):
            return
        if answer.status == 403:
            raise TransientDeliveryError(
                "kannel: smsbox refused the credentials (HTTP 403); check username and password"
            )
        raise TransientDeliveryError(
            f"kannel: unexpected answer to the probe (HTTP {answer.status}: "
            f"{self._shown(answer.body, '')!r}); is the URL smsbox's sendsms?"
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None and self._owns_client:
            await self._client.close()
        self._client = None

    # ----------------------------------------------------------------------------------------
    # ReceiptParser

    def parse_receipt(self, params: Mapping[str, str]) -> DeliveryReport | None:
        """The report of a ``dlr-url`` call: ``ref`` names the message, ``type`` is Kannel's
        report type. None when ``ref`` is missing or not one we make; a type we do not know
        (or none) changes nothing."""
        ref = params.get("ref", "")
        if not _REFERENCE.fullmatch(ref):
            return None
        raw = params.get("type", "").strip()
        kind = int(raw) if raw.isdecimal() and len(raw) <= 4 else None
        if kind is None or kind not in _DLR_TYPES:
            shown = raw[:8] if raw.isprintable() else "?"
            return DeliveryReport(ref, None, f"kannel report of unknown type {shown!r}")
        status, description = _DLR_TYPES[kind]
        return DeliveryReport(ref, status, f"kannel report {kind}: {description}")

    # ----------------------------------------------------------------------------------------
    # Internals

    def _send_url(self, message: OutboundMessage, ref: str) -> str:
        assert message.sms is not None  # send() refuses other channels
        params: list[tuple[str, str]] = [("to", message.to), ("text", message.text)]
        if message.sms.sender_id is not None:
            params.append(("from", message.sms.sender_id))
        ucs2 = message.sms.encoding.upper().replace("-", "") == "UCS2"
        params += [("coding", "2" if ucs2 else "0"), ("charset", "UTF-8")]
        if self._smsc is not None:
            params.append(("smsc", self._smsc))
        if message.receipt_url is not None and self._dlr_mask:
            params += [
                ("dlr-mask", str(self._dlr_mask)),
                ("dlr-url", _dlr_url(message.receipt_url, ref)),
            ]
        query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote, safe="")
        return f"{self._url}{self._separator}{query}"

    async def _get(self, url: str) -> _Answer:
        if self._closed:
            raise TransientDeliveryError("kannel: the sender is closed")
        if self._client is None:
            self._client = aiohttp.ClientSession(trust_env=False)
        # Nothing of aiohttp's exceptions is chained (``from None``): some print the request
        # URL, which holds the password, the text and the receipt token.
        try:
            async with self._client.get(
                yarl.URL(url, encoded=True),
                allow_redirects=False,
                raise_for_status=False,
                timeout=self._timeout,
            ) as response:
                body = await response.content.read(4096)
                return _Answer(response.status, body.decode("utf-8", "replace").strip())
        # The order matters: aiohttp's timeouts are TimeoutErrors and ClientErrors both, and a
        # connection that was never made is the one failure that certainly sent nothing.
        except aiohttp.ConnectionTimeoutError:
            raise TransientDeliveryError("kannel: no connection to smsbox in time") from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or type(exc.os_error).__name__
            raise TransientDeliveryError(f"kannel: cannot connect to smsbox ({reason})") from None
        except TimeoutError:
            raise DeliveryTimeout("kannel: no answer from smsbox in time") from None
        except aiohttp.ClientError as exc:  # the request may have gone out: outcome unknown
            raise DeliveryTimeout(
                f"kannel: connection to smsbox lost before its answer ({type(exc).__name__})"
            ) from None

    def _raise_unless_accepted(self, answer: _Answer, *, text: str) -> None:
        status, body = answer.status, answer.body
        if status == 202:
            return
        shown = self._shown(body, text)
        detail = f"kannel: HTTP {status}: {shown!r}"
        if status == 403 and body.startswith("Authorization failed"):
            raise TransientDeliveryError(
                "kannel: smsbox refused the credentials (HTTP 403); check username and password"
            )
        if status == 403 and body.startswith("Not routable"):
            raise PermanentDeliveryError(f"{detail} (no SMSC of this Kannel takes it)")
        if status == 400 and body.startswith("Sender missing"):
            raise TransientDeliveryError(f"{detail} (set a sender id or Kannel's global-sender)")
        if status == 400:
            raise PermanentDeliveryError(detail)
        raise TransientDeliveryError(detail)

    def _shown(self, body: str, text: str) -> str:
        """smsbox's answer as it may appear in an error: one short line, without the text or
        the password should smsbox ever echo them."""
        shown = " ".join(body.split())
        for secret in (text, self._password):
            if secret:
                shown = shown.replace(secret, "[redacted]")
        return shown[:_MAX_ANSWER]


def _password_of(url: str) -> str:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    values = query.get("password") or query.get("pass") or [""]
    return values[0]


def _dlr_url(receipt_url: str, ref: str) -> str:
    """The receipt URL with our reference and Kannel's report-type escape appended; a literal
    ``%`` of the receipt URL is written ``%%`` so Kannel does not read it as an escape."""
    separator = "&" if "?" in receipt_url else "?"
    return f"{receipt_url.replace('%', '%%')}{separator}ref={ref}&type=%d"
