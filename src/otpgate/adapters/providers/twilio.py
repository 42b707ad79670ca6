"""Twilio as an SMS provider (Messaging) and a voice provider (Programmable Voice).

Wire format (Twilio REST API 2010-04-01, ``https://api.twilio.com``):

* HTTP Basic ``AccountSid:AuthToken``; requests are ``application/x-www-form-urlencoded``;
  answers are JSON because every path ends in ``.json``.
* SMS: ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json`` with ``To`` (E.164), ``Body``,
  ``From`` (a number or alphanumeric sender of the account) or ``MessagingServiceSid`` (then
  Twilio picks the sender), and ``StatusCallback`` (our receipt URL). Answer ``201`` with the
  Message resource: ``{"sid": "SM…", "status": "queued" | "accepted", …}``.
* Voice: ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` with ``To``, ``From`` (a number
  of the account: a call needs one, so without ``from`` the provider carries SMS only),
  ``Twiml`` (the instructions inline, at most 4,000 characters) and ``StatusCallback``.
  Answer ``201`` with the Call resource ``{"sid": "CA…", "status": "queued", …}``. The TwiML is
  ``<Response><Say language="…">TEXT</Say></Response>``: the text is composed by otpgate's
  voice template (the code's digits spaced, said twice); this module only escapes it and picks
  the ``<Say>`` language from the message's locale (:func:`say_language`).
* Errors: ``4xx``/``5xx`` with ``{"code": 21211, "message": "…", "more_info": "…",
  "status": 400}``.
* ``check``: ``GET /2010-04-01/Accounts/{AccountSid}.json`` (the account itself: proves the
  URL and the credentials, sends nothing).
* Status callbacks: Twilio POSTs form fields to ``StatusCallback``: ``MessageSid`` /
  ``MessageStatus`` (``queued``, ``sent``, ``delivered``, ``undelivered``, ``failed``, …,
  with ``ErrorCode``) for messages, ``CallSid`` / ``CallStatus`` (``completed``, ``busy``,
  ``no-answer``, ``failed``, ``canceled``) for calls, signed in ``X-Twilio-Signature``: base64
  HMAC-SHA1, keyed with the auth token, of the URL Twilio called followed by every POST field
  name and value in name order. :meth:`TwilioSender.authenticate_receipt` checks it with the
  ``twilio`` library's ``RequestValidator``. Webhooks signed with a SharedKey (Twilio's
  "webhook rules") are not supported: their signature does not verify and they are refused.

Error translation (the dispatcher fails a message on ``PermanentDeliveryError`` and moves to
the next provider on ``TransientDeliveryError``, so only what is wrong with *this message*
is permanent; what is wrong with this account or route fails over):

=====================================================  =========================================
Twilio answer                                          otpgate
=====================================================  =========================================
201 with a ``sid``                                     sent; ``provider_ref`` = the SID
2xx without a readable ``sid``                         ``DeliveryTimeout`` (Twilio probably took
                                                       it: sent at most once more)
400 code 21211 invalid To, 21217 invalid number        ``PermanentDeliveryError``
(calls), 21610 unsubscribed (STOP), 21612 To not
reachable, 21614 To not a mobile, 21617 body too
long, 21602 empty body, 21635 To not voice capable
400 code 21408 / 21215 no geographic permission for    ``TransientDeliveryError`` (this account
the region, 21606 / 21212 / 21603 From not usable,     or its settings, not the number)
21608 unverified To on a trial account, 21611
queue full, 21701 / 21703 / 21704 / 21705
Messaging Service problems, 20003 auth
400 with another code or none                          ``PermanentDeliveryError``
401, 403 (20003 authentication)                        ``TransientDeliveryError``
404 (20404: wrong account SID or URL)                  ``TransientDeliveryError``
429 (20429 too many requests)                          ``TransientDeliveryError`` + Retry-After
5xx, any other status                                  ``TransientDeliveryError``
no connection; connection refused                      ``TransientDeliveryError``
request sent, no answer / connection lost              ``DeliveryTimeout``
=====================================================  =========================================

No exception, log line or repr carries the auth token, the message text or the code.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any, Final
from xml.sax.saxutils import escape, quoteattr

from pydantic import ConfigDict, Field, SecretStr
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

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

__all__ = [
    "DEFAULT_BASE_URL",
    "TwilioOptions",
    "TwilioSender",
    "from_options",
    "say_language",
    "twiml_say",
]

DEFAULT_BASE_URL: Final = "https://api.twilio.com"
API_VERSION: Final = "2010-04-01"
ACCOUNT_SID: Final = re.compile(r"AC[0-9a-fA-F]{32}")
SERVICE_SID: Final = re.compile(r"MG[0-9a-fA-F]{32}")
#: Twilio refuses an inline ``Twiml`` longer than this.
MAX_TWIML: Final = 4000

#: HTTP 400 codes that say this account or its settings cannot send it: another route may.
ROUTE_CODES: Final = frozenset(
    {20003, 21212, 21215, 21408, 21603, 21606, 21608, 21611, 21701, 21703, 21704, 21705}
)

#: ``<Say>`` languages of Twilio's text-to-speech for otpgate's template locales, by locale
#: (exact) or by language (the first subtag).
SAY_LANGUAGES: Final[Mapping[str, str]] = {
    "en": "en-US",
    "en-us": "en-US",
    "en-gb": "en-GB",
    "en-au": "en-AU",
    "en-in": "en-IN",
    "es": "es-ES",
    "es-es": "es-ES",
    "es-mx": "es-MX",
    "es-us": "es-US",
    "fr": "fr-FR",
    "fr-fr": "fr-FR",
    "fr-ca": "fr-CA",
    "de": "de-DE",
    "de-de": "de-DE",
    "it": "it-IT",
    "it-it": "it-IT",
    "pt": "pt-PT",
    "pt-pt": "pt-PT",
    "pt-br": "pt-BR",
    "ca": "ca-ES",
    "ca-es": "ca-ES",
    "nl": "nl-NL",
    "nl-nl": "nl-NL",
}
DEFAULT_SAY_LANGUAGE: Final = "en-US"

#: How the SIDs of what ``send`` creates begin: an SMS (or MMS) Message, a Call.
_MESSAGE_SIDS: Final[tuple[str, ...]] = ("SM", "MM")
_CALL_SIDS: Final[tuple[str, ...]] = ("CA",)
_DELIVERED: Final = frozenset({"delivered", "read"})
_MESSAGE_FAILED: Final = frozenset({"undelivered", "failed", "canceled"})
_CALL_FAILED: Final = frozenset({"busy", "no-answer", "failed", "canceled"})
# Characters XML 1.0 cannot carry at all (escaping does not help): C0 controls but tab, LF, CR.
_NOT_XML: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class TwilioOptions(ProviderOptions):
    """``OTPGATE_TWILIO_ACCOUNT_SID`` / ``_AUTH_TOKEN`` / ``_FROM`` / ``_MESSAGING_SERVICE_SID``
    / ``_URL``, or ``account_sid`` / ``auth_token`` / ``from`` / ``messaging_service_sid`` /
    ``url`` in a ``[providers.NAME]`` table with ``type = "twilio"``."""

    model_config = ConfigDict(populate_by_name=False)  # "from" only, as the docs name it

    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")
    #: The caller number (voice) and SMS sender: a number or sender id of the account.
    from_: str = Field(default="", alias="from")
    #: SMS through a Messaging Service (Twilio picks the sender from its pool).
    messaging_service_sid: str = ""
    url: str = DEFAULT_BASE_URL


@register("twilio", options=TwilioOptions, env={"from_": "twilio_from"})
def from_options(options: TwilioOptions, context: ProviderContext) -> TwilioSender:
    """The sender for these options; a missing or malformed one is named (never its value)."""

    def setting(option: str) -> str:
        # ``from`` is a Python keyword: the field is ``from_``, the operator writes ``from``.
        named = context.setting_names.get(option) or context.setting_names.get(f"{option}_")
        return (named or context.setting(option)).replace(".from_ ", ".from ")

    missing = [
        setting(option)
        for option, value in (
            ("account_sid", options.account_sid),
            ("auth_token", options.auth_token.get_secret_value()),
        )
        if not value
    ]
    if missing:
        raise ConfigurationError(
            f"provider {context.name!r} (twilio) needs {' and '.join(missing)}"
        )
    if not ACCOUNT_SID.fullmatch(options.account_sid):
        raise ConfigurationError(
            f"{setting('account_sid')} must be a Twilio account SID (AC and 32 hex digits)"
        )
    if not options.from_ and not options.messaging_service_sid:
        raise ConfigurationError(
            f"provider {context.name!r} (twilio) needs {setting('from')} "
            f"or {setting('messaging_service_sid')}"
        )
    if options.messaging_service_sid and not SERVICE_SID.fullmatch(options.messaging_service_sid):
        raise ConfigurationError(
            f"{setting('messaging_service_sid')} must be a Messaging Service SID "
            "(MG and 32 hex digits)"
        )
    return TwilioSender(
        account_sid=options.account_sid,
        auth_token=options.auth_token.get_secret_value(),
        from_=options.from_,
        messaging_service_sid=options.messaging_service_sid,
        base_url=context.http_url("url", options.url),
        timeout_seconds=context.timeout_seconds,
        name=context.name,
    )


def say_language(locale: str) -> str:
    """The ``<Say language>`` for a locale (``es`` → ``es-ES``, ``pt-BR`` → ``pt-BR``); the
    language's default region when the region is not one Twilio speaks, ``en-US`` for a
    language otpgate has no voice template for."""
    key = locale.strip().replace("_", "-").lower()
    return SAY_LANGUAGES.get(key) or SAY_LANGUAGES.get(key.split("-", 1)[0]) or DEFAULT_SAY_LANGUAGE


def twiml_say(text: str, locale: str) -> str:
    """The TwiML document that reads ``text`` aloud in ``locale``'s language, XML-escaped."""
    spoken = escape(_NOT_XML.sub(" ", text))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Response><Say language={quoteattr(say_language(locale))}>{spoken}</Say></Response>"
    )


