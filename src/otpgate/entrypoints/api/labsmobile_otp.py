"""LabsMobile's OTP API, served by otpgate: ``GET /otp/sendCode``, ``/otp/resendCode``,
``/otp/validateCode`` and ``/otp/checkCode``. A client written for LabsMobile works by
changing its base URL and credentials.

The wire format is LabsMobile's: query parameters, HTTP Basic ``username:API key``, and a
``text/plain`` answer ``1`` or ``0``. LabsMobile's clients read only the body, so every refusal
(a bad parameter, a number that cannot receive SMS, a limit, credit) is a ``200`` answer ``0``.
Its reason travels in headers for those who look: ``X-Otpgate-Error`` (the ``/v1`` error code,
or the verification's status), ``X-Otpgate-Param`` (the parameter at fault) and ``Retry-After``.
Two answers are not ``0``, because neither says anything about a code and a client must not take
them for "wrong code" or "not validated": credentials otpgate cannot accept (``401`` with
``WWW-Authenticate: Basic``) and storage that cannot answer (``503``, retry later).

``env`` names one of the account's services. The first sendCode that names a new one creates it
with default settings; its policy (validity, attempts, resends, countries) is managed through
``/v1/services`` like any other.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from fastapi.routing import APIRoute

from otpgate.domain import policy as rules
from otpgate.domain import sms
from otpgate.domain.model import Principal, Service, VerificationStatus
from otpgate.domain.phone import Destination, parse_phone, require_sms_capable
from otpgate.entrypoints.api import schemas as s
from otpgate.entrypoints.api.problems import error_response, problem, problem_responses
from otpgate.entrypoints.api.v1 import container_of
from otpgate.errors import (
    InvalidPhoneNumber,
    InvalidRequest,
    NotFound,
    RequestRefused,
    Unauthorized,
    Unavailable,
)
from otpgate.services.verification import StartRequest

#: The header that carries the reason of every answer other than ``1``.
ERROR_HEADER = "X-Otpgate-Error"
#: The header that names the query parameter at fault, when one is.
PARAM_HEADER = "X-Otpgate-Param"
#: ``X-Otpgate-Error`` of a wrong code for a verification that is still pending.
INVALID_CODE = "invalid_code"
#: Where LabsMobile's ``message`` puts the code.
CODE_MARK = "%CODE%"
#: The service a request without ``env`` (or with an empty one) uses.
DEFAULT_ENV = "default"

#: The query parameters otpgate's own errors name by another name.
_PARAMETER_OF = {
    "to": "phone_number",
    "template": "message",
    "sender_id": "sender",
    "code_length": "digits",
    "name": "env",
    "service_id": "env",
}
_PARAMETERS = frozenset({"env", "sender", "phone_number", "message", "digits", "code"})
_DIGITS = re.compile(r"[0-9]+")


# --- answers ------------------------------------------------------------------------------------


def _one() -> Response:
    return PlainTextResponse("1")


def _zero(reason: str, *, param: str | None = None, retry_after: int | None = None) -> Response:
    headers = {ERROR_HEADER: reason}
    if param is not None:
        parameter = _PARAMETER_OF.get(param, param)
        if parameter in _PARAMETERS:
            headers[PARAM_HEADER] = parameter
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return PlainTextResponse("0", headers=headers)


def _refused(exc: RequestRefused) -> Response:
    return _zero(exc.code, param=exc.param, retry_after=exc.retry_after)


def _unauthorized(exc: Unauthorized) -> Response:
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        headers={"WWW-Authenticate": 'Basic realm="otpgate"', ERROR_HEADER: exc.code},
    )


def _invalid_parameter(exc: RequestValidationError) -> InvalidRequest:
    """A query parameter FastAPI could not take (missing, not an integer, a NUL), in
    otpgate's words."""
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "query") or None
    if first.get("type") == "missing":
        return InvalidRequest(f"{param} is required", param=param)
    return InvalidRequest(f"{param}: {first.get('msg', 'invalid value')}", param=param)


