"""LabsMobile as an SMS provider, through its SMS JSON API (``POST /json/send``).

Wire format (``/work/shared/reference/labsmobile.md`` §2, LabsMobile JSON API 2.5.2):

* HTTP Basic ``username:token``, ``Content-Type: application/json``, one JSON object::

      {"recipient": [{"msisdn": "34600000000"}], "message": "...", "subid": "<20 hex>",
       "tpoa": "Acme", "ackurl": "https://.../receipts/labsmobile?token=...",
       "ucs2": "1", "long": "1"}

  ``msisdn`` is the E.164 number without ``+``; ``subid`` is :func:`subid_for` of the message
  id (LabsMobile echoes it in delivery reports, so it is the provider reference); ``tpoa`` and
  ``ackurl`` are left out when otpgate has none (the account's default sender applies).
* ``ucs2`` and ``long`` are presence flags. LabsMobile's docs describe them as "present with
  value 1"; its official clients (``labsmobile/sms-php``, ``labsmobile/sms-node``) pass the
  caller's value through unchanged and the community Go SDK (``fsandov/labsmobile-sdk-go``)
  sends the integer ``1``. We send the string ``"1"``, like the rest of LabsMobile's JSON
  examples, which quote every scalar. ``ucs2`` goes with ``encoding == "UCS-2"`` and ``long``
  with more than one segment (both for a long Unicode message).
* Answer ``{"code": "0", "message": "...", "subid": "..."}`` with ``code`` a *string* on
  ``/json/send`` and an *integer* on ``/json/balance``; both spellings are accepted everywhere.

Error translation (DESIGN.md habits 4 and 5): result codes 30 (error while sending) and 35 (no
credit) are transient, every other non-zero code is permanent. HTTP 401/403 are transient (the
route's credentials are wrong: fail over and alert rather than fail the message), HTTP 400 is
permanent, 429, 5xx, any other unexpected status and a connection that cannot be made are
transient. A request that went out and got no answer (a timeout, or a connection dropped before
the answer) raises ``DeliveryTimeout``: LabsMobile may have sent the message, and the dispatcher
sends it at most once more. A 2xx answer that cannot be read is transient too: the worker may
then send once more, which is better than losing a code. No exception or repr ever carries the
message text or the token.

HTTP client: an ``aiohttp.ClientSession``. The send is on the hot path of every verification,
and aiohttp takes several times less CPU per request than httpx did, with the same wire
behaviour: the body is encoded as httpx encodes ``json=`` (compact UTF-8, no NaN), credentials
go in a prebuilt ``Authorization`` header, redirects are not followed, HTTPS verifies against
certifi's CA bundle as httpx does, and proxy settings of the environment are ignored.
``timeout_seconds`` bounds each request as a whole (connection, upload and answer), so a send
does not outlast it by more than aiohttp's rounding of long timeouts up to a whole second; the
connection must be made within the first half of it.
"""

from __future__ import annotations

import base64
import functools
import json
import re
import ssl
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import aiohttp
import certifi
import yarl
from pydantic import SecretStr

from otpgate.adapters.providers.httpapi import json_object
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
    DeliveryError,
    DeliveryTimeout,
    PermanentDeliveryError,
    TransientDeliveryError,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "LabsMobileOptions",
    "LabsMobileSender",
    "from_options",
    "subid_for",
]

DEFAULT_BASE_URL: Final = "https://api.labsmobile.com"

#: LabsMobile refuses a ``subid`` longer than this (result code 28).
SUBID_MAX_LENGTH: Final = 20

#: Value of the ``ucs2`` / ``long`` presence flags in the JSON body (see the module docstring).
FLAG_ON: Final = "1"

#: Result codes worth retrying later or on another route: 30 error while sending, 35 no credit.
TRANSIENT_CODES: Final = frozenset({30, 35})

_DELIVERED: Final = frozenset({"DELIVRD", "READ"})
_UNDELIVERED: Final = frozenset({"UNDELIV", "REJECTD", "EXPIRED", "BLOCKED"})

