"""Delivery receipts from providers (API.md §6, SECURITY.md S20).

Each provider's receipt URL carries a secret token derived from the master key; a request
without the right token is refused with 403 and changes nothing. A receipt for an unknown
message is acknowledged (so the provider stops retrying) and ignored.
"""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from otpgate.entrypoints.api.app import problem
from otpgate.entrypoints.api.v1 import container_of

router = APIRouter(prefix="/v1/receipts", tags=["receipts"])


@router.get("/{provider}")
async def receive_receipt(request: Request, provider: str) -> Response:
    """A provider's delivery report (LabsMobile calls by GET with query parameters)."""
    return await _receive(request, provider)


@router.post("/{provider}")
async def receive_receipt_post(request: Request, provider: str) -> Response:
    """The same report by POST, with the same query parameters."""
    return await _receive(request, provider)


async def _receive(request: Request, provider: str) -> Response:
    container = container_of(request)
    parser = container.receipt_parsers.get(provider)
    if parser is None:
        return problem(404, "not_found", "Not found", "no receipt endpoint for this provider")
    presented = request.query_params.get("token", "")
    expected = container.keys.receipt_token(provider)
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        return problem(403, "forbidden", "Forbidden", "receipt token missing or wrong")
    # LabsMobile reports by GET with query parameters; POST is accepted with the same ones.
    params = {k: v for k, v in request.query_params.items() if k != "token"}
    await container.receipts.record(provider, parser.parse_receipt(params))
    return PlainTextResponse("OK")
