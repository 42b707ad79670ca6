"""A loopback stub of LabsMobile's SMS JSON API, faithful to its documentation.

Source: ``/work/shared/reference/labsmobile.md`` §2 (LabsMobile JSON API 2.5.2). What the stub
does that the docs do not say outright, and is therefore a convention of this stub:

* HTTP 401 with ``WWW-Authenticate: Basic`` for a missing or wrong ``username:token``; HTTP 400
  (with result code 10 or 11 in the body) for a missing or malformed JSON payload or a wrong
  ``Content-Type``; every other documented result code comes with HTTP 200.
* ``ucs2``, ``long`` and ``test`` are presence flags: any value but ``""``, ``"0"``, ``0``,
  ``false`` and ``null`` turns them on.
* A sent message's delivery report is only sent when a test asks for it (:meth:`deliver_report`),
  to the recorded ``ackurl``, which must be a loopback URL.

Usage::

    with LabsMobileStub(username="u@example.com", token="t") as stub:
        sender = LabsMobileSender(username=..., token=..., base_url=stub.url)
        ...
        stub.wait_for_messages(1)
        stub.deliver_report(subid, desc="DELIVRD")

The server runs with uvicorn in a background thread on 127.0.0.1 and a free port; ``stop``
(or leaving the ``with`` block) shuts it down and joins the thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import http
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "DEFAULT_PRICES",
    "GSM_CHARACTERS",
    "RESULT_MESSAGES",
    "LabsMobileStub",
    "RecordedRequest",
    "ThreadedServer",
]

# GSM 03.38: the basic table (without ESC) and the extension table (reached through ESC).
_GSM_BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅå"
    "Δ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./"
    "0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM_EXTENSION = "\x0c^{}\\[~]|€"
GSM_CHARACTERS = frozenset(_GSM_BASIC + _GSM_EXTENSION)

#: LabsMobile's result codes and their messages (shared by all its SMS APIs).
RESULT_MESSAGES: dict[str, str] = {
    "0": "Message has been successfully sent",
    "10": "Missing JSON data in request",
    "11": "Badly formed JSON in request",
    "20": "The message element must be present in the request",
    "21": "The message element cannot be empty",
    "23": "There are no recipients",
    "24": "Too many recipients",
    "27": "This message contained one or more invalid character(s)",
    "28": "Subid is exceeding maximum length",
    "30": "There was an error while sending the message",
    "35": "The account has no enough credit for this sending",
    "39": "The value of the scheduled field is not a valid datetime format",
    "41": "Scheduled messages cannot be send in test mode",
}

#: ``POST /json/prices`` answers, keyed by ISO country code (credits per SMS).
DEFAULT_PRICES: dict[str, dict[str, Any]] = {
    "ES": {"isocode": "ES", "prefix": "34", "name": "Spain", "credits": 0.07},
    "CO": {"isocode": "CO", "prefix": "57", "name": "Colombia", "credits": 0.02},
    "US": {"isocode": "US", "prefix": "1", "name": "United States", "credits": 0.05},
    "GB": {"isocode": "GB", "prefix": "44", "name": "United Kingdom", "credits": 0.08},
}

MAX_RECIPIENTS = 10_000
MAX_SUBID_LENGTH = 20
_SCHEDULED_FORMAT = "%Y-%m-%d %H:%M:%S"
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_DELIVERED = frozenset({"DELIVRD", "READ"})


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request that reached ``/json/send``, as received and as answered."""

    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: Any  # the parsed JSON, ``None`` when it did not parse
    raw: bytes
    http_status: int
    code: str | None  # the LabsMobile result code answered, ``None`` for a bare HTTP status
    subid: str | None  # the subid answered (the caller's or one the stub made up)

    @property
    def accepted(self) -> bool:
        return self.code == "0"

    @property
    def msisdns(self) -> list[str]:
        if not isinstance(self.body, dict) or not isinstance(self.body.get("recipient"), list):
            return []
        return [
            r["msisdn"]
            for r in self.body["recipient"]
            if isinstance(r, dict) and isinstance(r.get("msisdn"), str)
        ]

    @property
    def ackurl(self) -> str | None:
        value = self.body.get("ackurl") if isinstance(self.body, dict) else None
        return value if isinstance(value, str) and value else None


def _flag(body: Mapping[str, Any], name: str) -> bool:
    return body.get(name) not in (None, "", "0", 0, False)