class LabsMobileRoute(APIRoute):
    """A route that answers the LabsMobile way: any refusal is ``0`` with its reason in
    headers; bad credentials ``401`` and storage failures ``503`` stay problems."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _refused(_invalid_parameter(exc))
            except Unauthorized as exc:
                return _unauthorized(exc)
            except RequestRefused as exc:
                return _refused(exc)
            except Unavailable as exc:
                return error_response(exc, headers={ERROR_HEADER: exc.code})

        return answer


router = APIRouter(prefix="/otp", tags=["labsmobile otp"], route_class=LabsMobileRoute)


# --- authentication -----------------------------------------------------------------------------


async def basic_caller(request: Request) -> Principal:
    """HTTP Basic ``username:API key``, as LabsMobile takes it (the username is the key's
    account's ``username``)."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise Unauthorized("send HTTP Basic credentials: the account's username and an API key")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthorized("malformed Basic credentials") from None
    username, sep, secret = decoded.partition(":")
    if not sep:
        raise Unauthorized("malformed Basic credentials")
    return await container_of(request).access.authenticate_basic(username, secret)


Caller = Annotated[Principal, Depends(basic_caller)]


# --- parameters ---------------------------------------------------------------------------------

Env = Annotated[
    s.Text | None,
    Query(
        description="the application or process the code belongs to: the name of one of the "
        "account's services (1–40 characters, trimmed), created with default settings by the "
        f"first sendCode that names it; `{DEFAULT_ENV}` when absent or empty",
    ),
]
PhoneNumber = Annotated[
    s.Text,
    Query(
        description="digits with the country code and no `+` or `00` (`34600000000`)",
        json_schema_extra={"pattern": "^[0-9]+$"},
    ),
]
Message = Annotated[
    s.Text | None,
    Query(
        description=f"the SMS text, with `{CODE_MARK}` where the code goes; it must fit one "
        "SMS with the code in it. When absent, the env's service template.",
        json_schema_extra={"pattern": CODE_MARK},
    ),
]
Sender = Annotated[
    s.Text | None,
    Query(
        description="the sender id: 1–11 letters, digits or spaces with at least one letter, "
        "or up to 15 digits; the env's service sender id when absent or empty",
    ),
]
Digits = Annotated[
    int | None,
    Query(
        description="the code length, 4–10; the env's service `code_length` (6 by default) "
        "when absent",
        json_schema_extra={"minimum": 4, "maximum": 10},
    ),
]
Code = Annotated[s.Text, Query(description="the code the user typed")]


def env_name(env: str | None) -> str:
    """The service name an ``env`` stands for."""
    name = (env or "").strip() or DEFAULT_ENV
    if len(name) > sms.MAX_BRAND_LENGTH:
        raise InvalidRequest(f"env must be at most {sms.MAX_BRAND_LENGTH} characters", param="env")
    return name


def destination_of(phone_number: str) -> Destination:
    """LabsMobile's ``phone_number`` (digits with the country code) as a valid number."""
    if not _DIGITS.fullmatch(phone_number):
        raise InvalidPhoneNumber(
            "phone_number must be digits only, with the country code and no + or 00",
            param="phone_number",
        )
    return parse_phone("+" + phone_number)


def template_of(message: str | None) -> str | None:
    """LabsMobile's ``message`` as an otpgate template: its braces doubled, so that they stay
    literal text, then each ``%CODE%`` made ``{code}``. None stays None (the service's)."""
    if message is None:
        return None
    if CODE_MARK not in message:
        raise InvalidRequest(f"message must contain {CODE_MARK}", param="message")
    return message.replace("{", "{{").replace("}", "}}").replace(CODE_MARK, "{code}")


async def _existing_env(request: Request, principal: Principal, env: str | None) -> Service:
    """The service of an ``env`` that must exist already."""
    service = await container_of(request).catalog.find_named(principal, env_name(env))
    if service is None:
        raise NotFound("no code was ever sent in this env", param="env")
    return service


# --- routes -------------------------------------------------------------------------------------

#: The ``200`` answer of every route, with its headers.
_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`1`, or `0` for any refusal: a missing or malformed parameter, a "
        "number that cannot receive SMS, a limit, credit. A `0` says why in "
        f"`{ERROR_HEADER}`.",
        "content": {"text/plain": {"schema": {"type": "string", "enum": ["1", "0"]}}},
        "headers": {
            ERROR_HEADER: {
                "description": "with `0`: the `/v1` error code of the refusal "
                "(`invalid_request`, `invalid_phone_number`, `resend_too_soon`, …), "
                f"`{INVALID_CODE}` for a wrong code, or the status of the verification "
                "(`pending`, `approved`, `expired`, …)",
                "schema": {"type": "string"},
            },
            PARAM_HEADER: {
                "description": "with `0`: the query parameter at fault, when there is one",
                "schema": {"type": "string"},
            },
            "Retry-After": {
                "description": "with `0`: seconds to wait before a send may be tried again",
                "schema": {"type": "integer"},
            },
        },
    },
    **problem_responses(Unauthorized, Unavailable),
}
for _status in (401, 503):
    _ANSWER[_status]["headers"][ERROR_HEADER] = {
        "description": "the problem's `code`",
        "schema": {"type": "string"},
    }
