"""Delivery receipts from providers.

Each provider's receipt URL carries a secret token derived from the master key; a request
without the right token is refused with 403 and changes nothing. A receipt for an unknown
message is acknowledged (so the provider stops retrying) and ignored.
"""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from otpgate.entrypoints.api.problems import error_response, problem_responses
from otpgate.entrypoints.api.v1 import container_of
from otpgate.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)

router = APIRouter(prefix="/v1/receipts", tags=["receipts"])

#: The query parameters, for the document: the token, and whatever the provider reports.
_RECEIPT_QUERY = {
    "parameters": [
        {
            "name": "token",
            "in": "query",
            "required": True,
            "description": "the receipt token otpgate put in the URL it gave the provider",
            "schema": {"type": "string"},
        },
        {
            "name": "subid",
            "in": "query",
            "required": False,
            "description": "LabsMobile: the message's reference; the other parameters "
            "(acklevel, status, desc, msisdn, timestamp) are LabsMobile's as documented",
            "schema": {"type": "string"},
        },
    ]
}
_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "acknowledged", "content": {"text/plain": {"schema": {"type": "string"}}}}
}


@router.get(
    "/{provider}",
    response_class=PlainTextResponse,
    responses={**_OK, **problem_responses(InvalidRequest, Forbidden, NotFound, Unavailable)},
    openapi_extra=_RECEIPT_QUERY,
)
async def receive_receipt(request: Request, provider: str) -> Response:
    """A provider's delivery report (LabsMobile calls by GET with query parameters)."""
    return await _receive(request, provider)


@router.post(
    "/{provider}",
    response_class=PlainTextResponse,
    responses={
        **_OK,
        **problem_responses(InvalidRequest, Forbidden, NotFound, PayloadTooLarge, Unavailable),
    },
    openapi_extra=_RECEIPT_QUERY,
)
async def receive_receipt_post(request: Request, provider: str) -> Response:
    """The same report by POST, with the same query parameters (a body is not read)."""
    return await _receive(request, provider)


async def _receive(request: Request, provider: str) -> Response:
    container = container_of(request)
    parser = container.receipt_parsers.get(provider)
    if parser is None:
        return error_response(NotFound("no receipt endpoint for this provider"))
    presented = request.query_params.get("token", "")
    expected = container.keys.receipt_token(provider)
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        return error_response(Forbidden("receipt token missing or wrong"))
    # LabsMobile reports by GET with query parameters; POST is accepted with the same ones.
    params = {k: v for k, v in request.query_params.items() if k != "token"}
    for name, value in params.items():
        if "\x00" in name or "\x00" in value:
            # No message reference holds one, and no database can compare it.
            return error_response(
                InvalidRequest(f"{name!r} holds a NUL character", param=name.replace("\x00", ""))
            )
    await container.receipts.record(provider, parser.parse_receipt(params))
    return PlainTextResponse("OK")
