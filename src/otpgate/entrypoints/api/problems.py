"""Problem details (RFC 9457): how every error leaves otpgate, and how the OpenAPI document
says so.

Every error answer is ``application/problem+json`` with a stable ``code``; :func:`problem`
builds one, :func:`error_response` turns an :class:`~otpgate.errors.OtpgateError` into one, and
:func:`problem_responses` declares them on a route for the OpenAPI document.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from otpgate.errors import (
    DestinationBlocked,
    IdempotencyInProgress,
    OtpgateError,
    RateLimited,
    ResendTooSoon,
    Unavailable,
)

PROBLEM = "application/problem+json"
#: Where the schema of a problem lives in the OpenAPI document.
PROBLEM_REF = "#/components/schemas/Problem"
#: The errors that may carry ``retry_after`` (and so ``Retry-After``).
_MAY_RETRY = (DestinationBlocked, IdempotencyInProgress, RateLimited, ResendTooSoon, Unavailable)


def _without_defaults(schema: dict[str, Any]) -> None:
    # The optional members are absent when they do not apply, never null: no null default.
    for member in schema.get("properties", {}).values():
        member.pop("default", None)


class Problem(BaseModel):
    """An error answer. Branch on `code`; `detail` is for humans and may change."""

    model_config = ConfigDict(json_schema_extra=_without_defaults)

    type: str = Field(description="`/errors/{code}`: a page that explains the code")
    title: str = Field(description="fixed per code")
    status: int = Field(description="the HTTP status")
    code: str = Field(description="stable and machine-readable")
    detail: str = Field(description="for humans; wording may change")
    # Absent rather than null when they do not apply, so the schema does not admit null.
    param: str | SkipJsonSchema[None] = Field(
        None, description="the field, parameter or header at fault, when there is one"
    )
    retry_after: int | SkipJsonSchema[None] = Field(
        None,
        json_schema_extra={"minimum": 1},
        description="whole seconds to wait when waiting can help; also in `Retry-After`",
    )


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
    """A problem+json response; ``retry_after`` is also sent as ``Retry-After``."""
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


def error_response(exc: OtpgateError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The problem for an otpgate error; a 401 also says which schemes are accepted."""
    if exc.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer, Basic realm="otpgate"'}
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        param=exc.param,
        retry_after=exc.retry_after,
        headers=headers,
    )


def problem_responses(*errors: type[OtpgateError]) -> dict[int | str, dict[str, Any]]:
    """The error answers of one operation, for FastAPI's ``responses=``: one entry per status,
    whose description lists the codes that status can carry there."""
    by_status: dict[int, list[type[OtpgateError]]] = defaultdict(list)
    for error in errors:
        if error not in by_status[error.status]:
            by_status[error.status].append(error)
    responses: dict[int | str, dict[str, Any]] = {}
    for status in sorted(by_status):
        codes = ", ".join(f"`{e.code}`" for e in by_status[status])
        headers: dict[str, Any] = {}
        if status == 401:
            headers["WWW-Authenticate"] = {
                "description": "the accepted schemes",
                "schema": {"type": "string"},
            }
        if status == 405:
            headers["Allow"] = {
                "description": "the methods this path takes",
                "schema": {"type": "string"},
            }
        if any(issubclass(e, _MAY_RETRY) for e in by_status[status]):
            headers["Retry-After"] = {
                "description": "seconds to wait, when `retry_after` is present",
                "schema": {"type": "integer"},
            }
        entry: dict[str, Any] = {
            "description": f"problem+json with `code` {codes}",
            "content": {PROBLEM: {"schema": {"$ref": PROBLEM_REF}}},
        }
        if headers:
            entry["headers"] = headers
        responses[status] = entry
    return responses
