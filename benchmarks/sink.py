"""A loopback stand-in for LabsMobile's SMS JSON API (``POST /json/send``), for the benchmark.

It checks HTTP Basic credentials, reads the JSON body, pulls the code out of ``message`` and
hands it to whoever waits for that ``msisdn`` (an ``asyncio.Future`` registered with
:meth:`LabsMobileSink.expect`), then answers like LabsMobile does::

    {"code": "0", "message": "Message has been successfully sent", "subid": "<the subid>"}

It runs in the load client's event loop as a raw asyncio streams server: HTTP/1.1 with
keep-alive, ``Content-Length`` bodies only (which is what httpx sends for ``json=``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections import Counter
from typing import Any

from benchmarks.loadclient import LOOPBACK

#: "Bench code: 123456. Valid 10 min. ..." (en) or "Bench: codigo 123456. ..." (es).
_CODE = re.compile(r"(?:code|codigo)\W+([0-9A-Za-z]{4,10})\b", re.IGNORECASE)
_DIGITS = re.compile(r"\b(\d{4,10})\b")

_OK = b'{"code":"0","message":"Message has been successfully sent","subid":%s}'


def extract_code(message: str) -> str | None:
    """The one-time code in an SMS text rendered from otpgate's built-in templates."""
    match = _CODE.search(message) or _DIGITS.search(message)
    return match.group(1) if match else None


def _reply(status: int, reason: bytes, body: bytes, *, close: bool = False) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
        status,
        reason,
        len(body),
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


class LabsMobileSink:
    """``POST /json/send`` on 127.0.0.1; codes are delivered to futures keyed by msisdn."""

    def __init__(self, username: str, token: str) -> None:
        credentials = base64.b64encode(f"{username}:{token}".encode()).decode()
        self._expected_auth = f"Basic {credentials}".encode()
        self._waiting: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self._server: asyncio.Server | None = None
        self.port = 0
        #: received, delivered (to a waiter), unclaimed (nobody waiting), bad_auth, bad_request
        self.stats: Counter[str] = Counter()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            # Connections otpgate keeps alive would make wait_closed() hang on Python 3.12+.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        for future in self._waiting.values():
            future.cancel()
        self._waiting.clear()

    def expect(self, msisdn: str) -> asyncio.Future[tuple[str, float]]:
        """A future that gets ``(code, perf_counter at arrival)`` for the next SMS to
        ``msisdn`` (E.164 without ``+``). Register it *before* starting the verification: the
        SMS may arrive before the start request's answer."""
        future: asyncio.Future[tuple[str, float]] = asyncio.get_running_loop().create_future()
        self._waiting[msisdn] = future
        return future

    def forget(self, msisdn: str) -> None:
        future = self._waiting.pop(msisdn, None)
        if future is not None and not future.done():
            future.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.split(b"\r\n")
                request_line = lines[0].split(b" ")
                headers: dict[bytes, bytes] = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(b":")
                        headers[name.strip().lower()] = value.strip()
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    self.stats["bad_request"] += 1
                    writer.write(_reply(400, b"Bad Request", b'{"code":"10"}', close=True))
                    return
                length = int(headers.get(b"content-length", b"0"))
                body = await reader.readexactly(length) if length else b""
                writer.write(self._handle(request_line, headers, body))
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def _handle(self, request_line: list[bytes], headers: dict[bytes, bytes], body: bytes) -> bytes:
        if len(request_line) < 2 or request_line[0] != b"POST" or request_line[1] != b"/json/send":
            self.stats["not_found"] += 1
            return _reply(404, b"Not Found", b'{"code":"404","message":"Not found"}')
        if headers.get(b"authorization") != self._expected_auth:
            self.stats["bad_auth"] += 1
            return _reply(401, b"Unauthorized", b'{"code":"401","message":"Unauthorized"}')
        arrived = time.perf_counter()
        try:
            payload: Any = json.loads(body)
            recipients = [r["msisdn"] for r in payload["recipient"]]
            message = payload["message"]
        except (ValueError, KeyError, TypeError):
            self.stats["bad_request"] += 1
            return _reply(400, b"Bad Request", b'{"code":"11","message":"Malformed JSON"}')
        self.stats["received"] += 1
        code = extract_code(message) if isinstance(message, str) else None
        if code is None:
            self.stats["no_code"] += 1
        for msisdn in recipients:
            future = self._waiting.pop(str(msisdn), None)
            if future is None or future.done():
                self.stats["unclaimed"] += 1
                continue
            if code is None:
                future.set_exception(LookupError("no code found in the SMS text"))
                continue
            future.set_result((code, arrived))
            self.stats["delivered"] += 1
        subid = payload.get("subid") if isinstance(payload, dict) else None
        return _reply(200, b"OK", _OK % json.dumps(subid).encode())
