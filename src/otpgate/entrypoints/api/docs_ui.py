"""The API documentation pages, served whole by otpgate: ``/docs`` (Swagger UI) and ``/redoc``
(ReDoc).

Their scripts, style sheet and icon come from the installed ``fastapi-offline`` package and are
served under ``/docs/assets/``, so the pages load nothing from another host and work on a
network without internet access. Swagger UI's online validator badge is turned off for the same
reason.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

from otpgate.entrypoints.api.problems import error_response
from otpgate.errors import NotFound

ASSETS_PATH = "/docs/assets"
#: The assets the pages use, by the name they are served under, with their content types.
ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
_STATIC = files("fastapi_offline") / "static"
#: Swagger UI settings: no call to the public validator, and the authorisation kept while the
#: page is open so "Try it out" can be used across operations.
_SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None, "persistAuthorization": True}

router = APIRouter(include_in_schema=False)


def _prefix(request: Request) -> str:
    """The path otpgate is mounted under behind a proxy (``root_path``), or nothing."""
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _prefix(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="otpgate API",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        oauth2_redirect_url=None,
        swagger_ui_parameters=_SWAGGER_PARAMETERS,
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _prefix(request)
    return get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title="otpgate API",
        redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon.png",
        with_google_fonts=False,
    )


@cache
def _read(name: str) -> bytes:
    return (_STATIC / name).read_bytes()


@router.get(ASSETS_PATH + "/{name}")
async def asset(name: str) -> Response:
    """One of the pages' files; nothing else of the package is reachable."""
    content_type = ASSETS.get(name)
    if content_type is None:
        return error_response(NotFound("no such documentation asset"))
    return Response(
        _read(name),
        media_type=content_type,
        headers={"Cache-Control": "public, max-age=86400"},
    )
