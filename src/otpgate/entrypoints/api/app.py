"""FastAPI application factory and error mapping.

Only this layer turns :mod:`otpgate.errors` into HTTP: every error is
``application/problem+json`` with a stable ``code`` (:mod:`.problems`), and nothing unexpected
ever leaves as a stack trace (:class:`.middleware.RequestContext`).
"""

from __future__ import annotations

import email.message
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from otpgate import __version__
from otpgate.bootstrap import Container, build
from otpgate.entrypoints import logs
from otpgate.entrypoints.api import (
    docs_ui,
    error_pages,
    fraud,
    labsmobile_json,
    labsmobile_otp,
    receipts,
    schemas,
    twilio_verify,
    v1,
)
from otpgate.entrypoints.api.middleware import BodyLimit, RequestContext
from otpgate.entrypoints.api.openapi import build_document
from otpgate.entrypoints.api.problems import error_response, problem_responses
from otpgate.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    OtpgateError,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
)
from otpgate.settings import Settings


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def _is_json(content_type: str | None) -> bool:
    """Whether a ``Content-Type`` names JSON, as FastAPI decides whether to parse a body."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _invalid(request: Request, exc: RequestValidationError) -> OtpgateError:
    """The refusal for a request FastAPI could not validate, in otpgate's words (pydantic's
    internals never reach the client)."""
    first = exc.errors()[0] if exc.errors() else {}
    loc = tuple(first.get("loc", ()))
    kind = first.get("type", "")
    param = _validation_param(loc)
    if kind == "json_invalid":
        return InvalidRequest("the body is not valid JSON")
    if loc[:1] == ("body",) and param is None:
        if kind == "missing":
            return InvalidRequest("this request needs a JSON object as its body")
        if not _is_json(request.headers.get("content-type")):
            return UnsupportedMediaType(
                "send the body as JSON, with the header Content-Type: application/json"
            )
        return InvalidRequest("the body must be a JSON object")
    if kind == "extra_forbidden":
        return InvalidRequest(f"unknown field {param!r}", param=param)
    if kind == "missing":
        return InvalidRequest(f"{param} is required", param=param)
    return InvalidRequest(f"{param}: {first.get('msg', 'invalid value')}", param=param)


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path: the ``Allow`` header of a 405."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OtpgateError)
    async def _otpgate_error(_: Request, exc: OtpgateError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_invalid(request, exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound("no such resource"))
        if exc.status_code == 405:
            allowed = _allowed_methods(request)
            refusal = MethodNotAllowed(f"{request.method} is not allowed here; use {allowed}")
            return error_response(refusal, headers={"Allow": allowed})
        if exc.status_code == 413:
            return error_response(PayloadTooLarge(str(exc.detail)))
        # FastAPI's own refusals (a body it could not read): the request is at fault.
        return error_response(InvalidRequest(str(exc.detail)))


def create_app(container: Container, *, run_dispatcher: bool | None = None) -> FastAPI:
    """The otpgate ASGI app around a built container. The in-process dispatcher runs with the
    app unless ``run_dispatcher`` (default: ``OTPGATE_EMBEDDED_WORKER``) is off."""
    embedded = container.settings.embedded_worker if run_dispatcher is None else run_dispatcher

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if embedded:
            container.start_workers()
        try:
            yield
        finally:
            await container.aclose()

    app = FastAPI(
        title="otpgate",
        version=__version__,
        description="Self-hosted one-time-code verification: SMS OTP, validation, fraud "
        "defence. Errors are `application/problem+json` with a stable `code`; the `type` of "
        "each links to a page that explains it. Request bodies over "
        f"{container.settings.max_body_bytes} bytes are refused with 413.",
        lifespan=lifespan,
        # The API's routes are given flat and first: Starlette tries routes in order, and an
        # included router (FastAPI >= 0.160) matches every request twice, once to choose the
        # router and once inside it. The operations and documentation routes come after these.
        # LabsMobile's OTP (/otp) and SMS JSON (/json) APIs come after the busier /v1 routes.
        routes=[
            *v1.router.routes,
            *fraud.router.routes,
            *receipts.router.routes,
            *labsmobile_otp.router.routes,
            *labsmobile_json.router.routes,
            *twilio_verify.router.routes,
        ],
        docs_url=None,  # served offline by docs_ui instead of from a CDN
        redoc_url=None,
    )
    app.state.container = container
    install_error_handlers(app)

    @app.get("/healthz", tags=["operations"], response_model=schemas.HealthOut)
    async def healthz() -> Response:
        """The process is alive (no I/O)."""
        return JSONResponse({"status": "ok"})

    @app.get(
        "/readyz",
        tags=["operations"],
        response_model=schemas.ReadyOut,
        responses=problem_responses(Unavailable),
    )
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

    @app.get(
        "/errors/{code}",
        tags=["operations"],
        response_class=HTMLResponse,
        responses={
            200: {"description": "what the code means and what the client should do"},
            **problem_responses(NotFound),
        },
    )
    async def error_page(code: str) -> Response:
        """The page each problem's ``type`` links to."""
        error = error_pages.BY_CODE.get(code)
        if error is None:
            return error_response(NotFound("no such error code"))
        return HTMLResponse(error_pages.render(error))

    app.router.routes.extend(docs_ui.router.routes)
    settings = container.settings
    app.add_middleware(
        BodyLimit,
        limit=settings.max_body_bytes,
        larger={
            "/json/send": labsmobile_json.send_body_limit(
                settings.max_body_bytes, settings.json_send_max_recipients
            )
        },
    )
    app.add_middleware(RequestContext, container=container)
    app.openapi = lambda: build_document(app)  # type: ignore[method-assign]
    return app


def create_app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory`` (one call per worker process): settings are read
    here, once."""
    settings = Settings()
    logs.configure(settings.log_level, as_json=settings.log_json)
    return create_app(build(settings))
