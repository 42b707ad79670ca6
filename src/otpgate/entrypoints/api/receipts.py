"""Delivery receipts from providers.

Each provider's receipt URL carries a secret token derived from the master key; a request
without the right token is refused with 403 and changes nothing. A provider that signs its
requests (Twilio's ``X-Twilio-Signature``) is a ``ReceiptAuthenticator``, and a request whose
signature does not verify is refused with 403 too. A receipt for an unknown message is
acknowledged (so the provider stops retrying) and ignored.

The report's parameters are the query's (LabsMobile, Vonage by default) and, for a POST, the
body's fields: form-encoded (Twilio, Vonage) or a JSON object of scalars (Vonage's JSON
receipts). The body is read only after the token matched, and never past the server's body
limit (``OTPGATE_MAX_BODY_BYTES``).

The signature covers the URL the provider called, which is the receipt URL otpgate gave it:
``OTPGATE_PUBLIC_URL`` + ``/v1/receipts/<provider>`` + the query string as received. It is
rebuilt from those rather than from the request's own URL, which behind a proxy or load
balancer names the internal host, scheme or port, not the one the provider signed.
"""

from __future__ import annotations

import hmac
import json
import urllib.parse
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from otpgate.domain.ports import ReceiptAuthenticator
from otpgate.entrypoints.api.problems import error_response, problem_responses
from otpgate.entrypoints.api.v1 import container_of
from otpgate.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnsupportedMediaType,
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
_FIELDS = {"type": "object", "additionalProperties": {"type": "string"}}
_RECEIPT_BODY = {
    **_RECEIPT_QUERY,
    "requestBody": {
        "required": False,
        "description": "the provider's report fields (Twilio: MessageSid, MessageStatus, "
        "ErrorCode or CallSid, CallStatus, signed in X-Twilio-Signature; Vonage: messageId, "
        "status, err-code, client-ref…), merged with the query parameters",
        "content": {
            "application/x-www-form-urlencoded": {"schema": _FIELDS},
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                }
            },
        },
    },
}
_FORM = "application/x-www-form-urlencoded"
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
        **problem_responses(
            InvalidRequest,
            Forbidden,
            NotFound,
            PayloadTooLarge,
            UnsupportedMediaType,
            Unavailable,
        ),
    },
    openapi_extra=_RECEIPT_BODY,
)
async def receive_receipt_post(request: Request, provider: str) -> Response:
    """A report by POST: the query parameters and the body's fields (form or JSON)."""
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
    fields: dict[str, str] = {}
    if request.method == "POST":
        body = await _body_fields(request)
        if isinstance(body, Response):
            return body
        fields = body
    # LabsMobile (and Vonage by default) report by GET with query parameters; Twilio POSTs a form.
    params = {k: v for k, v in request.query_params.items() if k != "token"}
    params.update(fields)
    for name, value in params.items():
        if "\x00" in name or "\x00" in value:
            # No message reference holds one, and no database can compare it.
            return error_response(
                InvalidRequest(f"{name!r} holds a NUL character", param=name.replace("\x00", ""))
            )
    if isinstance(parser, ReceiptAuthenticator):
        query = request.scope.get("query_string", b"").decode("latin-1")
        signed_url = f"{container.settings.public_url}/v1/receipts/{provider}"
        if query:
            signed_url += f"?{query}"
        headers = {k.lower(): v for k, v in request.headers.items()}
        if not parser.authenticate_receipt(signed_url, fields, headers):
            return error_response(Forbidden("receipt signature missing or wrong"))
    await container.receipts.record(provider, parser.parse_receipt(params))
    return PlainTextResponse("OK")


async def _body_fields(request: Request) -> dict[str, str] | Response:
    """The fields of a POST body (form-encoded, or a JSON object of scalars); nothing for an
    empty body; an error answer for anything else. The body limit applies (middleware)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == _FORM:
        try:
            text = raw.decode("utf-8")
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return error_response(InvalidRequest("the form body is not valid UTF-8"))
        return dict(pairs)
    if media_type == "application/json" or media_type.endswith("+json"):
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return error_response(InvalidRequest("the body is not valid JSON"))
        if not isinstance(document, dict):
            return error_response(InvalidRequest("the JSON body must be an object"))
        fields: dict[str, str] = {}
        for name, value in document.items():
            if isinstance(value, bool):
                fields[name] = "true" if value else "false"
            elif isinstance(value, str | int | float):
                fields[name] = str(value)
            elif value is None:
                fields[name] = ""
            else:
                return error_response(
                    InvalidRequest(f"{name!r} must be a string or a number", param=name)
                )
        return fields
    return error_response(
        UnsupportedMediaType(
            "a receipt body must be form-encoded (application/x-www-form-urlencoded) or JSON"
        )
    )
