"""SMPP 3.4 as an SMS provider: one ``bind_transceiver`` per sender (i.e. per worker process).

Configuration is one URL, ``OTPGATE_SMPP_URL`` (or ``url`` in a ``[providers.NAME]`` table with
``type = "smpp"``)::

    smpp://SYSTEM_ID:PASSWORD@HOST:PORT?system_type=&window=10&throughput=&source=&source_ton=&source_npi=&enquire_link=30

``PORT`` defaults to 2775. ``window`` (1–1000, default 10) is how many ``submit_sm`` may await
their ``submit_sm_resp`` at once; ``throughput`` caps ``submit_sm`` per second (default: no
cap); ``source`` is the sender used when a message names none; ``source_ton``/``source_npi``
override the automatic choice below; ``enquire_link`` is the keep-alive period in seconds.
The password is a secret: it appears in no repr, log line or exception text.

Wire behaviour:

* The session is written here over aiosmpplib's PDU codec (``aiosmpplib.protocol``); the
  library's ``ESME`` is not used (docs/providers.md, ``## SMPP``, says why).
* A background task binds as transceiver, reconnects with exponential backoff (0.5 s doubling
  up to 30 s, with jitter) when the connection fails or the SMSC unbinds, and sends
  ``enquire_link`` every ``enquire_link`` seconds; a keep-alive without an answer within the
  send timeout drops the connection.
* ``submit_sm``: destination TON/NPI 1/1 (international, E.164 without ``+``); source TON/NPI
  by sender type: alphanumeric 5/0, a short code of up to 8 digits 3/0, a longer number 1/1;
  ``registered_delivery`` 1; ``data_coding`` 0 with the GSM 03.38 default alphabet one septet
  per octet (unpacked, as SMPP carries it) for GSM-7 text, 8 with UTF-16BE for UCS-2. A text
  longer than one part (160 septets / 70 units) is sent as parts of 153 septets / 67 units,
  each with a concatenation UDH (``05 00 03 ref total seq``, 8-bit reference) and ``esm_class``
  0x40; an escape pair or a surrogate pair is never split.
* A message sent while no bind is up waits for one within the send timeout; if the bind
  cannot be made (refused connection, refused credentials, time up) ``send`` raises
  ``NotConnected`` (a ``TransientDeliveryError`` the dispatcher does not count as an attempt)
  before anything was written. A ``submit_sm`` written without a
  ``submit_sm_resp`` in time (or whose connection dropped before the answer) raises
  ``DeliveryTimeout``: the SMSC may have taken it.
* ``submit_sm_resp`` statuses: see :data:`TRANSIENT_STATUSES` and :data:`PERMANENT_STATUSES`;
  any other non-zero status is transient (an SMSC's vendor-specific codes are not this
  message's fault, so another route may take it).
* Receipts: ``deliver_sm`` with the receipt bit of ``esm_class``; the message id comes from
  the ``receipted_message_id`` TLV or the text's ``id:``, the status from the ``message_state``
  TLV or the text's ``stat:`` (:func:`parse_receipt`). They are handed to the sink given to
  :meth:`SmppSender.report_to`, and ``deliver_sm_resp`` is written once the sink returned (so
  an SMSC redelivers receipts a crashed process never stored). The provider reference of a
  message is the ``message_id`` of its (first) ``submit_sm_resp``; a receipt for another part
  of a long message is folded into one report for the message: undelivered as soon as one
  part fails, delivered once every part is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from aiosmpplib.codec import GSM7BitCodec
from aiosmpplib.protocol import (
    BindTransceiver,
    DeliverSm,
    DeliverSmResp,
    EnquireLink,
    EnquireLinkResp,
    GenericNack,
    SubmitSm,
    Unbind,
    UnbindResp,
)
from aiosmpplib.state import (
    MESSAGE_STATE,
    NPI,
    RECEIPTED_MESSAGE_ID,
    TON,
    PduHeader,
    PhoneNumber,
    SmppCommand,
    SmppCommandStatus,
)
from pydantic import SecretStr

from otpgate.adapters.providers.registry import (
    PROVIDER_NAME,
    ProviderContext,
    ProviderOptions,
    register,
)
from otpgate.domain.model import Channel, MessageStatus, OutboundMessage, SendReceipt
from otpgate.domain.ports import DeliveryReport, ReportSink
from otpgate.errors import (
    ConfigurationError,
    DeliveryError,
    DeliveryTimeout,
    NotConnected,
    PermanentDeliveryError,
    TransientDeliveryError,
)

__all__ = [
    "DEFAULT_PORT",
    "PERMANENT_STATUSES",
    "TRANSIENT_STATUSES",
    "SmppOptions",
    "SmppSender",
    "from_options",
    "parse_receipt",
    "source_address",
    "split_text",
]

log = logging.getLogger(__name__)

DEFAULT_PORT: Final = 2775
DEFAULT_WINDOW: Final = 10
DEFAULT_ENQUIRE_LINK_SECONDS: Final = 30.0

# Command ids (SMPP 3.4 §5.1.2.1).
_GENERIC_NACK: Final = 0x80000000
_BIND_TRANSCEIVER_RESP: Final = 0x80000009
_SUBMIT_SM_RESP: Final = 0x80000004
_DELIVER_SM: Final = 0x00000005
_ENQUIRE_LINK: Final = 0x00000015
_UNBIND: Final = 0x00000006
_RESPONSE_BIT: Final = 0x80000000
_HEADER: Final = struct.Struct("!IIII")
# The largest PDU we accept: a deliver_sm with a full message_payload TLV and some more.
_MAX_PDU: Final = 70_000

ESME_ROK: Final = 0x00
ESME_RINVCMDID: Final = 0x03

#: ``submit_sm_resp`` statuses worth retrying later or on another route. Throttling and a full
#: queue are the SMSC's load; a system error, a failed submit, a bind-state error and a
#: temporary application error are the route's passing trouble; a refused *source* (address,
#: TON, NPI) is the route's configuration (the sender ID may be allowed on another route).
TRANSIENT_STATUSES: Final[Mapping[int, str]] = {
    0x04: "ESME_RINVBNDSTS",
    0x08: "ESME_RSYSERR",
    0x0A: "ESME_RINVSRCADR",
    0x14: "ESME_RMSGQFUL",
    0x45: "ESME_RSUBMITFAIL",
    0x48: "ESME_RINVSRCTON",
    0x49: "ESME_RINVSRCNPI",
    0x58: "ESME_RTHROTTLED",
    0x64: "ESME_RX_T_APPN",
    0xFE: "ESME_RDELIVERYFAILURE",
    0xFF: "ESME_RUNKNOWNERR",
}

#: Statuses that say this message can never go out on this route: its destination or its
#: content (length, parameters) is refused, or the SMSC rejects it for good.
PERMANENT_STATUSES: Final[Mapping[int, str]] = {
    0x01: "ESME_RINVMSGLEN",
    0x06: "ESME_RINVPRTFLG",
    0x07: "ESME_RINVREGDLVFLG",
    0x0B: "ESME_RINVDSTADR",
    0x15: "ESME_RINVSERTYP",
    0x33: "ESME_RINVNUMDESTS",
    0x43: "ESME_RINVESMCLASS",
    0x50: "ESME_RINVDSTTON",
    0x51: "ESME_RINVDSTNPI",
    0x61: "ESME_RINVSCHED",
    0x62: "ESME_RINVEXPIRY",
    0x63: "ESME_RINVDFTMSGID",
    0x65: "ESME_RX_P_APPN",
    0x66: "ESME_RX_R_APPN",
    0xC0: "ESME_RINVOPTPARSTREAM",
    0xC1: "ESME_ROPTPARNOTALLWD",
    0xC2: "ESME_RINVPARLEN",
    0xC3: "ESME_RMISSINGOPTPARAM",
    0xC4: "ESME_RINVOPTPARAMVAL",
}

_BIND_STATUSES: Final[Mapping[int, str]] = {
    0x05: "ESME_RALYBND",
    0x0D: "ESME_RBINDFAIL",
    0x0E: "ESME_RINVPASWD",
    0x0F: "ESME_RINVSYSID",
    0x53: "ESME_RINVSYSTYP",
}

# Receipt statuses, as text (``stat:``) and as the message_state TLV (SMPP 3.4 §5.2.28).
_DELIVERED_STATS: Final = frozenset({"DELIVRD"})
_UNDELIVERED_STATS: Final = frozenset({"EXPIRED", "DELETED", "UNDELIV", "REJECTD"})
_MESSAGE_STATES: Final[Mapping[int, str]] = {
    1: "ENROUTE",
    2: "DELIVRD",
    3: "EXPIRED",
    4: "DELETED",
    5: "UNDELIV",
    6: "ACCEPTD",
    7: "UNKNOWN",
    8: "REJECTD",
}
_RECEIPT_ID: Final = re.compile(r"(?:^|\s)id:(\S+)", re.IGNORECASE)
_RECEIPT_STAT: Final = re.compile(r"(?:^|\s)stat:(\w+)", re.IGNORECASE)
_RECEIPT_ERR: Final = re.compile(r"(?:^|\s)err:(\w+)", re.IGNORECASE)
# esm_class message type bits (§5.2.12): 0x04 SMSC delivery receipt, 0x20 intermediate notice.
_RECEIPT_TYPES: Final = frozenset({0x04, 0x20})

_GSM: Final = GSM7BitCodec()
_ESCAPE: Final = 0x1B
_GSM_SINGLE, _GSM_PART = 160, 153
_UCS2_SINGLE, _UCS2_PART = 70, 67
_MAX_PARTS: Final = 255
_UDHI: Final = 0x40

_DIGITS: Final = re.compile(r"[0-9]+")
_E164: Final = re.compile(r"\+?([0-9]{1,15})")

# How long a receipt the sink did not match (its message not yet marked sent) is offered again.
_UNMATCHED_RETRIES: Final = (0.25, 0.5, 1.0, 2.0)
# Long messages whose part receipts are still awaited, at most this many.
_MULTIPART_MEMORY: Final = 50_000


class SmppOptions(ProviderOptions):
    """``OTPGATE_SMPP_URL``, or ``url`` in a ``[providers.NAME]`` table with ``type = "smpp"``."""

    url: SecretStr = SecretStr("")


@dataclass(frozen=True, slots=True)
class _Settings:
    host: str
    port: int
    system_id: str
    system_type: str
    window: int
    throughput: float | None
    source: str | None
    source_ton: int | None
    source_npi: int | None
    enquire_link_seconds: float


_QUERY_OPTIONS: Final = frozenset(
    {"system_type", "window", "throughput", "source", "source_ton", "source_npi", "enquire_link"}
)


def _parse_url(url: str, setting: str) -> tuple[_Settings, str]:
    """The session settings and the password of an ``smpp://`` URL; ``ConfigurationError``
    naming ``setting`` (never a value) when it is malformed."""
    parts = urlsplit(url)
    if parts.scheme != "smpp":
        raise ConfigurationError(f"{setting} must be an smpp://SYSTEM_ID:PASSWORD@HOST:PORT URL")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigurationError(f"{setting}: the port must be a number 1-65535") from None
    host = parts.hostname or ""
    if not host:
        raise ConfigurationError(f"{setting} must name the SMSC's host")
    system_id = unquote(parts.username or "")
    password = unquote(parts.password or "")
    if not system_id or not password:
        raise ConfigurationError(f"{setting} must carry SYSTEM_ID:PASSWORD before the host")
    if len(system_id) > 15 or not system_id.isascii():
        raise ConfigurationError(f"{setting}: SYSTEM_ID must be at most 15 ASCII characters")
    if len(password) > 8 or not password.isascii():
        raise ConfigurationError(
            f"{setting}: the password must be at most 8 ASCII characters (SMPP 3.4)"
        )
    query: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _QUERY_OPTIONS:
            raise ConfigurationError(
                f"{setting}: unknown query option {key[:32]!r}; known: "
                f"{', '.join(sorted(_QUERY_OPTIONS))}"
            )
        query[key] = value

    def number(key: str, low: float, high: float, *, integer: bool) -> float | None:
        text = query.get(key, "").strip()
        if not text:
            return None
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise ConfigurationError(f"{setting}: {key} must be {kind} from {low:g} to {high:g}")
        return value

    system_type = query.get("system_type", "")
    if len(system_type) > 12 or not system_type.isascii():
        raise ConfigurationError(f"{setting}: system_type must be at most 12 ASCII characters")
    source = query.get("source", "").strip() or None
    if source is not None and not _valid_sender(source):
        raise ConfigurationError(
            f"{setting}: source must be 1-11 letters, digits or spaces, or a number of up to "
            "15 digits"
        )
    window = number("window", 1, 1000, integer=True)
    throughput = number("throughput", 0.01, 100_000, integer=False)
    ton = number("source_ton", 0, 6, integer=True)
    npi = number("source_npi", 0, 18, integer=True)
    enquire = number("enquire_link", 1, 3600, integer=False)
    return (
        _Settings(
            host=host,
            port=port,
            system_id=system_id,
            system_type=system_type,
            window=int(window) if window is not None else DEFAULT_WINDOW,
            throughput=throughput,
            source=source,
            source_ton=int(ton) if ton is not None else None,
            source_npi=int(npi) if npi is not None else None,
            enquire_link_seconds=enquire or DEFAULT_ENQUIRE_LINK_SECONDS,
        ),
        password,
    )


def _valid_sender(sender: str) -> bool:
    if _E164.fullmatch(sender):
        return True
    return 1 <= len(sender) <= 11 and all(c.isascii() and (c.isalnum() or c == " ") for c in sender)


@register("smpp", options=SmppOptions)
def from_options(options: SmppOptions, context: ProviderContext) -> SmppSender:
    """The sender for these options; a missing or malformed URL is named, never shown."""
    url = options.url.get_secret_value()
    if not url:
        raise ConfigurationError(f"provider {context.name!r} (smpp) needs {context.setting('url')}")
    settings, password = _parse_url(url, context.setting("url"))
    return SmppSender(
        host=settings.host,
        port=settings.port,
        system_id=settings.system_id,
        password=password,
        system_type=settings.system_type,
        window=settings.window,
        throughput=settings.throughput,
        source=settings.source,
        source_ton=settings.source_ton,
        source_npi=settings.source_npi,
        enquire_link_seconds=settings.enquire_link_seconds,
        timeout_seconds=context.timeout_seconds,
        name=context.name,
    )


# --------------------------------------------------------------------------------------------
# Pure helpers: addresses, text parts, receipts


def source_address(sender: str | None) -> tuple[str, int, int]:
    """``(address, ton, npi)`` for a sender: alphanumeric 5/0, a short code of up to 8 digits
    3/0, a longer number 1/1 (international, without ``+``); no sender: empty, 0/0 (the SMSC's
    default for the account)."""
    if not sender:
        return "", 0, 0
    digits = sender.removeprefix("+")
    if _DIGITS.fullmatch(digits):
        if len(digits) <= 8 and not sender.startswith("+"):
            return digits, 3, 0
        return digits, 1, 1
    return sender, 5, 0


@dataclass(frozen=True, slots=True)
class _Part:
    text: str  # the part's text (it holds the code: never logged)
    payload: bytes  # UDH (if any) and the encoded text
    data_coding: int
    esm_class: int


def split_text(text: str, encoding: str, reference: int) -> list[_Part]:
    """The ``submit_sm`` short messages of ``text``: GSM 03.38 unpacked septets (data_coding
    0) when ``encoding`` is GSM-7 and the text fits that alphabet, else UTF-16BE (8); more than
    one part, each with a concatenation UDH carrying ``reference`` (0-255), when it does not
    fit one. ``PermanentDeliveryError`` when it would need more than 255 parts."""
    codes: list[int] | None = None
    if encoding.upper().replace("-", "") != "UCS2":
        try:
            codes = _GSM.to_gsm_codes(text, "strict")
        except UnicodeEncodeError:
            codes = None
    if codes is not None:
        if len(codes) <= _GSM_SINGLE:
            return [_Part(text, bytes(codes), 0, 0)]
        chunks = _chunks(codes, _GSM_PART, lambda last: last == _ESCAPE)
        texts = [_GSM.decode(bytes(chunk))[0] for chunk in chunks]
        payloads = [bytes(chunk) for chunk in chunks]
        coding = 0
    else:
        units = list(
            struct.unpack(f"!{len(text.encode('utf-16-be')) // 2}H", text.encode("utf-16-be"))
        )
        if len(units) <= _UCS2_SINGLE:
            return [_Part(text, text.encode("utf-16-be"), 8, 0)]
        chunks = _chunks(units, _UCS2_PART, lambda last: 0xD800 <= last <= 0xDBFF)
        payloads = [struct.pack(f"!{len(chunk)}H", *chunk) for chunk in chunks]
        texts = [payload.decode("utf-16-be") for payload in payloads]
        coding = 8
    total = len(payloads)
    if total > _MAX_PARTS:
        raise PermanentDeliveryError(f"smpp: the text needs {total} parts; at most 255 can be sent")
    return [
        _Part(
            texts[i], bytes([5, 0, 3, reference & 0xFF, total, i + 1]) + payloads[i], coding, _UDHI
        )
        for i in range(total)
    ]


def _chunks(items: list[int], size: int, splits_pair: Callable[[int], bool]) -> list[list[int]]:
    """``items`` in runs of at most ``size``, a run never ending in the first half of a pair."""
    chunks: list[list[int]] = []
    start = 0
    while start < len(items):
        end = min(start + size, len(items))
        if end < len(items) and splits_pair(items[end - 1]):
            end -= 1
        chunks.append(items[start:end])
        start = end
    return chunks


def parse_receipt(
    text: str, *, receipted_message_id: str | None = None, message_state: int | None = None
) -> DeliveryReport | None:
    """The report of a delivery receipt: its text (``id:… sub:… dlvrd:… submit date:… done
    date:… stat:… err:…``) and, when present, the ``receipted_message_id`` and
    ``message_state`` TLVs, which win over the text. ``None`` when it names no message.

    ``DELIVRD`` is delivered; ``EXPIRED``, ``DELETED``, ``UNDELIV`` and ``REJECTD`` are
    undelivered; ``ENROUTE``, ``ACCEPTD``, ``UNKNOWN`` and anything else change nothing."""
    ref = (receipted_message_id or "").strip()
    if not ref:
        found = _RECEIPT_ID.search(text)
        ref = found.group(1) if found else ""
    if not ref:
        return None
    stat: str | None = None
    if message_state is not None:
        stat = _MESSAGE_STATES.get(message_state)
    if stat is None:
        found = _RECEIPT_STAT.search(text)
        stat = found.group(1).upper() if found else None
    status: MessageStatus | None = None
    if stat in _DELIVERED_STATS:
        status = MessageStatus.DELIVERED
    elif stat in _UNDELIVERED_STATS:
        status = MessageStatus.UNDELIVERED
    err = _RECEIPT_ERR.search(text)
    detail = (
        stat
        if stat is None or err is None or status is not MessageStatus.UNDELIVERED
        else f"{stat} err:{err.group(1)}"
    )
    return DeliveryReport(provider_ref=ref[:64], status=status, detail=detail)


# --------------------------------------------------------------------------------------------
# The session


class _LinkLost(Exception):
    """The connection closed while a request awaited its answer."""


class _BindFailed(Exception):
    """A connection or bind attempt failed; the text is safe to show (no secret)."""


@dataclass(eq=False)
class _Link:
    """One bound connection and the requests awaiting their answers on it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[tuple[int, int, bytes]]] = field(default_factory=dict)
    lost: bool = False

    def write(self, pdu: bytes) -> None:
        self.writer.write(pdu)

    def usable(self) -> bool:
        return not self.lost and not self.writer.is_closing()

    def fail_pending(self) -> None:
        self.lost = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(_LinkLost())
        self.pending.clear()


