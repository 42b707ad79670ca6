"""FastAPI application factory, error mapping and request middleware.

Only this layer turns :mod:`otpgate.errors` into HTTP: every error is
``application/problem+json`` with a stable ``code`` (API.md §2), and nothing unexpected ever
leaves as a stack trace.
"""

from __future__ import annotations

import html
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otpgate import __version__
from otpgate.bootstrap import Container, build
from otpgate.entrypoints import logs
from otpgate.errors import PUBLIC_ERRORS, OtpgateError, Unavailable
from otpgate.settings import Settings

log = logging.getLogger("otpgate.http")

PROBLEM = "application/problem+json"
_DOCS = {cls.code: cls for cls in PUBLIC_ERRORS}


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    param: str | None = None,
    retry_after: int | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"/errors/{code}",
        "title": title,
        "status": status,
        "code": code,
        "detail": detail,
    }
    extra_headers = dict(headers or {})
    if param is not None:
        body["param"] = param
    if retry_after is not None:
        body["retry_after"] = retry_after
        extra_headers["Retry-After"] = str(retry_after)
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=extra_headers)


def error_response(exc: OtpgateError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer, Basic realm="otpgate"'} if exc.status == 401 else None
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        param=exc.param,
        retry_after=exc.retry_after,
        headers=headers,
    )


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OtpgateError)
    async def _otpgate_error(_: Request, exc: OtpgateError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = _validation_param(tuple(first.get("loc", ())))
        kind = first.get("type", "")
        if kind == "json_invalid":
            param, detail = None, "the body is not valid JSON"
        elif kind == "extra_forbidden":
            detail = f"unknown field {param!r}"
        elif kind == "missing":
            detail = f"{param} is required"
        else:
            detail = f"{param}: {first.get('msg', 'invalid value')}"
        return problem(400, "invalid_request", "Invalid request", detail, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return problem(404, "not_found", "Not found", "no such resource")
        return problem(exc.status_code, "invalid_request", "Invalid request", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(
            500,
            "internal_error",
            "Internal error",
            "an unexpected error occurred; it has been logged",
        )


class RequestContext:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): a request id for logs and the
    ``X-Request-ID`` header, and the latency histogram by route template."""

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

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", rid.encode("latin-1")),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.container.metrics.observe_request(
                scope["method"], template, f"{status // 100}xx", time.perf_counter() - started
            )
            logs.request_id.reset(token)


def create_app(container: Container, *, run_dispatcher: bool | None = None) -> FastAPI:
    """The otpgate ASGI app around a built container. The in-process dispatcher runs with the
    app unless ``run_dispatcher`` (default: ``OTPGATE_EMBEDDED_WORKER``) is off."""
    from otpgate.entrypoints.api import receipts, v1

    embedded = container.settings.embedded_worker if run_dispatcher is None else run_dispatcher

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if embedded:
            container.dispatcher.start()
        try:
            yield
        finally:
            await container.aclose()

    app = FastAPI(
        title="otpgate",
        version=__version__,
        description="Self-hosted one-time-code verification: SMS OTP, validation, fraud "
        "defence. Errors are application/problem+json with a stable `code`.",
        lifespan=lifespan,
        # The API's routes are given flat and first: Starlette tries routes in order, and an
        # included router (FastAPI >= 0.160) matches every request twice, once to choose the
        # router and once inside it. The documentation routes FastAPI adds come after these.
        routes=[*v1.router.routes, *receipts.router.routes],
    )
    app.state.container = container
    install_error_handlers(app)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """The process is alive (no I/O)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    async def readyz() -> Response:
        """Storage is reachable; 503 otherwise."""
        try:
            await container.storage.ping()
        except Unavailable as exc:
            return error_response(exc)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics() -> Response:
        return Response(
            container.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get("/errors/{code}", tags=["operations"], response_class=HTMLResponse)
    async def error_page(code: str) -> Response:
        """The page each problem ``type`` links to."""
        cls = _DOCS.get(code)
        if cls is None:
            return PlainTextResponse("unknown error code", status_code=404)
        doc = html.escape((cls.__doc__ or cls.title).strip())
        return HTMLResponse(
            f"<!doctype html><title>{html.escape(cls.code)}</title>"
            f"<h1>{cls.status} {html.escape(cls.code)}</h1><p>{html.escape(cls.title)}</p>"
            f"<p>{doc}</p><p>See docs/errors.md in the otpgate repository.</p>"
        )

    app.add_middleware(RequestContext, container=container)
    app.openapi = lambda: _openapi_with_security(app)  # type: ignore[method-assign]
    return app


def _openapi_with_security(app: FastAPI) -> dict[str, Any]:
    """The generated schema plus the authentication every ``/v1`` route takes (the header is
    read by hand on the hot path, so FastAPI cannot infer it)."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schema.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
        "basic": {
            "type": "http",
            "scheme": "basic",
            "description": "the account's username and an API key",
        },
    }
    for path, operations in schema["paths"].items():
        if path.startswith("/v1/") and not path.startswith("/v1/receipts/"):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"basic": []}]
    app.openapi_schema = schema
    return schema


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (one call per worker process): settings are read
    here, once."""
    settings = Settings()
    logs.configure(settings.log_level, as_json=settings.log_json)
    return create_app(build(settings))
