"""The two pure ASGI middlewares around the app (cheaper than ``BaseHTTPMiddleware``).

Outermost, :class:`RequestContext`: a request id for logs and the ``X-Request-ID`` header of
every response, the latency histogram, and the one place an unexpected error is logged and
answered (while the request id is still known). Inside it, :class:`BodyLimit`: bodies over the
limit are refused before they are read whole, before routing and authentication.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otpgate.bootstrap import Container
from otpgate.entrypoints import logs
from otpgate.entrypoints.api.problems import error_response
from otpgate.errors import InternalError, InvalidRequest, PayloadTooLarge

log = logging.getLogger("otpgate.http")


class RequestContext:
    """Request id, metrics, and the answer to an unexpected error.

    An incoming ``X-Request-ID`` of 1–64 printable characters is kept, so a caller's trace id
    follows the request through the logs; otherwise one is made. An exception that escapes the
    app is logged here with that id and answered with a generic ``500 internal_error`` problem
    that still carries the header; nothing of the exception reaches the client.
    """

    def __init__(self, app: ASGIApp, container: Container) -> None:
        self.app = app
        self.container = container

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = (
            incoming
            if 0 < len(incoming) <= 64 and incoming.isprintable()
            else ("req_" + secrets.token_hex(8))
        )
        token = logs.request_id.set(rid)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "unhandled error",
                extra={"method": scope["method"], "route": _template(scope)},
            )
            if response_started:
                raise  # too late for an answer: the server closes the connection
            failure = InternalError("an unexpected error occurred; it has been logged")
            await error_response(failure)(scope, receive, send_with_id)
        finally:
            self.container.metrics.observe_request(
                scope["method"],
                _template(scope),
                f"{status // 100}xx",
                time.perf_counter() - started,
            )
            logs.request_id.reset(token)


def _template(scope: Scope) -> str:
    """The matched route's path template (no ids), for logs and metrics."""
    return str(getattr(scope.get("route"), "path", "unmatched"))


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit. An ``HTTPException``
    so that FastAPI's body reading lets it through to the error handlers unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit))


def too_large(limit: int) -> str:
    return f"the request body is larger than {limit} bytes, the most this route accepts"


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with ``413 payload_too_large``.

    A declared ``Content-Length`` is checked before the app runs at all, so neither the body
    nor the credentials are read. A body without one (chunked) is counted as it streams in,
    and reading stops with :class:`BodyTooLarge` as soon as it passes the limit, so at most
    one chunk beyond the limit is ever held. With a ``Content-Length`` the server itself
    delivers no more than it declared, so such bodies are not counted again. The paths in
    ``larger`` have limits of their own.
    """

    def __init__(
        self, app: ASGIApp, limit: int, *, larger: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        #: Paths whose requests may be larger (LabsMobile's ``/json/send`` with a big batch).
        self.larger = dict(larger or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope["path"], self.limit)
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                refusal = InvalidRequest(
                    "Content-Length must be a number of bytes", param="Content-Length"
                )
                await error_response(refusal)(scope, receive, send)
            elif int(declared) > limit:
                await error_response(PayloadTooLarge(too_large(limit)))(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)