@dataclass(eq=False)
class _Multipart:
    """A long message's parts, by message id, whose receipts are folded into one report."""

    ref: str
    ids: tuple[str, ...]
    waiting: set[str]
    reported: bool = False


class SmppSender:
    """``Sender`` (SMS) and ``ReportSource`` over one SMPP 3.4 transceiver bind.

    The bind is made by a background task started on first use (``send``, ``check`` or
    ``report_to`` inside a running loop) and kept until ``aclose``. One instance holds one
    bind; it is used from one event loop (a worker process)."""

    channels = frozenset({Channel.SMS})

    def __init__(
        self,
        *,
        host: str,
        port: int = DEFAULT_PORT,
        system_id: str,
        password: str,
        system_type: str = "",
        window: int = DEFAULT_WINDOW,
        throughput: float | None = None,
        source: str | None = None,
        source_ton: int | None = None,
        source_npi: int | None = None,
        enquire_link_seconds: float = DEFAULT_ENQUIRE_LINK_SECONDS,
        timeout_seconds: float = 10.0,
        name: str = "smpp",
        backoff_seconds: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigurationError(f"smpp: name must match {PROVIDER_NAME.pattern}")
        if not 1 <= window <= 1000:
            raise ConfigurationError("smpp: window must be from 1 to 1000")
        if timeout_seconds <= 0:
            raise ConfigurationError("smpp: timeout_seconds must be positive")
        self.name = name
        self._host = host
        self._port = port
        self._system_id = system_id
        self._password = password
        self._system_type = system_type
        self._window_size = window
        self._interval = 1.0 / throughput if throughput else 0.0
        self._source = source
        self._source_ton = source_ton
        self._source_npi = source_npi
        self._enquire_link_seconds = enquire_link_seconds
        self._timeout = timeout_seconds
        self._backoff = backoff_seconds

        self._sink: ReportSink | None = None
        self._link: _Link | None = None
        self._runner: asyncio.Task[None] | None = None
        self._window: asyncio.Semaphore | None = None
        self._changed: asyncio.Event | None = None
        self._failed_binds = 0
        self._last_error = "not connected yet"
        self._closed = False
        self._sequence = 0
        self._reference = secrets.randbelow(256)  # any start: a UDH reference
        self._next_slot = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._multipart: OrderedDict[str, _Multipart] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"SmppSender(name={self.name!r}, host={self._host!r}, port={self._port}, "
            f"system_id={self._system_id!r}, window={self._window_size})"
        )

    # ----------------------------------------------------------------------------------------
    # Sender

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Submit the message (all its parts) and return the SMSC's ``message_id`` of its first
        part as the provider reference. Raises as the module docstring says."""
        if message.sms is None:
            raise PermanentDeliveryError(
                f"{self.name}: SMPP carries SMS only, not {message.channel.value}"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        destination = _E164.fullmatch(message.to)
        if destination is None:
            raise PermanentDeliveryError(f"{self.name}: the destination is not an E.164 number")
        if not message.text:
            raise PermanentDeliveryError(f"{self.name}: the text is empty")
        sender = message.sms.sender_id or self._source
        address, ton, npi = source_address(sender)
        if self._source_ton is not None:
            ton = self._source_ton
        if self._source_npi is not None:
            npi = self._source_npi
        self._reference = (self._reference + 1) % 256
        parts = split_text(message.text, message.sms.encoding, self._reference)
        try:
            source = PhoneNumber(address, TON(ton), NPI(npi))
            target = PhoneNumber(destination.group(1), TON.INTERNATIONAL, NPI.ISDN)
        except ValueError:
            raise PermanentDeliveryError(
                f"{self.name}: the sender or destination cannot be an SMPP address"
            ) from None

        ids: list[str] = []
        for index, part in enumerate(parts):
            try:
                ids.append(await self._submit(part, source, target, deadline))
            except DeliveryError as exc:
                if len(parts) > 1:
                    exc.detail = f"{exc.detail} (part {index + 1} of {len(parts)})"
                    exc.args = (exc.detail,)
                raise
        if len(ids) > 1:
            self._remember_parts(ids)
        return SendReceipt(provider_ref=ids[0])

    async def check(self) -> None:
        """Bind (or find the live bind) within the timeout; ``TransientDeliveryError`` naming
        why not (never the password)."""
        loop = asyncio.get_running_loop()
        await self._bound_link(loop.time() + self._timeout)

    async def aclose(self) -> None:
        """Unbind (waiting briefly for ``unbind_resp``), close the connection and stop the
        background task; the sender is not used afterwards."""
        if self._closed:
            return
        self._closed = True
        link = self._link
        if link is not None and link.usable():
            with contextlib.suppress(Exception):
                future = self._request(link, Unbind(sequence_num=self._next_sequence()).pdu())
                await asyncio.wait_for(future, min(self._timeout, 2.0))
        for task in [self._runner, *self._tasks]:
            if task is not None:
                task.cancel()
        for task in [self._runner, *self._tasks]:
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if link is not None:
            link.fail_pending()
            link.writer.close()
            with contextlib.suppress(Exception):
                await link.writer.wait_closed()
        self._notify()

    # ----------------------------------------------------------------------------------------
    # ReportSource

    def report_to(self, sink: ReportSink) -> None:
        """Hand every receipt from now on to ``sink``; inside a running event loop this also
        starts the bind, so receipts flow before the first send."""
        self._sink = sink
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._ensure_runner()

    # ----------------------------------------------------------------------------------------
    # Submitting

    async def _submit(
        self, part: _Part, source: PhoneNumber, target: PhoneNumber, deadline: float
    ) -> str:
        loop = asyncio.get_running_loop()
        link = await self._bound_link(deadline)
        window = self._window
        assert window is not None
        try:
            await asyncio.wait_for(window.acquire(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            raise TransientDeliveryError(
                f"{self.name}: the window of {self._window_size} outstanding submit_sm stayed "
                "full for the whole timeout"
            ) from None
        try:
            if self._interval:
                now = loop.time()
                slot = max(now, self._next_slot)
                if slot > deadline:
                    raise TransientDeliveryError(f"{self.name}: the throughput cap leaves no slot")
                self._next_slot = slot + self._interval
                if slot > now:
                    await asyncio.sleep(slot - now)
            if not link.usable():  # lost while we waited: wait for the next bind, nothing written
                link = await self._bound_link(deadline)
            pdu = self._submit_pdu(part, source, target)
            future = self._request(link, pdu)
            try:
                command, status, body = await asyncio.wait_for(
                    future, max(deadline - loop.time(), 0.001)
                )
            except TimeoutError:
                raise DeliveryTimeout(
                    f"{self.name}: no submit_sm_resp within the timeout"
                ) from None
            except _LinkLost:
                raise DeliveryTimeout(
                    f"{self.name}: the connection closed before the submit_sm_resp"
                ) from None
        finally:
            window.release()
        if command == _GENERIC_NACK:
            raise TransientDeliveryError(
                f"{self.name}: the SMSC answered generic_nack ({_status_name(status)})"
            )
        if status != ESME_ROK:
            detail = f"{self.name}: submit_sm refused ({_status_name(status)})"
            if status in PERMANENT_STATUSES:
                raise PermanentDeliveryError(detail)
            raise TransientDeliveryError(detail)
        message_id = body.split(b"\x00", 1)[0].decode("ascii", "replace").strip()
        if not message_id:
            raise TransientDeliveryError(f"{self.name}: submit_sm_resp without a message_id")
        return message_id

    def _submit_pdu(self, part: _Part, source: PhoneNumber, target: PhoneNumber) -> bytes:
        submit = SubmitSm(
            sequence_num=self._next_sequence(),
            short_message=part.text,
            source=source,
            destination=target,
            esm_class=part.esm_class,
            registered_delivery=1,
            encoding="ucs2" if part.data_coding == 8 else "gsm0338",
            auto_message_payload=False,
        )
        submit.set_encoded_message(part.payload)
        return cast(bytes, submit.pdu())

    def _request(self, link: _Link, pdu: bytes) -> asyncio.Future[tuple[int, int, bytes]]:
        """Write a request PDU and return the future of its answer (keyed by its sequence)."""
        sequence = _HEADER.unpack_from(pdu)[3]
        future: asyncio.Future[tuple[int, int, bytes]] = asyncio.get_running_loop().create_future()
        link.pending[sequence] = future
        future.add_done_callback(lambda _: link.pending.pop(sequence, None))
        link.write(pdu)
        return future

    def _next_sequence(self) -> int:
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        return self._sequence

    # ----------------------------------------------------------------------------------------
    # Binding

    def _ensure_runner(self) -> None:
        if self._closed:
            raise TransientDeliveryError(f"{self.name}: the sender is closed")
        if self._runner is None or self._runner.done():
            if self._window is None:
                self._window = asyncio.Semaphore(self._window_size)
                self._changed = asyncio.Event()
            self._runner = asyncio.create_task(self._run(), name=f"otpgate-smpp-{self.name}")

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _bound_link(self, deadline: float) -> _Link:
        """The live bind, waiting for one until ``deadline``; ``TransientDeliveryError`` as
        soon as a bind attempt fails meanwhile, or when time is up."""
        self._ensure_runner()
        loop = asyncio.get_running_loop()
        failures = self._failed_binds
        while True:
            if self._closed:
                raise TransientDeliveryError(f"{self.name}: the sender is closed")
            link = self._link
            if link is not None and link.usable():
                return link
            if self._failed_binds > failures:
                raise NotConnected(f"{self.name}: no SMPP bind: {self._last_error}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise NotConnected(
                    f"{self.name}: no SMPP bind within the timeout ({self._last_error})"
                )
            changed = self._changed
            assert changed is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    async def _run(self) -> None:
        """Bind, serve the bind until it is lost, and again, with backoff between failures."""
        loop = asyncio.get_running_loop()
        delay = 0.0
        while not self._closed:
            try:
                link = await self._open()
            except _BindFailed as exc:
                self._last_error = str(exc)
                self._failed_binds += 1
                log.warning(
                    "smpp bind failed",
                    extra={"provider": self.name, "error": self._last_error},
                )
                self._notify()
                delay = min(self._backoff[1], max(self._backoff[0], delay * 2))
                await asyncio.sleep(delay * (0.8 + secrets.randbelow(401) / 1000))  # jitter ±20 %
                continue
            started = loop.time()
            self._link = link
            self._last_error = "the bind was lost"
            log.info("smpp bound", extra={"provider": self.name, "host": self._host})
            self._notify()
            try:
                await self._serve(link)
            finally:
                self._link = None
                link.fail_pending()
                link.writer.close()
                self._notify()
            if self._closed:
                break
            log.warning("smpp connection lost; binding again", extra={"provider": self.name})
            # A bind that lasted a moment counts as a failure: back off rather than spin.
            if loop.time() - started < 1.0:
                delay = min(self._backoff[1], max(self._backoff[0], delay * 2))
                await asyncio.sleep(delay)
            else:
                delay = 0.0

    async def _open(self) -> _Link:
        where = f"{self._host}:{self._port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port), self._timeout
            )
        except TimeoutError:
            raise _BindFailed(f"no connection to {where} within the timeout") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise _BindFailed(f"cannot connect to {where} ({reason})") from None
        link = _Link(reader, writer)
        try:
            bind = BindTransceiver(
                sequence_num=self._next_sequence(),
                system_id=self._system_id,
                password=self._password,
                system_type=self._system_type,
            )
            writer.write(bind.pdu())
            command, status, _ = await asyncio.wait_for(self._read_pdu(link), self._timeout)
        except TimeoutError:
            writer.close()
            raise _BindFailed(f"no bind_transceiver_resp from {where} within the timeout") from None
        except (OSError, asyncio.IncompleteReadError, _LinkLost):
            writer.close()
            raise _BindFailed(f"{where} closed the connection during the bind") from None
        if command != _BIND_TRANSCEIVER_RESP or status != ESME_ROK:
            writer.close()
            what = "bind_transceiver" if command == _BIND_TRANSCEIVER_RESP else "the bind PDU"
            raise _BindFailed(f"{where} refused {what} ({_status_name(status)})")
        return link

    async def _read_pdu(self, link: _Link) -> tuple[int, int, bytes]:
        """Read one PDU of the bind exchange (nothing else can arrive before its answer)."""
        header = await link.reader.readexactly(_HEADER.size)
        length, command, status, _ = _HEADER.unpack(header)
        if not _HEADER.size <= length <= _MAX_PDU:
            raise _LinkLost()
        body = await link.reader.readexactly(length - _HEADER.size)
        return command, status, body

    async def _serve(self, link: _Link) -> None:
        tasks = [
            asyncio.create_task(self._read_loop(link)),
            asyncio.create_task(self._keep_alive(link)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task

    async def _keep_alive(self, link: _Link) -> None:
        while True:
            await asyncio.sleep(self._enquire_link_seconds)
            future = self._request(link, EnquireLink(sequence_num=self._next_sequence()).pdu())
            try:
                await asyncio.wait_for(future, self._timeout)
            except (TimeoutError, _LinkLost):
                log.warning("smpp enquire_link unanswered", extra={"provider": self.name})
                return

    async def _read_loop(self, link: _Link) -> None:
        reader = link.reader
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                length, command, status, sequence = _HEADER.unpack(header)
                if not _HEADER.size <= length <= _MAX_PDU:
                    log.warning("smpp: malformed PDU length", extra={"provider": self.name})
                    return
                body = await reader.readexactly(length - _HEADER.size)
                if command & _RESPONSE_BIT:
                    future = link.pending.pop(sequence, None)
                    if future is not None and not future.done():
                        future.set_result((command, status, body))
                elif command == _DELIVER_SM:
                    self._on_deliver_sm(link, header + body, length, sequence)
                elif command == _ENQUIRE_LINK:
                    link.write(EnquireLinkResp(sequence_num=sequence).pdu())
                elif command == _UNBIND:
                    link.write(UnbindResp(sequence_num=sequence).pdu())
                    return
                else:
                    link.write(
                        GenericNack(
                            sequence_num=sequence, command_status=SmppCommandStatus(ESME_RINVCMDID)
                        ).pdu()
                    )
        except (asyncio.IncompleteReadError, OSError):
            return

    # ----------------------------------------------------------------------------------------
    # Receipts

    def _on_deliver_sm(self, link: _Link, pdu: bytes, length: int, sequence: int) -> None:
        header = PduHeader(length, SmppCommand.DELIVER_SM, SmppCommandStatus.ESME_ROK, sequence)
        report: DeliveryReport | None = None
        try:
            deliver = DeliverSm.from_pdu(pdu, header, "gsm0338")
            assert isinstance(deliver, DeliverSm)
            if deliver.esm_class & 0x3C in _RECEIPT_TYPES:
                tlvs = {param.tag: param.value for param in deliver.optional_params or []}
                receipted = tlvs.get(RECEIPTED_MESSAGE_ID)
                state = tlvs.get(MESSAGE_STATE)
                report = parse_receipt(
                    deliver.short_message or deliver.message_payload,
                    receipted_message_id=receipted if isinstance(receipted, str) else None,
                    message_state=state if isinstance(state, int) else None,
                )
        except (ValueError, IndexError, LookupError, struct.error, AssertionError):
            log.warning("smpp: unreadable deliver_sm acknowledged", extra={"provider": self.name})
        if report is not None:
            report = self._fold_parts(report)
        if report is None or self._sink is None:
            link.write(DeliverSmResp(sequence_num=sequence).pdu())
            return
        task = asyncio.create_task(self._hand_over(link, sequence, report))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _hand_over(self, link: _Link, sequence: int, report: DeliveryReport) -> None:
        """Give the report to the sink, offering it again a few times while the sink does not
        know its message yet (the receipt can overtake the write that marks it sent), then
        acknowledge the ``deliver_sm``."""
        sink = cast(Callable[[DeliveryReport], Awaitable[object]], self._sink)
        try:
            for pause in (*_UNMATCHED_RETRIES, None):
                if await sink(report) is not False or pause is None:
                    break
                await asyncio.sleep(pause)
        except Exception:
            log.exception("smpp: the receipt sink failed", extra={"provider": self.name})
        if link.usable():
            link.write(DeliverSmResp(sequence_num=sequence).pdu())

    def _remember_parts(self, ids: list[str]) -> None:
        group = _Multipart(ref=ids[0], ids=tuple(ids), waiting=set(ids))
        for message_id in ids:
            self._multipart[message_id] = group
        while len(self._multipart) > _MULTIPART_MEMORY:
            self._multipart.popitem(last=False)

    def _fold_parts(self, report: DeliveryReport) -> DeliveryReport | None:
        """One report per long message: undelivered at its first failed part, delivered when
        every part is; a receipt of a message not sent in parts passes unchanged."""
        group = self._multipart.get(report.provider_ref)
        if group is None:
            return report
        if group.reported:
            return None
        if report.status is MessageStatus.UNDELIVERED:
            group.reported = True
            return DeliveryReport(group.ref, report.status, report.detail)
        if report.status is MessageStatus.DELIVERED:
            group.waiting.discard(report.provider_ref)
            if not group.waiting:
                group.reported = True
                for message_id in group.ids:
                    self._multipart.pop(message_id, None)
                return DeliveryReport(group.ref, report.status, report.detail)
        return None


def _status_name(status: int) -> str:
    name = (
        TRANSIENT_STATUSES.get(status)
        or PERMANENT_STATUSES.get(status)
        or _BIND_STATUSES.get(status)
    )
    return f"{name}, 0x{status:08X}" if name else f"0x{status:08X}"
