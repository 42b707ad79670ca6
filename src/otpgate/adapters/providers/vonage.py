"""Vonage (formerly Nexmo) as an SMS provider, through its SMS API.

Wire format (Vonage SMS API, ``https://rest.nexmo.com``):

* ``POST /sms/json``, ``application/x-www-form-urlencoded``, credentials in the body:
  ``api_key``, ``api_secret``, ``from`` (an alphanumeric sender of up to 11 characters or a
  number), ``to`` (the E.164 number without ``+``), ``text``, ``type=unicode`` when the text
  needs UCS-2 (``text``, GSM-7, is the default and is not sent), ``client-ref`` (our
  reference, echoed in delivery receipts) and ``callback`` (our receipt URL). Vonage splits a
  long text itself.
* The answer is HTTP 200 whatever happened: ``{"message-count": "1", "messages": [{"status":
  "0", "message-id": "…", "to": "…", "remaining-balance": "…", "message-price": "…",
  "network": "…"}]}``, one object per part; a refusal has a non-zero ``status`` and an
  ``error-text``.
* ``check``: ``GET /account/get-balance?api_key=…&api_secret=…`` (``{"value": 10.28,
  "autoReload": false}``; 401 for wrong credentials): proves reachability and credentials and
  sends nothing.
* Delivery receipts: Vonage calls ``callback`` (GET with query parameters by default; POST,
  form or JSON, if the account is set so) with ``messageId``, ``msisdn``, ``to``,
  ``network-code``, ``price``, ``status`` (``delivered``, ``expired``, ``failed``,
  ``rejected``, ``accepted``, ``buffered``, ``unknown``), ``err-code``, ``scts``,
  ``message-timestamp`` and ``client-ref``. Vonage can sign receipts (``sig`` with a
  signature secret), but that is an account-wide setting with a secret of its own; otpgate
  authenticates them instead by the secret token its receipt URL carries, as it does for every
  provider, and ignores ``sig``.

``provider_ref`` is the ``client-ref`` we sent (the message id), not Vonage's ``message-id``:
a long text has one ``message-id`` per part, and every part's receipt carries the same
``client-ref``.

Status codes (Vonage's "SMS API error codes"), classified by whether another attempt or
another provider can help (the dispatcher fails a message on ``PermanentDeliveryError``):

======  =============================  ===========================================================
status  meaning                        otpgate
======  =============================  ===========================================================
0       success                        sent
1       throttled                      ``TransientDeliveryError`` (retry later)
2       missing parameters             ``PermanentDeliveryError`` (the same request would be too)
3       invalid parameters             ``PermanentDeliveryError``
4       invalid credentials            ``TransientDeliveryError`` (this route; fail over)
5       internal error                 ``TransientDeliveryError``
6       invalid message                ``PermanentDeliveryError`` (e.g. unknown number prefix)
7       number barred                  ``PermanentDeliveryError``
8       partner account barred         ``TransientDeliveryError`` (account suspended)
9       partner quota violation        ``TransientDeliveryError`` (no credit)
10      too many existing binds        ``TransientDeliveryError``
11      account not enabled for HTTP   ``TransientDeliveryError`` (this route)
12      message too long               ``PermanentDeliveryError``
14      invalid signature              ``TransientDeliveryError`` (this route)
15      invalid sender address         ``PermanentDeliveryError``
22      invalid network code           ``PermanentDeliveryError``
23      invalid callback URL           ``TransientDeliveryError`` (otpgate's public URL)
29      non-whitelisted destination    ``PermanentDeliveryError`` (a demo account's limit)
32      signature and secret given     ``TransientDeliveryError`` (this route)
33      number de-activated            ``PermanentDeliveryError``
other   (not documented)               ``TransientDeliveryError``
======  =============================  ===========================================================

HTTP statuses other than 200 (429, 5xx, 401, …) and transport failures are translated as for
every HTTP provider (:mod:`otpgate.adapters.providers.httpapi`): transient, or
``DeliveryTimeout`` when the request went out and no answer came.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from pydantic import ConfigDict, Field, SecretStr

from otpgate.adapters.providers.httpapi import (
    Answer,
    HttpApi,
    json_object,
    provider_message,
    retry_after_seconds,
)
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

__all__ = ["DEFAULT_BASE_URL", "VonageOptions", "VonageSender", "from_options"]

DEFAULT_BASE_URL: Final = "https://rest.nexmo.com"
#: Vonage refuses a longer ``client-ref``.
MAX_CLIENT_REF: Final = 100

#: Status codes that no later attempt on any route can change (see the module docstring).
PERMANENT_STATUSES: Final = frozenset({2, 3, 6, 7, 12, 15, 22, 29, 33})

_DELIVERED: Final = frozenset({"delivered"})
_UNDELIVERED: Final = frozenset({"expired", "failed", "rejected"})


class VonageOptions(ProviderOptions):
    """``OTPGATE_VONAGE_API_KEY`` / ``_API_SECRET`` / ``_FROM`` / ``_URL``, or ``api_key`` /
    ``api_secret`` / ``from`` / ``url`` in a ``[providers.NAME]`` table with
    ``type = "vonage"``."""

    model_config = ConfigDict(populate_by_name=False)  # "from" only, as the docs name it

    api_key: str = ""
    api_secret: SecretStr = SecretStr("")
    #: The sender when the service sets none (Vonage needs one on every message).
    from_: str = Field(default="", alias="from")
    url: str = DEFAULT_BASE_URL


@register("vonage", options=VonageOptions, env={"from_": "vonage_from"})
def from_options(options: VonageOptions, context: ProviderContext) -> VonageSender:
    """The sender for these options; a missing or malformed one is named (never its value)."""
    missing = [
        context.setting(option)
        for option, value in (
            ("api_key", options.api_key),
            ("api_secret", options.api_secret.get_secret_value()),
        )
        if not value
    ]
    if missing:
        raise ConfigurationError(
            f"provider {context.name!r} (vonage) needs {' and '.join(missing)}"
        )
    return VonageSender(
        api_key=options.api_key,
        api_secret=options.api_secret.get_secret_value(),
        from_=options.from_,
        base_url=context.http_url("url", options.url),
        timeout_seconds=context.timeout_seconds,
        name=context.name,
    )


class VonageSender:
    """``Sender`` (SMS only) and ``ReceiptParser`` for Vonage's SMS API."""

    name = "vonage"
    channels = frozenset({Channel.SMS})

    def __init__(
        self,
        *,
        api_key: str,
        api_secret: str,
        from_: str = "",
        base_url: str = DEFAULT_BASE_URL,
        timeout_seconds: float = 10.0,
        name: str = "vonage",
    ) -> None:
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigurationError(f"vonage: name must match {PROVIDER_NAME.pattern}")
        if not api_key or not api_secret:
            raise ConfigurationError("vonage: api_key and api_secret are required")
        if timeout_seconds <= 0:
            raise ConfigurationError("vonage: timeout_seconds must be positive")
        self.name = name
        self._api_key = api_key
        # The secret lives only in this mapping, which nothing prints.
        self._credentials = {"api_key": api_key, "api_secret": api_secret}
        self._from = from_
        self._http = HttpApi(provider=name, base_url=base_url, timeout_seconds=timeout_seconds)
        self._urls = {
            "send": self._http.url("/sms/json"),
            "balance": self._http.url("/account/get-balance"),
        }
        self._headers = {"Accept": "application/json"}

    def __repr__(self) -> str:
        return (
            f"VonageSender(name={self.name!r}, api_key={self._api_key!r}, "
            f"base_url={self._http.base_url!r})"
        )

    # ----------------------------------------------------------------------------------------
    # Sender

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """POST the message to ``/sms/json``; ``provider_ref`` is the ``client-ref`` sent."""
        if message.sms is None:
            raise PermanentDeliveryError(
                f"{self.name}: Vonage's SMS API carries SMS only, not {message.channel.value}"
            )
        sender = message.sms.sender_id or self._from
        if not sender:
            # Not this message's fault: another provider (or a configured sender) can send it.
            raise TransientDeliveryError(
                f"{self.name}: no sender: the service has no sender id and the provider no from"
            )
        reference = message.message_id[:MAX_CLIENT_REF]
        form = {
            **self._credentials,
            "from": sender,
            "to": message.to.removeprefix("+"),
            "text": message.text,
            "client-ref": reference,
        }
        if message.sms.encoding.upper().replace("-", "") == "UCS2":
            form["type"] = "unicode"
        if message.receipt_url is not None:
            form["callback"] = message.receipt_url
        answer = await self._http.request(
            "POST", self._urls["send"], headers=self._headers, form=form
        )
        payload = self._payload(answer)
        parts = payload.get("messages")
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            raise DeliveryTimeout(f"{self.name}: answer without messages (HTTP {answer.status})")
        # One object per part; the first refusal decides (Vonage sends none of a refused text).
        for part in parts:
            status = _status(part.get("status"))
            if status is None:
                raise DeliveryTimeout(f"{self.name}: answer without a status")
            if status != 0:
                raise _refusal(self.name, status, part.get("error-text"), message.text)
        return SendReceipt(provider_ref=reference)

    async def check(self) -> None:
        """Read the account balance: proves reachability and credentials, sends nothing."""
        answer = await self._http.request(
            "GET", self._urls["balance"], headers=self._headers, params=self._credentials
        )
        payload = self._payload(answer)
        if "value" not in payload:
            raise TransientDeliveryError(f"{self.name}: balance answer without a value")

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------------------------------
    # ReceiptParser

    def parse_receipt(self, params: Mapping[str, str]) -> DeliveryReport | None:
        """A delivery receipt's parameters; ``None`` without a ``client-ref`` (a message
        otpgate did not send, or sent without one)."""
        reference = (params.get("client-ref") or "").strip()
        if not reference:
            return None
        state = (params.get("status") or "").strip().lower()
        status: MessageStatus | None
        if state in _DELIVERED:
            status = MessageStatus.DELIVERED
        elif state in _UNDELIVERED:
            status = MessageStatus.UNDELIVERED
        else:  # accepted, buffered, unknown: nothing changes yet
            status = None
        error_code = (params.get("err-code") or "").strip()
        detail = state or None
        if detail is not None and error_code.isdecimal() and error_code != "0":
            detail = f"{detail} (err-code {error_code})"
        return DeliveryReport(provider_ref=reference, status=status, detail=detail)

    # ----------------------------------------------------------------------------------------
    # Internals

    def _payload(self, answer: Answer) -> dict[str, Any]:
        status = answer.status
        if status == 200:
            payload = json_object(answer.content)
            if payload is None:
                raise DeliveryTimeout(f"{self.name}: unreadable answer (HTTP {status})")
            return payload
        if status in (401, 403):
            raise TransientDeliveryError(
                f"{self.name}: credentials refused (HTTP {status}); check api_key and api_secret"
            )
        if status == 429:
            raise TransientDeliveryError(
                f"{self.name}: throttled (HTTP 429)",
                retry_after=retry_after_seconds(answer.retry_after),
            )
        raise TransientDeliveryError(f"{self.name}: unexpected answer (HTTP {status})")


def _status(value: object) -> int | None:
    """Vonage writes ``status`` as a string of digits (``"0"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value.strip())
    return None


def _refusal(provider: str, status: int, text: object, sent: str) -> DeliveryError:
    message = provider_message(text, sent)
    detail = f"{provider}: status {status}"
    if message:
        detail += f": {message}"
    if status in PERMANENT_STATUSES:
        return PermanentDeliveryError(detail)
    return TransientDeliveryError(detail)
