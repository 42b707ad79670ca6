"""The load client: the same code drives otpgate and the bare baseline.

Two interchangeable implementations of one tiny interface, ``post``/``get`` returning
``(status, body)``:

* :class:`RawClient` (the default): HTTP/1.1 with keep-alive on asyncio streams, one pooled
  connection per concurrent request. It does far less per request than httpx, so on a 2-core
  machine where client and server share the CPU it leaves more of it to the server under test.
* :class:`HttpxClient`: ``httpx.AsyncClient`` with its pool sized to the concurrency.

Both refuse any host but 127.0.0.1: the benchmark never sends anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Protocol

LOOPBACK = "127.0.0.1"


class HttpError(Exception):
    """The server closed the connection or sent something we cannot read."""


class Client(Protocol):
    async def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[int, bytes]: ...

    async def get(self, path: str, headers: bytes = b"") -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


def _require_loopback(host: str) -> None:
    if host != LOOPBACK:
        raise ValueError(f"the benchmark only talks to {LOOPBACK}, not {host!r}")


#: A kept-alive connection idle longer than this is closed instead of reused: uvicorn closes
#: idle connections after 5 s, and a request sent just as it does would fail for no fault of
#: the server (the keep-alive race every HTTP client guards against, as httpx's
#: keepalive_expiry does).
IDLE_EXPIRY_SECONDS = 4.0


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()

    async def exchange(self, request: bytes) -> tuple[int, bytes, bool]:
        """Send one request, read one response: ``(status, body, keep_alive)``."""
        self.writer.write(request)
        reader = self.reader
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise HttpError("connection closed before a response") from exc
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError) as exc:
            raise HttpError(f"bad status line {lines[0][:80]!r}") from exc
        length = -1
        chunked = False
        keep_alive = True
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                keep_alive = value.strip().lower() != b"close"
        if chunked:
            body = await self._read_chunked()
        elif length >= 0:
            body = await reader.readexactly(length) if length else b""
        else:  # no framing: the body runs to the end of the connection
            body = await reader.read()
            keep_alive = False
        return status, body, keep_alive

    async def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_line = await self.reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers expected
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


class RawClient:
    """Minimal HTTP/1.1 keep-alive client for JSON requests to one loopback server."""

    def __init__(self, port: int, *, host: str = LOOPBACK, timeout: float = 10.0) -> None:
        _require_loopback(host)
        self._host = host
        self._port = port
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._host_header = f"Host: {host}:{port}\r\n".encode()

    async def _request(self, request: bytes) -> tuple[int, bytes]:
        conn = self._idle.pop() if self._idle else None
        while conn is not None and time.monotonic() - conn.idle_since > IDLE_EXPIRY_SECONDS:
            conn.close()
            conn = self._idle.pop() if self._idle else None
        try:
            async with asyncio.timeout(self._timeout):
                if conn is None:
                    reader, writer = await asyncio.open_connection(self._host, self._port)
                    conn = _Connection(reader, writer)
                status, body, keep_alive = await conn.exchange(request)
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        if keep_alive:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return status, body

    async def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[int, bytes]:
        request = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\n",
                self._host_header,
                headers,
                b"Content-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        return await self._request(request)

    async def get(self, path: str, headers: bytes = b"") -> tuple[int, bytes]:
        request = b"".join(
            (b"GET ", path.encode(), b" HTTP/1.1\r\n", self._host_header, headers, b"\r\n")
        )
        return await self._request(request)

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()


class HttpxClient:
    """The same interface on ``httpx.AsyncClient`` (pool sized to the concurrency)."""

    def __init__(
        self, port: int, *, concurrency: int, host: str = LOOPBACK, timeout: float = 10.0
    ) -> None:
        import httpx

        _require_loopback(host)
        self._client = httpx.AsyncClient(
            base_url=f"http://{host}:{port}",
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=timeout,
            trust_env=False,  # never a proxy from the environment
        )

    @staticmethod
    def _headers(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                out[name.strip()] = value.strip()
        return out

    async def post(self, path: str, body: bytes, headers: bytes = b"") -> tuple[int, bytes]:
        hdrs = self._headers(headers)
        hdrs["Content-Type"] = "application/json"
        response = await self._client.post(path, content=body, headers=hdrs)
        return response.status_code, response.content

    async def get(self, path: str, headers: bytes = b"") -> tuple[int, bytes]:
        response = await self._client.get(path, headers=self._headers(headers))
        return response.status_code, response.content

    async def aclose(self) -> None:
        await self._client.aclose()


def make_client(kind: str, port: int, *, concurrency: int, timeout: float) -> Client:
    if kind == "raw":
        return RawClient(port, timeout=timeout)
    if kind == "httpx":
        return HttpxClient(port, concurrency=concurrency, timeout=timeout)
    raise ValueError(f"unknown client {kind!r} (raw or httpx)")
