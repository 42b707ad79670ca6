"""A loopback stub of Twilio's REST API (Messages, Calls, the Account), faithful to its
documentation, and of Twilio's signed status callbacks.

What it checks, as Twilio does:

* HTTP Basic ``AccountSid:AuthToken``: missing or wrong → 401 with error 20003; the account in
  the path must be the authenticated one → 404 with error 20404.
* ``POST …/Messages.json`` (form-encoded): ``To`` required (21604) and E.164 (21211);
  ``From`` or ``MessagingServiceSid`` required (21603); ``From`` must be one of the account's
  senders (21212), ``MessagingServiceSid`` one of its services (21701); ``Body`` required and
  not empty (21602), at most 1,600 characters (21617); ``StatusCallback`` an http(s) URL
  (21609). Answer ``201`` with the Message resource (``sid`` ``SM`` + 32 hex, ``status``
  ``queued``, or ``accepted`` through a Messaging Service).
* ``POST …/Calls.json``: ``To`` required (21201) and E.164 (21211); ``From`` required (21213)
  and one of the account's numbers (21210); exactly one of ``Url`` or ``Twiml`` (21205);
  ``Twiml`` at most 4,000 characters and well-formed XML with a ``<Response>`` root
  (12100, "Document parse failure": the code Twilio gives a TwiML it cannot parse).
  Answer ``201`` with the Call resource (``sid`` ``CA`` + 32 hex, ``status`` ``queued``).
* ``GET …/Accounts/{Sid}.json``: the Account resource.
* Errors are ``{"code", "message", "more_info", "status"}`` with the HTTP status in
  ``status``.

Conventions of this stub (Twilio's docs do not say): unknown form fields are ignored and
recorded; a ``Content-Type`` other than form-encoded reads as an empty form.

Status callbacks (:meth:`TwilioStub.callback_request`, :meth:`deliver_callback`) are the
form fields Twilio documents for messages (``MessageSid``, ``SmsSid``, ``MessageStatus``,
``SmsStatus``, ``AccountSid``, ``From``, ``To``, ``ApiVersion``, ``ErrorCode``) and for
calls (``CallSid``, ``CallStatus``, ``AccountSid``, ``From``, ``To``, ``Direction``,
``ApiVersion``, ``CallDuration``, …), signed in ``X-Twilio-Signature`` with the ``twilio``
library's own ``RequestValidator.compute_signature`` over the callback URL and the fields.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import re
import secrets
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from tests.support.labsmobile_stub import ThreadedServer

__all__ = ["RecordedCall", "RecordedMessage", "TwilioStub"]

API = "2010-04-01"
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
MAX_BODY = 1600
MAX_TWIML = 4000
ERROR_MESSAGES = {
    12100: "Document parse failure",
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    21201: "No 'To' number is specified",
    21205: "Url parameter is required",
    21210: "'From' phone number not verified",
    21211: "Invalid 'To' Phone Number",
    21212: "Invalid From Number (caller ID)",
    21213: "'From' phone number is required",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the "
    "'To' number",
    21602: "Message body is required",
    21603: "A 'From' or 'MessagingServiceSid' parameter is required to send a message",
    21604: "A 'To' phone number is required",
    21609: "Invalid StatusCallback url",
    21610: "Attempt to send to unsubscribed recipient",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit",
    21701: "The Messaging Service does not exist",
}


def _error(code: int, status: int = 400, message: str | None = None) -> JSONResponse:
    return JSONResponse(
        {
            "code": code,
            "message": message or ERROR_MESSAGES.get(code, "Error"),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )


def _now() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    sid: str
    form: dict[str, str]
    headers: dict[str, str]

    @property
    def body(self) -> str:
        return self.form["Body"]

    @property
    def status_callback(self) -> str | None:
        return self.form.get("StatusCallback") or None


@dataclass(frozen=True, slots=True)
class RecordedCall:
    sid: str
    form: dict[str, str]
    headers: dict[str, str]
    #: What the ``<Say>`` verbs of the TwiML read, and their ``language``.
    said: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def status_callback(self) -> str | None:
        return self.form.get("StatusCallback") or None


class TwilioStub:
    """Twilio's Messages, Calls and Account resources on 127.0.0.1.

    Knobs (safe from any thread): :meth:`fail_next` (a Twilio error code with its HTTP status
    to the next ``n`` valid creations), :meth:`http_status_next` (a bare 5xx/429… to the next
    ``n`` authenticated requests, any endpoint, with Twilio's error body), ``delay_seconds``
    (wait before answering: a hanging Twilio), :meth:`reset`.
    """

    def __init__(
        self,
        *,
        account_sid: str | None = None,
        auth_token: str | None = None,
        numbers: tuple[str, ...] = ("+15005550006",),
        senders: tuple[str, ...] = ("Acme",),
        services: tuple[str, ...] = (),
    ) -> None:
        self.account_sid = account_sid or "AC" + secrets.token_hex(16)
        self.auth_token = auth_token or secrets.token_hex(16)
        self.numbers = numbers
        self.senders = senders
        self.services = services or ("MG" + secrets.token_hex(16),)
        self.delay_seconds = 0.0
        self._cond = threading.Condition()
        self._messages: list[RecordedMessage] = []
        self._calls: list[RecordedCall] = []
        self._failures: collections.deque[tuple[int, int]] = collections.deque()
        self._statuses: collections.deque[int] = collections.deque()
        self._stopping = threading.Event()
        self._generation = 0
        #: Authenticated creation requests that arrived (answered or not).
        self.arrivals = 0
        base = "/2010-04-01/Accounts/{sid}"
        self.app = Starlette(
            routes=[
                Route(base + "/Messages.json", self._create_message, methods=["POST"]),
                Route(base + "/Calls.json", self._create_call, methods=["POST"]),
                Route(base + ".json", self._account, methods=["GET"]),
            ]
        )
        self._runner = ThreadedServer(self.app, name="twilio-stub")

    def __repr__(self) -> str:
        return f"TwilioStub(account_sid={self.account_sid!r})"

    # ----------------------------------------------------------------------------------------
    # Life cycle

    @property
    def url(self) -> str:
        return self._runner.url

    def start(self) -> TwilioStub:
        self._stopping.clear()
        self._runner.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._runner.stop()

    def __enter__(self) -> TwilioStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------
    # Knobs and records

    def fail_next(self, n: int, code: int, status: int = 400) -> None:
        """Answer Twilio error ``code`` with HTTP ``status`` to the next ``n`` valid creations."""
        with self._cond:
            self._failures.extend([(code, status)] * n)

    def http_status_next(self, n: int, status: int) -> None:
        """Answer HTTP ``status`` (with Twilio's error body) to the next ``n`` authenticated
        requests of any endpoint."""
        with self._cond:
            self._statuses.extend([status] * n)

    def reset(self) -> None:
        with self._cond:
            self._generation += 1
            self._messages.clear()
            self._calls.clear()
            self._failures.clear()
            self._statuses.clear()
            self.delay_seconds = 0.0
            self.arrivals = 0

    @property
    def messages(self) -> list[RecordedMessage]:
        with self._cond:
            return list(self._messages)

    @property
    def calls(self) -> list[RecordedCall]:
        with self._cond:
            return list(self._calls)

    def find(self, sid: str) -> RecordedMessage | RecordedCall:
        with self._cond:
            for item in [*self._messages, *self._calls]:
                if item.sid == sid:
                    return item
        raise KeyError(sid)

    # ----------------------------------------------------------------------------------------
    # Status callbacks

    def callback_request(
        self, sid: str, status: str, *, error_code: str | None = None
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        """The status callback Twilio would POST for ``sid``: the URL (the ``StatusCallback``
        given), the form fields and the headers, ``X-Twilio-Signature`` included."""
        item = self.find(sid)
        url = item.status_callback
        if url is None:
            raise ValueError(f"{sid} was created without a StatusCallback")
        common = {
            "AccountSid": self.account_sid,
            "ApiVersion": API,
            "From": item.form.get("From", self.numbers[0]),
            "To": item.form["To"],
        }
        if isinstance(item, RecordedMessage):
            params = {
                **common,
                "MessageSid": sid,
                "SmsSid": sid,
                "MessageStatus": status,
                "SmsStatus": status,
            }
            if "MessagingServiceSid" in item.form:
                params["MessagingServiceSid"] = item.form["MessagingServiceSid"]
            if error_code is not None:
                params["ErrorCode"] = error_code
        else:
            params = {
                **common,
                "CallSid": sid,
                "CallStatus": status,
                "Direction": "outbound-api",
                "CallbackSource": "call-progress-events",
                "SequenceNumber": "0",
                "Timestamp": _now(),
            }
            if status == "completed":
                params["CallDuration"] = "9"
        signature = RequestValidator(self.auth_token).compute_signature(url, params)
        headers = {
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
            "User-Agent": "TwilioProxy/1.1",
        }
        return url, params, headers

    def deliver_callback(
        self, sid: str, status: str, *, error_code: str | None = None, timeout: float = 5.0
    ) -> httpx.Response:
        """POST the status callback to its URL (which must be on loopback), as Twilio does."""
        url, params, headers = self.callback_request(sid, status, error_code=error_code)
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the stub only calls loopback URLs")
        with httpx.Client(timeout=timeout) as client:
            return client.post(url, data=params, headers=headers)

    # ----------------------------------------------------------------------------------------
    # The API

    def _authorized(self, request: Request) -> bool:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        user, sep, password = decoded.partition(":")
        return bool(sep) and (
            secrets.compare_digest(user.encode(), self.account_sid.encode())
            & secrets.compare_digest(password.encode(), self.auth_token.encode())
        )

    async def _gate(self, request: Request) -> Response | None:
        """Authentication, the path's account, the knobs and the delay; None to go on."""
        if not self._authorized(request):
            return _error(20003, 401)
        if request.path_params["sid"] != self.account_sid:
            return _error(20404, 404)
        generation = self._generation
        deadline = time.monotonic() + self.delay_seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.is_set() or self._generation != generation:
                return Response("stub reset", status_code=503)
            await asyncio.sleep(min(left, 0.05))
        with self._cond:
            status = self._statuses.popleft() if self._statuses else None
        if status is not None:
            code = {429: 20429}.get(status, 20500)
            headers = {"Retry-After": "2"} if status == 429 else {}
            answer = _error(code, status, "Stub failure")
            answer.headers.update(headers)
            return answer
        return None

    @staticmethod
    async def _form(request: Request) -> dict[str, str]:
        raw = await request.body()
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            return {}
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))

    def _next_failure(self) -> tuple[int, int] | None:
        with self._cond:
            return self._failures.popleft() if self._failures else None

    @staticmethod
    def _bad_callback(form: dict[str, str]) -> bool:
        url = form.get("StatusCallback")
        if url is None:
            return False
        parts = urlsplit(url)
        return parts.scheme not in ("http", "https") or not parts.hostname

    async def _create_message(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        with self._cond:
            self.arrivals += 1
        form = await self._form(request)
        to = form.get("To", "")
        if not to:
            return _error(21604)
        if not E164.fullmatch(to):
            return _error(21211, message=f"The 'To' number {to} is not a valid phone number.")
        sender, service = form.get("From"), form.get("MessagingServiceSid")
        if not sender and not service:
            return _error(21603)
        if sender and sender not in (*self.numbers, *self.senders):
            return _error(21212)
        if service and service not in self.services:
            return _error(21701)
        body = form.get("Body", "")
        if not body:
            return _error(21602)
        if len(body) > MAX_BODY:
            return _error(21617)
        if self._bad_callback(form):
            return _error(21609)
        failure = self._next_failure()
        if failure is not None:
            return _error(failure[0], failure[1])
        sid = "SM" + secrets.token_hex(16)
        record = RecordedMessage(sid, form, {k.lower(): v for k, v in request.headers.items()})
        with self._cond:
            self._messages.append(record)
            self._cond.notify_all()
        now = _now()
        return JSONResponse(
            {
                "account_sid": self.account_sid,
                "api_version": API,
                "body": body,
                "date_created": now,
                "date_sent": None,
                "date_updated": now,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": sender,
                "messaging_service_sid": service,
                "num_media": "0",
                "num_segments": "1",
                "price": None,
                "price_unit": "USD",
                "sid": sid,
                "status": "accepted" if service else "queued",
                "subresource_uris": {
                    "media": f"/{API}/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
                },
                "to": to,
                "uri": f"/{API}/Accounts/{self.account_sid}/Messages/{sid}.json",
            },
            status_code=201,
        )

    async def _create_call(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        with self._cond:
            self.arrivals += 1
        form = await self._form(request)
        to = form.get("To", "")
        if not to:
            return _error(21201)
        if not E164.fullmatch(to):
            return _error(21211)
        sender = form.get("From", "")
        if not sender:
            return _error(21213)
        if sender not in self.numbers:
            return _error(21210)
        url, twiml = form.get("Url"), form.get("Twiml")
        if (url is None) == (twiml is None):
            return _error(21205)
        said: list[tuple[str, str | None]] = []
        if twiml is not None:
            if len(twiml) > MAX_TWIML:
                return _error(12100, message="Twiml exceeds 4000 characters")
            try:
                root = ET.fromstring(twiml)  # noqa: S314 - otpgate's TwiML, on loopback
            except ET.ParseError:
                return _error(12100)
            if root.tag != "Response":
                return _error(12100)
            said = [(say.text or "", say.get("language")) for say in root.iter("Say")]
        if self._bad_callback(form):
            return _error(21609)
        failure = self._next_failure()
        if failure is not None:
            return _error(failure[0], failure[1])
        sid = "CA" + secrets.token_hex(16)
        record = RecordedCall(sid, form, {k.lower(): v for k, v in request.headers.items()}, said)
        with self._cond:
            self._calls.append(record)
            self._cond.notify_all()
        now = _now()
        return JSONResponse(
            {
                "account_sid": self.account_sid,
                "api_version": API,
                "date_created": now,
                "date_updated": now,
                "direction": "outbound-api",
                "from": sender,
                "to": to,
                "sid": sid,
                "status": "queued",
                "uri": f"/{API}/Accounts/{self.account_sid}/Calls/{sid}.json",
            },
            status_code=201,
        )

    async def _account(self, request: Request) -> Response:
        refused = await self._gate(request)
        if refused is not None:
            return refused
        now = _now()
        body: dict[str, Any] = {
            "auth_token": self.auth_token,  # Twilio does show it here: we must not
            "date_created": now,
            "date_updated": now,
            "friendly_name": "otpgate tests",
            "owner_account_sid": self.account_sid,
            "sid": self.account_sid,
            "status": "active",
            "type": "Full",
            "uri": f"/{API}/Accounts/{self.account_sid}.json",
        }
        return JSONResponse(body)