class TwilioSender:
    """``Sender`` (SMS, and voice when a ``from`` number is set), ``ReceiptParser`` and
    ``ReceiptAuthenticator`` for Twilio's REST API.

    The sender owns (and ``aclose`` closes) its HTTP session; ``timeout_seconds`` bounds
    every request. ``name`` is ``twilio`` unless another is given."""

    name = "twilio"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_: str = "",
        messaging_service_sid: str = "",
        base_url: str = DEFAULT_BASE_URL,
        timeout_seconds: float = 10.0,
        name: str = "twilio",
    ) -> None:
        if not PROVIDER_NAME.fullmatch(name):
            raise ConfigurationError(f"twilio: name must match {PROVIDER_NAME.pattern}")
        if not ACCOUNT_SID.fullmatch(account_sid):
            raise ConfigurationError("twilio: account_sid must be AC and 32 hex digits")
        if not auth_token:
            raise ConfigurationError("twilio: auth_token is required")
        if not from_ and not messaging_service_sid:
            raise ConfigurationError("twilio: from or messaging_service_sid is required")
        if timeout_seconds <= 0:
            raise ConfigurationError("twilio: timeout_seconds must be positive")
        self.name = name
        self.channels = frozenset({Channel.SMS, Channel.VOICE} if from_ else {Channel.SMS})
        self._account_sid = account_sid
        self._from = from_
        self._service_sid = messaging_service_sid
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
        # The token lives only inside this header and the validator; nothing here prints them.
        self._headers = {"Authorization": f"Basic {credentials}", "Accept": "application/json"}
        self._validator = RequestValidator(auth_token)
        self._http = HttpApi(provider=name, base_url=base_url, timeout_seconds=timeout_seconds)
        account = f"/{API_VERSION}/Accounts/{account_sid}"
        self._urls = {
            "account": self._http.url(f"{account}.json"),
            "messages": self._http.url(f"{account}/Messages.json"),
            "calls": self._http.url(f"{account}/Calls.json"),
        }

    def __repr__(self) -> str:
        return (
            f"TwilioSender(name={self.name!r}, account_sid={self._account_sid!r}, "
            f"base_url={self._http.base_url!r})"
        )

    # ----------------------------------------------------------------------------------------
    # Sender

    async def send(self, message: OutboundMessage) -> SendReceipt:
        """Create a Message (SMS) or a Call (voice); ``provider_ref`` is its SID."""
        if message.channel is Channel.SMS:
            form = {"To": message.to, "Body": message.text}
            if self._service_sid:
                form["MessagingServiceSid"] = self._service_sid
            else:
                form["From"] = self._from
            url, kinds = self._urls["messages"], _MESSAGE_SIDS
        elif message.channel is Channel.VOICE and Channel.VOICE in self.channels:
            twiml = twiml_say(message.text, message.locale)
            if len(twiml) > MAX_TWIML:
                raise PermanentDeliveryError(
                    f"{self.name}: the voice text is too long for inline TwiML"
                )
            form = {"To": message.to, "From": self._from, "Twiml": twiml}
            url, kinds = self._urls["calls"], _CALL_SIDS
        else:
            raise PermanentDeliveryError(
                f"{self.name}: this Twilio provider does not carry {message.channel.value}"
            )
        if message.receipt_url is not None:
            form["StatusCallback"] = message.receipt_url
        answer = await self._http.request("POST", url, headers=self._headers, form=form)
        payload = self._payload(answer, text=message.text)
        sid = payload.get("sid")
        if not isinstance(sid, str) or not sid.startswith(kinds):
            raise DeliveryTimeout(f"{self.name}: answer without a SID (HTTP {answer.status})")
        return SendReceipt(provider_ref=sid)

    async def check(self) -> None:
        """Read the account resource: proves the URL and the credentials, sends nothing."""
        answer = await self._http.request("GET", self._urls["account"], headers=self._headers)
        self._payload(answer, text="")

    async def aclose(self) -> None:
        await self._http.aclose()

    # ----------------------------------------------------------------------------------------
    # ReceiptParser, ReceiptAuthenticator

    def parse_receipt(self, params: Mapping[str, str]) -> DeliveryReport | None:
        """A message (``MessageSid``/``MessageStatus``, or the older ``SmsSid``/``SmsStatus``)
        or call (``CallSid``/``CallStatus``) status callback; ``None`` without a SID."""
        sid = (params.get("MessageSid") or params.get("SmsSid") or "").strip()
        if sid:
            state = (params.get("MessageStatus") or params.get("SmsStatus") or "").strip().lower()
            failed = _MESSAGE_FAILED
        else:
            sid = (params.get("CallSid") or "").strip()
            if not sid:
                return None
            state = (params.get("CallStatus") or "").strip().lower()
            failed = _CALL_FAILED
        status: MessageStatus | None
        if state in _DELIVERED or (failed is _CALL_FAILED and state == "completed"):
            status = MessageStatus.DELIVERED
        elif state in failed:
            status = MessageStatus.UNDELIVERED
        else:  # queued, sent, ringing, in-progress…: nothing changes yet
            status = None
        error_code = (params.get("ErrorCode") or "").strip()
        detail = state or None
        if detail is not None and error_code.isdecimal() and error_code != "0":
            detail = f"{detail} (error {error_code})"
        return DeliveryReport(provider_ref=sid, status=status, detail=detail)

    def authenticate_receipt(
        self, url: str, params: Mapping[str, str], headers: Mapping[str, str]
    ) -> bool:
        """True when ``X-Twilio-Signature`` is the auth token's signature of ``url`` (as
        Twilio called it, query included) and the POST fields ``params``."""
        signature = headers.get("x-twilio-signature", "")
        if not signature:
            return False
        valid: bool = self._validator.validate(url, dict(params), signature)
        return valid

    # ----------------------------------------------------------------------------------------
    # Internals

    def _payload(self, answer: Answer, *, text: str) -> dict[str, Any]:
        """The JSON object of a 2xx answer; any other answer raises its delivery error."""
        status = answer.status
        if 200 <= status < 300:
            payload = json_object(answer.content)
            if payload is None:
                raise DeliveryTimeout(f"{self.name}: unreadable answer (HTTP {status})")
            return payload
        body = json_object(answer.content) or {}
        code = body.get("code")
        code = code if isinstance(code, int) and not isinstance(code, bool) else None
        message = provider_message(body.get("message"), text)
        detail = f"{self.name}: HTTP {status}"
        if code is not None:
            detail += f", Twilio error {code}"
        if message:
            detail += f": {message}"
        error: DeliveryError
        if status == 400 and code not in ROUTE_CODES:
            error = PermanentDeliveryError(detail)
        elif status == 429:
            error = TransientDeliveryError(
                detail, retry_after=retry_after_seconds(answer.retry_after)
            )
        else:  # 401/403 credentials, 404 account or URL, 5xx, route codes: fail over
            error = TransientDeliveryError(detail)
        raise error