def _subid_of(raw: bytes) -> str | None:
    """The ``subid`` of a send body, if it has one (read on arrival, before any answer)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    subid = body.get("subid") if isinstance(body, dict) else None
    return str(subid) if subid not in (None, "") else None


def _answer(code: str, *, http_status: int = 200, **extra: Any) -> JSONResponse:
    return JSONResponse(
        {"code": code, "message": RESULT_MESSAGES.get(code, "Error"), **extra},
        status_code=http_status,
    )


class ThreadedServer:
    """Serves an ASGI app with uvicorn on 127.0.0.1 and a free port, in a background thread.

    ``start`` returns once the socket listens; ``stop`` asks uvicorn to exit, joins the thread
    and leaves no socket or event loop behind. Usable as a context manager."""

    def __init__(self, app: Any, *, name: str = "loopback-server") -> None:
        self.app = app
        self.name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    @property
    def running(self) -> bool:
        return self._port is not None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError(f"{self.name} is not running")
        return f"http://127.0.0.1:{self._port}"

    def start(self, *, startup_timeout: float = 10.0) -> ThreadedServer:
        if self._thread is not None:
            raise RuntimeError(f"{self.name} is already running")
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,  # leave the test run's logging configuration alone
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, name=self.name, daemon=True)
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + startup_timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.01)
        self._port = int(server.servers[0].sockets[0].getsockname()[1])
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._server = self._thread = self._port = None
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop")

    def __enter__(self) -> ThreadedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class LabsMobileStub:
    """LabsMobile's ``/json/send``, ``/json/balance`` and ``/json/prices`` on 127.0.0.1.

    Knobs, each safe to call from any thread:

    * :meth:`outage` — answer a bare HTTP status to every authenticated API request for a time
      window, on the wall clock or on a clock the test drives; checked first.
    * :meth:`http_status_next` — answer a bare HTTP status to the next ``n`` authenticated API
      requests (any endpoint).
    * :meth:`fail_next` — answer result code ``code`` to the next ``n`` valid sends.
    * ``delay_seconds`` — wait this long before answering any authenticated request.
    * :meth:`hold_next` — take the next ``n`` sends and answer none of them until
      :meth:`release_held` (a provider that accepted the request and has not answered yet).
    """

    def __init__(
        self,
        *,
        username: str = "otpgate-tests@example.com",
        token: str | None = None,
        credits: str = "123.45",
        prices: Mapping[str, Mapping[str, Any]] | None = None,
        delay_seconds: float = 0.0,
    ) -> None:
        self.username = username
        self.token = token if token is not None else f"stub-{secrets.token_hex(8)}"
        self.credits = self._initial_credits = credits
        self.prices = {k: dict(v) for k, v in (prices or DEFAULT_PRICES).items()}
        self.delay_seconds = delay_seconds
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._by_subid: dict[str, RecordedRequest] = {}
        self._fail_codes: collections.deque[str] = collections.deque()
        self._http_statuses: collections.deque[int] = collections.deque()
        self._stopping = threading.Event()
        # Bumped by reset(): an answer still pending from before (a delayed one the client gave
        # up on) is then dropped instead of being recorded into the next test's records.
        self._generation = 0
        #: Authenticated sends that reached the stub, counted on arrival (before any delay).
        self.arrivals = 0
        self._arrivals_by_subid: collections.Counter[str] = collections.Counter()
        # The parsed body of every authenticated send, by subid, in order of arrival.
        self._arrived_bodies: dict[str, list[Any]] = collections.defaultdict(list)
        self._hold_count = 0
        self.held = 0  # sends being held now
        self._release = threading.Event()
        # (clock, window end, status) of the outage in force, if any.
        self._outage: tuple[Callable[[], float], float, int] | None = None
        self.app = Starlette(
            routes=[
                Route("/json/send", self._send, methods=["POST"]),
                Route("/json/balance", self._balance, methods=["GET"]),
                Route("/json/prices", self._prices, methods=["POST"]),
            ]
        )

        self._runner = ThreadedServer(self.app, name="labsmobile-stub")

    def __repr__(self) -> str:
        state = self.url if self._runner.running else "stopped"
        return f"LabsMobileStub(username={self.username!r}, {state})"

    # ----------------------------------------------------------------------------------------
    # Life cycle

    @property
    def url(self) -> str:
        """Base URL to hand to the sender, e.g. ``http://127.0.0.1:41234``."""
        return self._runner.url

    def start(self, *, startup_timeout: float = 10.0) -> LabsMobileStub:
        self._stopping.clear()
        self._runner.start(startup_timeout=startup_timeout)
        return self

    def stop(self, *, timeout: float = 10.0) -> None:
        self._stopping.set()  # ends any delayed answer at once
        self._runner.stop(timeout=timeout)

    def __enter__(self) -> LabsMobileStub:
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

    def fail_next(self, n: int, code: str = "30") -> None:
        """Answer result ``code`` (with HTTP 200) to the next ``n`` valid sends."""
        with self._cond:
            self._fail_codes.extend([str(code)] * n)

    def http_status_next(self, n: int, status: int) -> None:
        """Answer a bare HTTP ``status`` to the next ``n`` authenticated API requests."""
        with self._cond:
            self._http_statuses.extend([status] * n)

    def outage(
        self, seconds: float, *, status: int = 503, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Answer a bare HTTP ``status`` to every authenticated API request from now until
        ``seconds`` have passed on ``clock`` (a reading in seconds, called on the stub's thread);
        then answer normally again. A test with a frozen clock passes a reading of it, so the
        outage ends when the test moves its clock, not after a real wait."""
        with self._cond:
            self._outage = (clock, clock() + seconds, status)

    def hold_next(self, n: int = 1) -> None:
        """Hold the next ``n`` sends: each is counted and kept on arrival (:meth:`arrived`), and
        gets no answer until :meth:`release_held`, a reset or the stop; a released send is then
        answered as usual."""
        with self._cond:
            self._hold_count += n
            self._release.clear()

    def release_held(self) -> None:
        """Let every held send go on to its answer."""
        self._release.set()

    def wait_for_held(self, n: int = 1, timeout: float = 5.0) -> None:
        """Block until ``n`` sends are being held."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.held >= n, timeout=timeout):
                raise TimeoutError(f"{self.held} of {n} sends held within {timeout} s")

    def arrived(self, subid: str) -> list[Any]:
        """The bodies of every authenticated send with this ``subid`` that arrived, answered
        or not (held ones too), in order of arrival."""
        with self._cond:
            return list(self._arrived_bodies.get(subid, []))

    def arrivals_by_subid(self) -> dict[str, int]:
        """How many authenticated sends arrived, per ``subid``."""
        with self._cond:
            return dict(self._arrivals_by_subid)

    def arrivals_for(self, subid: str) -> int:
        """Authenticated sends with this ``subid`` that arrived, answered or not."""
        with self._cond:
            return self._arrivals_by_subid[subid]

    def reset(self) -> None:
        """Forget every record and knob: no delay, no outage, the initial credits (credentials
        stay)."""
        with self._cond:
            self._generation += 1
            self.arrivals = 0
            self._arrivals_by_subid.clear()
            self._arrived_bodies.clear()
            self._hold_count = 0
            self._release.set()  # held sends end (answered 503, as reset ends a delay)
            self._outage = None
            self._requests.clear()
            self._by_subid.clear()
            self._fail_codes.clear()
            self._http_statuses.clear()
            self.delay_seconds = 0.0
            self.credits = self._initial_credits

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request that reached ``/json/send``, whatever the answer."""
        with self._cond:
            return list(self._requests)

    @property
    def messages(self) -> list[RecordedRequest]:
        """The sends answered with result code 0."""
        with self._cond:
            return [r for r in self._requests if r.accepted]

    def wait_for_messages(self, n: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until ``n`` sends were accepted and return them; ``TimeoutError`` otherwise.

        It blocks the calling thread: from a coroutine whose event loop is the one sending, use
        :meth:`wait_for_messages_async`."""
        with self._cond:
            if not self._cond.wait_for(
                lambda: sum(r.accepted for r in self._requests) >= n, timeout
            ):
                got = sum(r.accepted for r in self._requests)
                raise TimeoutError(f"stub received {got} of {n} messages within {timeout} s")
            return [r for r in self._requests if r.accepted]

    async def wait_for_messages_async(
        self, n: int, timeout_seconds: float = 5.0
    ) -> list[RecordedRequest]:
        """:meth:`wait_for_messages` in a worker thread, so the event loop keeps running."""
        return await asyncio.to_thread(self.wait_for_messages, n, timeout_seconds)

    def wait_for_arrivals(self, n: int, timeout: float = 5.0) -> int:
        """Block until ``n`` authenticated sends have arrived (answered or not)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.arrivals >= n, timeout=timeout):
                raise TimeoutError(f"{self.arrivals} of {n} sends arrived within {timeout} s")
            return self.arrivals

    def message_for(self, subid: str) -> RecordedRequest:
        with self._cond:
            return self._by_subid[subid]

    # ----------------------------------------------------------------------------------------
    # Delivery reports

    def report_params(
        self,
        subid: str,
        desc: str = "DELIVRD",
        *,
        acklevel: str | None = None,
        status: str | None = None,
        msisdn: str | None = None,
        timestamp: str | None = None,
    ) -> tuple[str, dict[str, str]]:
        """The ackurl of message ``subid`` and the query parameters of its report (to be added
        to the ackurl's own query, which holds otpgate's receipt secret).

        Defaults (the docs name the parameters, not all their values): ``acklevel`` is
        ``handset`` for DELIVRD/READ, ``operator`` for UNKNOWN and ``error`` otherwise;
        ``status`` is ``ok``/``ko``/``unknown`` in the same way."""
        record = self.message_for(subid)
        ackurl = record.ackurl
        if ackurl is None:
            raise ValueError(f"message {subid} was sent without an ackurl")
        if _flag(record.body, "test"):
            raise ValueError(f"message {subid} was sent in test mode: no delivery reports")
        if urlsplit(ackurl).hostname not in _LOOPBACK_HOSTS:
            raise ValueError("the stub only calls loopback ackurls")
        desc_u = desc.upper()
        if desc_u in _DELIVERED:
            level, state = "handset", "ok"
        elif desc_u == "UNKNOWN":
            level, state = "operator", "unknown"
        else:
            level, state = "error", "ko"
        params = {
            "acklevel": acklevel if acklevel is not None else level,
            "status": status if status is not None else state,
            "desc": desc,
            "subid": subid,
            "msisdn": msisdn if msisdn is not None else (record.msisdns or [""])[0],
            "timestamp": timestamp
            if timestamp is not None
            else datetime.now(UTC).strftime(_SCHEDULED_FORMAT),
        }
        return ackurl, params

    def deliver_report(
        self, subid: str, desc: str = "DELIVRD", *, http_timeout: float = 5.0, **overrides: str
    ) -> httpx.Response:
        """GET the message's ackurl with the report's query parameters, as LabsMobile does, and
        return the receiver's answer (LabsMobile would retry until it gets a 200).

        Blocking: when the receiver runs in the calling thread's event loop, use
        :meth:`deliver_report_async`."""
        ackurl, params = self.report_params(subid, desc, **overrides)
        with httpx.Client(timeout=http_timeout) as client:
            return client.get(httpx.URL(ackurl).copy_merge_params(params))

    async def deliver_report_async(
        self, subid: str, desc: str = "DELIVRD", *, http_timeout: float = 5.0, **overrides: str
    ) -> httpx.Response:
        ackurl, params = self.report_params(subid, desc, **overrides)
        async with httpx.AsyncClient(timeout=http_timeout) as client:
            return await client.get(httpx.URL(ackurl).copy_merge_params(params))

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
        username, sep, token = decoded.partition(":")
        return bool(sep) and (
            secrets.compare_digest(username.encode(), self.username.encode())
            & secrets.compare_digest(token.encode(), self.token.encode())
        )

    @staticmethod
    def _unauthorized() -> Response:
        return JSONResponse(
            {"code": "401", "message": "Unauthorized"},
            status_code=401,
            headers={"WWW-Authenticate": 'Basic realm="LabsMobile"'},
        )

    async def _pause(self) -> bool:
        """Wait ``delay_seconds``; False when the stub was reset or stopped meanwhile."""
        generation = self._generation
        deadline = time.monotonic() + self.delay_seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping.is_set() or self._generation != generation:
                return False
            await asyncio.sleep(min(remaining, 0.05))
        return not self._stopping.is_set() and self._generation == generation

    async def _held(self) -> bool:
        """Wait for :meth:`release_held`; False when the stub was reset or stopped meanwhile."""
        generation = self._generation
        try:
            while not self._release.is_set():
                if self._stopping.is_set() or self._generation != generation:
                    return False
                await asyncio.sleep(0.05)
            return not self._stopping.is_set() and self._generation == generation
        finally:
            with self._cond:
                self.held -= 1
                self._cond.notify_all()

    @staticmethod
    def _gone() -> Response:
        return Response("stub reset", status_code=503, media_type="text/plain")

    def _next_http_status(self) -> int | None:
        with self._cond:
            if self._outage is not None:
                clock, until, status = self._outage
                if clock() < until:
                    return status
                self._outage = None
            return self._http_statuses.popleft() if self._http_statuses else None

    @staticmethod
    def _bare_status(status: int) -> Response:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        return Response(phrase, status_code=status, media_type="text/plain")

    @staticmethod
    def _json_body(request: Request, raw: bytes) -> tuple[Any, str | None]:
        """The parsed body, or the result code (10 or 11) that refuses it."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json" or not raw.strip():
            return None, "10"
        try:
            return json.loads(raw), None
        except (ValueError, UnicodeDecodeError):
            return None, "11"

    @staticmethod
    def _validate(body: Any) -> str | None:
        """The result code that refuses a parsed send payload, or ``None`` if it is valid."""
        if not isinstance(body, dict):
            return "11"
        message = body.get("message")
        if not isinstance(message, str):
            return "20"
        if not message:
            return "21"
        recipients = body.get("recipient")
        if not isinstance(recipients, list):
            return "23"
        msisdns = [
            r.get("msisdn")
            for r in recipients
            if isinstance(r, dict) and isinstance(r.get("msisdn"), str) and r["msisdn"]
        ]
        if not msisdns:
            return "23"
        if len(msisdns) > MAX_RECIPIENTS:
            return "24"
        subid = body.get("subid")
        if subid is not None and len(str(subid)) > MAX_SUBID_LENGTH:
            return "28"
        if not _flag(body, "ucs2") and any(ch not in GSM_CHARACTERS for ch in message):
            return "27"
        scheduled = body.get("scheduled")
        if scheduled not in (None, ""):
            try:
                datetime.strptime(str(scheduled), _SCHEDULED_FORMAT)
            except ValueError:
                return "39"
            if _flag(body, "test"):
                return "41"
        return None

    def _record(
        self,
        request: Request,
        raw: bytes,
        body: Any,
        http_status: int,
        code: str | None,
        subid: str | None,
    ) -> None:
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            raw=raw,
            http_status=http_status,
            code=code,
            subid=subid,
        )
        with self._cond:
            self._requests.append(record)
            if record.accepted and subid is not None:
                self._by_subid[subid] = record
            self._cond.notify_all()

    async def _send(self, request: Request) -> Response:
        raw = await request.body()
        if not self._authorized(request):
            self._record(request, raw, None, 401, None, None)
            return self._unauthorized()
        subid = _subid_of(raw)
        with self._cond:
            self.arrivals += 1
            if subid is not None:
                self._arrivals_by_subid[subid] += 1
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    self._arrived_bodies[subid].append(json.loads(raw))
            hold = self._hold_count > 0
            if hold:
                self._hold_count -= 1
                self.held += 1
            self._cond.notify_all()
        if hold and not await self._held():
            return self._gone()
        if not await self._pause():
            return self._gone()
        body, refusal = self._json_body(request, raw)
        status = self._next_http_status()
        if status is not None:
            self._record(request, raw, body, status, None, None)
            return self._bare_status(status)
        if refusal is not None:  # missing or malformed JSON: HTTP 400
            self._record(request, raw, body, 400, refusal, None)
            return _answer(refusal, http_status=400)
        code = self._validate(body)
        if code is None:
            with self._cond:
                code = self._fail_codes.popleft() if self._fail_codes else "0"
        if code != "0":
            self._record(request, raw, body, 200, code, None)
            return _answer(code)
        subid = str(body["subid"]) if body.get("subid") not in (None, "") else None
        if subid is None:  # LabsMobile makes one up when the caller gives none
            subid = secrets.token_hex(7)[:13]
        self._record(request, raw, body, 200, "0", subid)
        return _answer("0", subid=subid)

    async def _balance(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        if not await self._pause():
            return self._gone()
        status = self._next_http_status()
        if status is not None:
            return self._bare_status(status)
        # The result code is an integer here, unlike /json/send.
        return JSONResponse({"code": 0, "credits": self.credits})

    async def _prices(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        if not await self._pause():
            return self._gone()
        status = self._next_http_status()
        if status is not None:
            return self._bare_status(status)
        raw = await request.body()
        body, refusal = self._json_body(request, raw)
        if refusal == "10" and not raw.strip():
            body, refusal = {}, None  # no body: every country
        if refusal is not None or not isinstance(body, dict):
            return _answer(refusal or "11", http_status=400)
        countries = body.get("countries")
        if countries is None:
            selected = self.prices
        elif isinstance(countries, list):
            wanted = {str(c).upper() for c in countries}
            selected = {k: v for k, v in self.prices.items() if k in wanted}
        else:
            return _answer("11", http_status=400)
        return JSONResponse(selected)
