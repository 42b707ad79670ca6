"""A loopback stub of Vonage's SMS API (``POST /sms/json``) and account balance
(``GET /account/get-balance``), faithful to their documentation, and of its delivery receipts.

What it checks, as Vonage does (answers always HTTP 200, the outcome in each message's
``status``; the codes and texts of Vonage's "SMS API error codes"):

* ``api_key``, ``api_secret``, ``from``, ``to``, ``text`` present (status 2, "Missing
  Parameters"), credentials right (4, "Bad Credentials");
* ``to`` an international number of digits without ``+`` (3, "Invalid to address"); ``from``
  alphanumeric of at most 11 characters or a number of at most 15 digits (15, "Invalid
  Sender Address"); ``type`` ``text`` or ``unicode`` (3); ``client-ref`` at most 100
  characters (3); ``callback`` an http(s) URL (23, "Invalid Callback Url");
* a text longer than one part is split: one message object per part (153 GSM-7 or 67 UCS-2
  characters each), each with its ``message-id``.

The balance answers ``{"value": …, "autoReload": false}``, or HTTP 401 for wrong credentials.

Conventions of this stub: parameters are read from the form body (or the query); a JSON body is
not read. Delivery receipts (:meth:`VonageStub.receipt`) carry the documented fields
(``msisdn``, ``to``, ``network-code``, ``messageId``, ``price``, ``status``, ``scts``,
``err-code``, ``api-key``, ``message-timestamp``, ``client-ref``) and are sent by GET with
query parameters, Vonage's default.
"""

from __future__ import annotations

import asyncio
import collections
import re
import secrets
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.labsmobile_stub import GSM_CHARACTERS, ThreadedServer

__all__ = ["RecordedSms", "VonageStub"]

ERROR_TEXTS = {
    "1": "Throughput Rate Exceeded - please wait [ 1000 ] and retry",
    "2": "Missing Parameters",
    "3": "Invalid Parameters",
    "4": "Bad Credentials",
    "5": "Internal Error",
    "6": "Invalid Message",
    "7": "Number Barred",
    "8": "Partner Account Barred",
    "9": "Partner Quota Violation",
    "15": "Invalid Sender Address",
    "23": "Invalid Callback Url",
    "29": "Non-Whitelisted Destination",
}
NUMBER = re.compile(r"[1-9][0-9]{6,14}")
SENDER = re.compile(r"[A-Za-z0-9 ]{1,11}|[0-9]{1,15}")


@dataclass(frozen=True, slots=True)
class RecordedSms:
    form: dict[str, str]
    message_ids: list[str]

    @property
    def text(self) -> str:
        return self.form["text"]

    @property
    def client_ref(self) -> str | None:
        return self.form.get("client-ref")


def _answer(*messages: dict[str, str]) -> JSONResponse:
    return JSONResponse({"message-count": str(len(messages)), "messages": list(messages)})


def _refused(status: str, detail: str | None = None) -> JSONResponse:
    return _answer({"status": status, "error-text": detail or ERROR_TEXTS.get(status, "Error")})