# Provider messages are short fixed phrases; cap them anyway before they reach an exception.
_MAX_PROVIDER_MESSAGE: Final = 200
# Any word of the SMS text with a digit in it (the code, most likely) is scrubbed from provider
# messages before they are put in an exception, in case a provider ever echoes it.
_TEXT_TOKEN: Final = re.compile(r"\w*\d\w*")

# The body as httpx's ``json=`` writes it: compact, UTF-8, no NaN or infinities.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _Answer(NamedTuple):
    """What the sender keeps of an HTTP answer (read whole before the connection goes back)."""

    status: int
    content: bytes
    retry_after: str


def subid_for(message_id: str) -> str:
    """The ``subid`` (provider reference) of a message: the first 20 characters after the
    ``msg_`` prefix, i.e. 80 of the id's 128 random bits.

    >>> subid_for("msg_0123456789abcdef0123456789abcdef")
    '0123456789abcdef0123'
    """
    ref = message_id.removeprefix("msg_")[:SUBID_MAX_LENGTH]
    if not ref:
        raise ValueError("a message id needs characters after its 'msg_' prefix")
    return ref


class LabsMobileOptions(ProviderOptions):
    """``OTPGATE_LABSMOBILE_USERNAME`` / ``_TOKEN`` / ``_URL``, or ``username`` / ``token`` /
    ``url`` in a ``[providers.NAME]`` table with ``type = "labsmobile"``."""

    username: str = ""
    token: SecretStr = SecretStr("")
    url: str = DEFAULT_BASE_URL


@register("labsmobile", options=LabsMobileOptions)
def from_options(options: LabsMobileOptions, context: ProviderContext) -> LabsMobileSender:
    """The sender for these options; a missing or bad one is named (never its value)."""
    missing = [
        context.setting(option)
        for option, value in (
            ("username", options.username),
            ("token", options.token.get_secret_value()),
        )
        if not value
    ]
    if missing:
        raise ConfigurationError(
            f"provider {context.name!r} (labsmobile) needs {' and '.join(missing)}"
        )
    return LabsMobileSender(
        username=options.username,
        token=options.token.get_secret_value(),
        base_url=context.http_url("url", options.url),
        timeout_seconds=context.timeout_seconds,
        name=context.name,
    )