_OPERATION: dict[str, Any] = {
    "response_class": PlainTextResponse,
    "responses": _ANSWER,
    "openapi_extra": {"security": [{"basic": []}]},
}


@router.get("/sendCode", **_OPERATION)
async def send_code(
    request: Request,
    principal: Caller,
    phone_number: PhoneNumber,
    env: Env = None,
    sender: Sender = None,
    message: Message = None,
    digits: Digits = None,
) -> Response:
    """Cancel the pending code of (`env`, `phone_number`), if there is one, and send a new
    code. A new code within a pending one's process keeps its send count and resend
    interval: `0` with `resend_too_soon` or `max_send_attempts_reached` when they refuse."""
    container = container_of(request)
    name = env_name(env)
    destination = destination_of(phone_number)
    require_sms_capable(destination)
    start = StartRequest(
        service_id="",
        to=destination.e164,
        template=template_of(message),
        sender_id=sender or None,
        code_length=digits,
        replace_pending=True,
    )
    service = await container.catalog.find_named(principal, name)
    if service is None:
        # Refuse the request's own bad parameters before creating the service, so that they
        # leave no trace. A refusal by policy after this point (a blocked destination, no
        # credit) keeps the new service, as configuration: removing it again would race with
        # a concurrent first sendCode of this env (docs/api.md). Two first sendCodes of one
        # env may both create it; both then use the oldest.
        container.verifications.check_own_settings(rules.build_policy({"name": name}), start)
        created = await container.catalog.named(principal, name)
        service = await container.catalog.find_named(principal, name) or created
    await container.verifications.start(principal, replace(start, service_id=service.id))
    return _one()


@router.get("/resendCode", **_OPERATION)
async def resend_code(
    request: Request,
    principal: Caller,
    phone_number: PhoneNumber,
    env: Env = None,
    sender: Sender = None,
    message: Message = None,
    digits: Digits = None,
) -> Response:
    """Send the pending code of (`env`, `phone_number`) again: the same code, text and
    sender as its sendCode (`sender`, `message` and `digits` are accepted and not used).
    `0` with `not_found` when there is no pending code."""
    to = destination_of(phone_number).e164
    service = await _existing_env(request, principal, env)
    await container_of(request).verifications.resend_to_destination(
        principal, service_id=service.id, to=to
    )
    return _one()


@router.get("/validateCode", **_OPERATION)
async def validate_code(
    request: Request, principal: Caller, phone_number: PhoneNumber, code: Code, env: Env = None
) -> Response:
    """Check `code` against the latest code of (`env`, `phone_number`): `1` only for the right
    code of a pending one, once. A wrong code counts an attempt and answers `0` with
    `invalid_code`; a code no longer pending answers `0` with its status."""
    to = destination_of(phone_number).e164
    service = await _existing_env(request, principal, env)
    result = await container_of(request).verifications.check_destination(
        principal, service_id=service.id, to=to, code=code
    )
    if result.valid:
        return _one()
    if result.status is VerificationStatus.PENDING:
        return _zero(INVALID_CODE, param="code")
    return _zero(result.status.value)


@router.get("/checkCode", **_OPERATION)
async def check_code(
    request: Request, principal: Caller, phone_number: PhoneNumber, env: Env = None
) -> Response:
    """`1` when the latest code of (`env`, `phone_number`) was validated; otherwise `0` with
    its status (`pending`, `expired`, …), or `not_found` when none was ever sent."""
    to = destination_of(phone_number).e164
    service = await _existing_env(request, principal, env)
    verifications = container_of(request).verifications
    latest = await verifications.latest_for_destination(principal, service_id=service.id, to=to)
    if latest is None:
        raise NotFound("no code was ever sent to this number in this env")
    status = latest.status_at(verifications.now())
    if status is VerificationStatus.APPROVED:
        return _one()
    return _zero(status.value)