class VonageStub:
    """Vonage's ``/sms/json`` and ``/account/get-balance`` on 127.0.0.1.

    Knobs: :meth:`fail_next` (a status code to the next ``n`` valid sends), :meth:`http_status_next`
    (a bare HTTP status to the next ``n`` authenticated requests), ``delay_seconds``, :meth:`reset`.
    """

    def __init__(self, *, api_key: str | None = None, api_secret: str | None = None) -> None:
        self.api_key = api_key or secrets.token_hex(4)
        self.api_secret = api_secret or secrets.token_hex(8)
        self.balance = 10.28
        self.delay_seconds = 0.0
        self._cond = threading.Condition()
        self._sent: list[RecordedSms] = []
        self._failures: collections.deque[str] = collections.deque()
        self._statuses: collections.deque[int] = collections.deque()
        self._stopping = threading.Event()
        self._generation = 0
        self.app = Starlette(
            routes=[
                Route("/sms/json", self._send, methods=["GET", "POST"]),
                Route("/account/get-balance", self._balance, methods=["GET"]),
            ]
        )
        self._runner = ThreadedServer(self.app, name="vonage-stub")

    def __repr__(self) -> str:
        return f"VonageStub(api_key={self.api_key!r})"

    @property
    def url(self) -> str:
        return self._runner.url

    def start(self) -> VonageStub:
        self._stopping.clear()
        self._runner.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._runner.stop()

    def __enter__(self) -> VonageStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def fail_next(self, n: int, status: str) -> None:
        with self._cond:
            self._failures.extend([status] * n)

    def http_status_next(self, n: int, status: int) -> None:
        with self._cond:
            self._statuses.extend([status] * n)

    def reset(self) -> None:
        with self._cond:
            self._generation += 1
            self._sent.clear()
            self._failures.clear()
            self._statuses.clear()
            self.delay_seconds = 0.0

    @property
    def sent(self) -> list[RecordedSms]:
        with self._cond:
            return list(self._sent)

    def receipt(
        self, client_ref: str, status: str = "delivered", *, err_code: str = "0"
    ) -> tuple[str, dict[str, str]]:
        """The callback URL of the SMS sent with ``client_ref`` and the receipt's parameters
        (to be added to that URL's own query, which holds otpgate's receipt token)."""
        with self._cond:
            record = next(r for r in self._sent if r.client_ref == client_ref)
        callback = record.form.get("callback")
        if not callback:
            raise ValueError(f"{client_ref} was sent without a callback")
        params = {
            "msisdn": record.form["to"],
            "to": record.form["from"],
            "network-code": "21401",
            "messageId": record.message_ids[0],
            "price": "0.06000000",
            "status": status,
            "scts": time.strftime("%y%m%d%H%M", time.gmtime()),
            "err-code": err_code,
            "api-key": self.api_key,
            "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "client-ref": client_ref,
        }
        return callback, params

    # ----------------------------------------------------------------------------------------

    async def _params(self, request: Request) -> dict[str, str]:
        params = dict(request.query_params)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and media == "application/x-www-form-urlencoded":
            raw = await request.body()
            params.update(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
        return params

    def _authorized(self, params: dict[str, str]) -> bool:
        return secrets.compare_digest(
            params.get("api_key", "").encode(), self.api_key.encode()
        ) & secrets.compare_digest(params.get("api_secret", "").encode(), self.api_secret.encode())

    async def _pause(self) -> bool:
        generation = self._generation
        deadline = time.monotonic() + self.delay_seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._stopping.is_set() or self._generation != generation:
                return False
            await asyncio.sleep(min(left, 0.05))
        return True

    def _bare_status(self) -> Response | None:
        with self._cond:
            status = self._statuses.popleft() if self._statuses else None
        if status is None:
            return None
        headers = {"Retry-After": "1"} if status == 429 else {}
        return Response("stub failure", status_code=status, headers=headers)

    async def _send(self, request: Request) -> Response:
        params = await self._params(request)
        if any(not params.get(k) for k in ("api_key", "api_secret", "from", "to", "text")):
            return _refused("2")
        if not self._authorized(params):
            return _refused("4")
        if not await self._pause():
            return Response("stub reset", status_code=503)
        bare = self._bare_status()
        if bare is not None:
            return bare
        if not NUMBER.fullmatch(params["to"]):
            return _refused("3", "Invalid to address")
        if not SENDER.fullmatch(params["from"]):
            return _refused("15")
        kind = params.get("type", "text")
        if kind not in ("text", "unicode"):
            return _refused("3", "Invalid type")
        if len(params.get("client-ref", "")) > 100:
            return _refused("3", "client-ref too long")
        callback = params.get("callback")
        if callback is not None and not callback.startswith(("http://", "https://")):
            return _refused("23")
        with self._cond:
            failure = self._failures.popleft() if self._failures else None
        if failure is not None:
            return _refused(failure)
        text = params["text"]
        if kind == "text":  # what the handset shows: characters outside GSM-7 are lost
            text = "".join(c if c in GSM_CHARACTERS else "?" for c in text)
        single, part = (160, 153) if kind == "text" else (70, 67)
        count = 1 if len(text) <= single else -(-len(text) // part)
        ids = [secrets.token_hex(8).upper() for _ in range(count)]
        record = RecordedSms({**params, "text": text}, ids)
        with self._cond:
            self._sent.append(record)
            self.balance = round(self.balance - 0.06 * count, 8)
        parts = []
        for message_id in ids:
            part_answer = {
                "to": params["to"],
                "message-id": message_id,
                "status": "0",
                "remaining-balance": f"{self.balance:.8f}",
                "message-price": "0.06000000",
                "network": "21401",
            }
            if "client-ref" in params:
                part_answer["client-ref"] = params["client-ref"]
            parts.append(part_answer)
        return _answer(*parts)

    async def _balance(self, request: Request) -> Response:
        params = await self._params(request)
        if not self._authorized(params):
            return Response(status_code=401)
        if not await self._pause():
            return Response("stub reset", status_code=503)
        bare = self._bare_status()
        if bare is not None:
            return bare
        return JSONResponse({"value": self.balance, "autoReload": False})