class LabsMobileSender:
    """``Sender`` (SMS only) and ``ReceiptParser`` for LabsMobile's SMS JSON API.

    The sender owns (and ``aclose`` closes) its ``aiohttp.ClientSession`` unless one is passed
    in; ``timeout_seconds`` applies to every request either way. After ``aclose`` every request
    raises ``TransientDeliveryError``. ``name`` is ``labsmobile`` unless another is given, so
    two LabsMobile accounts can be two providers of one route.
    """

    name = "labsmobile"
    channels = frozenset({Channel.SMS})

    def __init__(
        self,
        *,
        username: str,
        token: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout_seconds: float = 10.0,
        client: aiohttp.ClientSession | None = None,
        name: str = "labsmobile",
    ) -> None:
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigurationError(f"labsmobile: name must match {PROVIDER_NAME.pattern}")
        if not username:
            raise ConfigurationError("labsmobile: username (the account e-mail) is required")
        if not token:
            raise ConfigurationError("labsmobile: token (an API token of the account) is required")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigurationError("labsmobile: base_url must be an http(s) URL")
        if timeout_seconds <= 0:
            raise ConfigurationError("labsmobile: timeout_seconds must be positive")
        self.name = name
        self._username = username
        credentials = base64.b64encode(f"{username}:{token}".encode()).decode("ascii")
        # The token lives only inside these headers; nothing here prints them.
        self._headers = {"Authorization": f"Basic {credentials}"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._base_url = base_url.rstrip("/")
        # Parsed once: aiohttp would otherwise parse the URL text on every request.
        self._urls = {
            path: yarl.URL(f"{self._base_url}{path}") for path in ("/json/send", "/json/balance")
        }
        # Connecting gets half the budget: a connection not made in that time carried nothing,
        # so its failure is a plain transient error. Past it, a request without an answer may
        # have been taken (an unknown outcome, ``DeliveryTimeout``).
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=timeout_seconds / 2)
        # Our own session is made on first use (inside the event loop, as aiohttp wants), so a
        # sender built only to parse receipts (or never used) holds no connection pool.
        self._client = client
        self._owns_client = client is None
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"LabsMobileSender(name={self.name!r}, username={self._username!r}, "
            f"base_url={self._base_url!r})"
        )

    async def __aenter__(self) -> LabsMobileSender:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------------------------
    # Sender

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """POST the message to ``/json/send``; the receipt's ``provider_ref`` is the ``subid``.
        A message of another channel than SMS is refused (``PermanentDeliveryError``)."""
        if message.sms is None:
            raise PermanentDeliveryError(
                f"{self.name}: LabsMobile carries SMS only, not {message.channel.value}"
            )
        subid = subid_for(message.message_id)
        answer = await self._request("POST", "/json/send", body=self._payload(message, subid))
        payload = self._answer(answer, text=message.text)
        self._raise_for_code(payload, text=message.text)
        return SendReceipt(provider_ref=subid)

    async def check(self) -> None:
        """Read the balance (``GET /json/balance``): proves reachability and credentials and
        sends nothing. Raises what ``balance`` raises."""
        await self.balance()

    async def aclose(self) -> None:
        """Close the client this sender made; a client passed in stays open (its owner's)."""
        self._closed = True
        if self._owns_client and self._client is not None:
            await self._client.close()

    # ----------------------------------------------------------------------------------------
    # ReceiptParser

    def parse_receipt(self, params: Mapping[str, str]) -> DeliveryReport | None:
        """Translate the query parameters of LabsMobile's ACK request (``acklevel``, ``status``,
        ``desc``, ``subid``, ``msisdn``, ``timestamp``). ``None`` without a ``subid``."""
        subid = (params.get("subid") or "").strip()
        if not subid:
            return None
        desc = (params.get("desc") or "").strip().upper() or None
        # Without a description, an ``error`` acknowledgement still says the SMS did not arrive.
        failed_without_desc = (
            desc is None and (params.get("acklevel") or "").strip().lower() == "error"
        )
        status: MessageStatus | None
        if desc in _DELIVERED:
            status = MessageStatus.DELIVERED
        elif desc in _UNDELIVERED or failed_without_desc:
            status = MessageStatus.UNDELIVERED
        else:  # UNKNOWN or a value we do not know: the message stays as it is
            status = None
        return DeliveryReport(provider_ref=subid, status=status, detail=desc)

    # ----------------------------------------------------------------------------------------
    # Account

    async def balance(self) -> str:
        """The account's remaining credits as LabsMobile writes them (``"123.45"``).

        Raises the same ``DeliveryError`` subclasses as ``send`` for the same causes."""
        answer = await self._request("GET", "/json/balance")
        payload = self._answer(answer, text="")
        self._raise_for_code(payload, text="")
        credits = payload.get("credits")
        if isinstance(credits, bool) or not isinstance(credits, str | int | float):
            raise TransientDeliveryError("labsmobile: balance answer without credits")
        return str(credits)

    # ----------------------------------------------------------------------------------------
    # Internals

    @staticmethod
    def _payload(message: OutboundMessage, subid: str) -> dict[str, Any]:
        assert message.sms is not None  # send() refuses other channels
        body: dict[str, Any] = {
            "recipient": [{"msisdn": message.to.removeprefix("+")}],
            "message": message.text,
            "subid": subid,
        }
        if message.sms.sender_id is not None:
            body["tpoa"] = message.sms.sender_id
        if message.receipt_url is not None:
            body["ackurl"] = message.receipt_url
        if message.sms.encoding.upper().replace("-", "") == "UCS2":
            body["ucs2"] = FLAG_ON
        if message.sms.segments > 1:
            body["long"] = FLAG_ON
        return body

    async def _request(
        self, method: str, path: str, *, body: dict[str, Any] | None = None
    ) -> _Answer:
        if self._closed:
            raise TransientDeliveryError("labsmobile: the sender is closed")
        if self._client is None:
            self._client = _new_session(https=self._base_url.startswith("https://"))
        data = None if body is None else _JSON.encode(body).encode()
        try:
            async with self._client.request(
                method,
                self._urls[path],
                data=data,
                headers=self._headers if data is None else self._json_headers,
                allow_redirects=False,
                raise_for_status=False,
                timeout=self._timeout,
            ) as response:
                content = await response.read()
                return _Answer(response.status, content, response.headers.get("retry-after", ""))
        # The order matters: aiohttp's timeouts are TimeoutErrors and ClientErrors both, and a
        # connection that was never made is the one failure that certainly sent nothing.
        except aiohttp.ConnectionTimeoutError as exc:
            raise TransientDeliveryError("labsmobile: no connection within the timeout") from exc
        except aiohttp.ClientConnectorError as exc:
            raise TransientDeliveryError(
                f"labsmobile: transport error ({type(exc).__name__})"
            ) from exc
        except TimeoutError as exc:
            raise DeliveryTimeout("labsmobile: no answer within the timeout") from exc
        except aiohttp.ClientError as exc:  # the request may have gone out: outcome unknown
            raise DeliveryTimeout(
                f"labsmobile: no answer, connection lost ({type(exc).__name__})"
            ) from exc

    def _answer(self, answer: _Answer, *, text: str) -> dict[str, Any]:
        """The JSON object of a 2xx answer; other statuses become delivery errors."""
        status = answer.status
        if 200 <= status < 300:
            payload = json_object(answer.content)
            if payload is None:
                raise TransientDeliveryError(f"labsmobile: unreadable answer (HTTP {status})")
            return payload
        if status in (401, 403):
            raise TransientDeliveryError(
                f"labsmobile: credentials refused (HTTP {status}); check username and token"
            )
        if status == 400:
            payload = json_object(answer.content) or {}
            code = _parse_code(payload.get("code"))
            if code is not None:
                raise PermanentDeliveryError(f"{_code_detail(code, payload, text)} (HTTP 400)")
            raise PermanentDeliveryError("labsmobile: request refused (HTTP 400)")
        if status == 429:
            raise TransientDeliveryError(
                "labsmobile: throttled (HTTP 429)", retry_after=_retry_after(answer.retry_after)
            )
        if status >= 500:
            raise TransientDeliveryError(f"labsmobile: server error (HTTP {status})")
        # 404, 405, 3xx...: the route is misconfigured (base_url), not this message.
        raise TransientDeliveryError(f"labsmobile: unexpected answer (HTTP {status})")

    @staticmethod
    def _raise_for_code(payload: Mapping[str, Any], *, text: str) -> None:
        code = _parse_code(payload.get("code"))
        if code is None:
            raise TransientDeliveryError("labsmobile: answer without a result code")
        if code == 0:
            return
        detail = _code_detail(code, payload, text)
        error: DeliveryError
        if code in TRANSIENT_CODES:
            error = TransientDeliveryError(detail)
        else:
            error = PermanentDeliveryError(detail)
        raise error


def _new_session(*, https: bool) -> aiohttp.ClientSession:
    """The sender's own session: certifi's CA bundle for HTTPS, nothing taken from the
    environment (proxies, ``.netrc``), aiohttp's default pool of 100 connections. Answers are
    small JSON, so no compression is asked for and none is undone."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=_tls_context() if https else True),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


def _parse_code(value: object) -> int | None:
    """LabsMobile's result code: ``"0"`` on ``/json/send``, ``0`` on ``/json/balance``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.isdecimal():
            return int(stripped)
    return None


def _code_detail(code: int, payload: Mapping[str, Any], text: str) -> str:
    message = _provider_message(payload, text)
    return f"labsmobile code {code}: {message}" if message else f"labsmobile code {code}"


def _provider_message(payload: Mapping[str, Any], text: str) -> str:
    """The provider's ``message``, shortened and with anything from the SMS text scrubbed."""
    message = payload.get("message")
    if not isinstance(message, str):
        return ""
    message = " ".join(message.split())[:_MAX_PROVIDER_MESSAGE]
    if text:
        if text in message:
            message = message.replace(text, "[message text]")
        for token in sorted(set(_TEXT_TOKEN.findall(text)), key=len, reverse=True):
            if len(token) >= 4:
                message = message.replace(token, "[redacted]")
    return message


def _retry_after(header: str) -> float | None:
    value = header.strip()
    return float(value) if value.isdecimal() else None
