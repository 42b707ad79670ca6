"""Twilio Verify v2, served by otpgate: ``/v2/Services``, ``/v2/Services/{VA…}/Verifications``
and ``/v2/Services/{VA…}/VerificationCheck``. An application written against Twilio Verify with
an official ``twilio`` SDK works by changing where the SDK sends its requests.

The wire format is Twilio's: form-encoded PascalCase parameters, HTTP Basic with an account SID
(``AC`` and the 32 hex digits of the otpgate account id) and one of the account's API keys as
the auth token, or with an API key SID (``SK`` and the 32 hex digits of that key's id) and the
key, snake_case JSON answers with timestamps ``YYYY-MM-DDTHH:MM:SSZ``, and errors as
Twilio's ``{"code", "message", "more_info", "status"}`` (never problem+json). ``VA…`` SIDs are
otpgate services and ``VE…`` SIDs verifications, with the same 32 hex digits as their native
ids, so both APIs see the same objects. These routes are not in the OpenAPI document, whose
errors are all problem+json; docs/api.md ("Twilio Verify v2 compatibility") describes them.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

from otpgate.domain.model import Channel, Principal, Service, Verification, VerificationStatus
from otpgate.entrypoints.api.v1 import container_of
from otpgate.errors import (
    ChannelNotAllowed,
    CountryNotAllowed,
    DestinationBlocked,
    Forbidden,
    InsufficientCredit,
    InvalidPhoneNumber,
    InvalidRequest,
    MaxSendAttemptsReached,
    NotFound,
    OtpgateError,
    RateLimited,
    ResendTooSoon,
    Unauthorized,
    UnsupportedNumberType,
)
from otpgate.services.verification import StartRequest

_HEX = re.compile(r"^[0-9a-f]{32}$")
_TIMESTAMP = "%Y-%m-%dT%H:%M:%SZ"
#: Twilio's most and default page sizes.
_MAX_PAGE_SIZE, _DEFAULT_PAGE_SIZE = 1000, 50
#: Twilio's channel names and otpgate's.
_CHANNELS = {"sms": Channel.SMS, "call": Channel.VOICE, "email": Channel.EMAIL}
_TWILIO_CHANNEL = {value: key for key, value in _CHANNELS.items()}
#: A service created here behaves as Twilio's: 10 minutes, 5 checks, 5 sends, no cooldown.
_TWILIO_DEFAULTS: dict[str, Any] = {
    "ttl_seconds": 600,
    "max_check_attempts": 5,
    "max_send_attempts": 5,
    "resend_interval_seconds": 0,
    "custom_code_enabled": False,
}


# --- errors -------------------------------------------------------------------------------------


class TwilioError(Exception):
    """An answer in Twilio's error body: HTTP ``status`` and Twilio error ``code``."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _invalid(parameter: str, why: str | None = None) -> TwilioError:
    message = f"Invalid parameter: {parameter}" + (f" ({why})" if why else "")
    return TwilioError(400, 60200, message)


def _not_found() -> TwilioError:
    return TwilioError(404, 20404, "The requested resource was not found")


#: otpgate's parameter names as Twilio's.
_PARAMETER_OF = {
    "to": "To",
    "channel": "Channel",
    "locale": "Locale",
    "custom_code": "CustomCode",
    "code": "Code",
    "name": "FriendlyName",
    "code_length": "CodeLength",
    "context": "Amount",
    "context.amount": "Amount",
    "context.payee": "Payee",
    "client_ip": "DeviceIp",
    "cursor": "PageToken",
}


def _translated(exc: OtpgateError) -> TwilioError:
    """otpgate's refusal as the Twilio error an SDK expects for the same situation."""
    detail = exc.detail
    if isinstance(exc, Unauthorized):
        return TwilioError(401, 20003, "Authenticate")
    if isinstance(exc, NotFound):
        return _not_found()
    if isinstance(exc, UnsupportedNumberType):
        return TwilioError(403, 60205, f"SMS is not supported by landline phone number: {detail}")
    if isinstance(exc, InvalidPhoneNumber | InvalidRequest):
        return _invalid(_PARAMETER_OF.get(exc.param or "", exc.param or "request"), detail)
    if isinstance(exc, CountryNotAllowed):
        return TwilioError(403, 60605, f"Verification delivery attempt blocked: {detail}")
    if isinstance(exc, DestinationBlocked):
        return TwilioError(403, 60410, f"Verification delivery attempt blocked: {detail}")
    if isinstance(exc, ChannelNotAllowed):
        return TwilioError(400, 60223, f"Delivery channel disabled: {detail}")
    if isinstance(exc, MaxSendAttemptsReached):
        return TwilioError(429, 60203, "Max send attempts reached")
    if isinstance(exc, RateLimited | ResendTooSoon):
        return TwilioError(429, 20429, f"Too many requests: {detail}")
    if isinstance(exc, Forbidden) and exc.param == "custom_code":
        return TwilioError(403, 60204, "Service does not support this feature: CustomCode")
    if isinstance(exc, InsufficientCredit):
        # Not a Twilio code: Twilio has no prepaid balance per account of a deployment.
        return TwilioError(402, 20402, f"Insufficient credit: {detail}")
    codes = {400: 60200, 403: 20403, 404: 20404, 405: 20004, 429: 20429, 503: 20503}
    return TwilioError(exc.status, codes.get(exc.status, 20500), detail)


def _error_response(error: TwilioError) -> Response:
    headers = {"WWW-Authenticate": 'Basic realm="otpgate"'} if error.status == 401 else None
    return JSONResponse(
        {
            "code": error.code,
            "message": error.message,
            "more_info": f"https://www.twilio.com/docs/errors/{error.code}",
            "status": error.status,
        },
        status_code=error.status,
        headers=headers,
    )


class TwilioRoute(APIRoute):
    """A route that answers every refusal in Twilio's error body."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except TwilioError as exc:
                return _error_response(exc)
            except OtpgateError as exc:
                if exc.status >= 500:
                    raise  # storage failures and bugs: the app's own answer (503/500)
                return _error_response(_translated(exc))

        return answer


router = APIRouter(prefix="/v2", route_class=TwilioRoute, include_in_schema=False)


# --- SIDs, authentication, parameters -----------------------------------------------------------


def sid(prefix: str, native_id: str) -> str:
    """The Twilio SID of a native id: ``svc_<hex>`` → ``VA<hex>``."""
    return prefix + native_id.partition("_")[2]


def native(twilio_sid: str, prefix: str, native_prefix: str) -> str:
    """The native id of a SID of the given kind, or 20404 when it cannot be one."""
    hex_part = twilio_sid[len(prefix) :]
    if not twilio_sid.startswith(prefix) or not _HEX.match(hex_part):
        raise _not_found()
    return f"{native_prefix}_{hex_part}"


async def twilio_caller(request: Request) -> Principal:
    """HTTP Basic ``AC<hex>:<API key>`` (the key must be one of that account's), or, as with
    Twilio's API keys, ``SK<hex>:<API key>`` where ``SK<hex>`` names that very key."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise TwilioError(401, 20003, "Authenticate")
    try:
        username, sep, secret = (
            base64.b64decode(value.strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        raise TwilioError(401, 20003, "Authenticate") from None
    kind = username[:2]
    if not sep or kind not in ("AC", "SK") or not _HEX.match(username[2:]):
        raise TwilioError(401, 20003, "Authenticate")
    try:
        principal = await container_of(request).access.authenticate(secret)
    except Unauthorized:
        raise TwilioError(401, 20003, "Authenticate") from None
    named = principal.account.id if kind == "AC" else principal.key_id
    if not hmac.compare_digest(sid(kind, named).encode(), username.encode()):
        raise TwilioError(401, 20003, "Authenticate")
    return principal


Caller = Annotated[Principal, Depends(twilio_caller)]


async def _form(request: Request) -> dict[str, str]:
    """The form-encoded body (the last value of a repeated key), or 60200 when it is not one."""
    body = await request.body()
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise _invalid("body", "send application/x-www-form-urlencoded parameters") from None
    form = dict(pairs)
    for key, value in form.items():
        if "\x00" in key or "\x00" in value:
            raise _invalid(key)
    return form


def _bool(form: Mapping[str, str], name: str) -> bool | None:
    value = form.get(name)
    if value is None:
        return None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _invalid(name, "true or false")


def _int(form: Mapping[str, str], name: str) -> int | None:
    value = form.get(name)
    if value is None:
        return None
    # ASCII digits only: str.isdigit() is true for "²" and "①", which int() refuses, and for
    # other scripts' digits, which Twilio does not take as numbers either.
    if not (value.isascii() and value.isdigit()) or len(value) > 6:
        raise _invalid(name, "an integer")
    return int(value)


def _refuse_constant(name: str) -> None:
    raise ValueError(name)  # NaN and Infinity are JavaScript's, not JSON's


def _json_object(text: str) -> Any:
    """``text`` parsed as strict JSON (no NaN or Infinity), or None when it is not JSON."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):  # nested past the parser's depth: not JSON to us
        return None


def _base_url(request: Request) -> str:
    settings = container_of(request).settings
    if "public_url" in settings.model_fields_set:
        return settings.public_url.rstrip("/")
    return str(request.base_url).rstrip("/")


def _timestamp(moment: datetime) -> str:
    return moment.strftime(_TIMESTAMP)


# --- renderers ----------------------------------------------------------------------------------


def _service_json(service: Service, base: str) -> dict[str, Any]:
    policy = service.policy
    url = f"{base}/v2/Services/{sid('VA', service.id)}"
    return {
        "sid": sid("VA", service.id),
        "account_sid": sid("AC", service.account_id),
        "friendly_name": policy.name,
        "code_length": policy.code_length,
        # What otpgate always does: no carrier lookup, amount and payee bound whenever they
        # are given, no SMS to landlines, the "do not share" line in every built-in template.
        "lookup_enabled": False,
        "psd2_enabled": True,
        "skip_sms_to_landlines": True,
        "dtmf_input_required": False,
        "tts_name": None,
        "do_not_share_warning_enabled": True,
        "custom_code_enabled": policy.custom_code_enabled,
        "push": {},
        "totp": {},
        "whatsapp": {},
        "passkeys": {},
        "default_template_sid": None,
        "verify_event_subscription_enabled": False,
        "date_created": _timestamp(service.created_at),
        "date_updated": _timestamp(service.updated_at),
        "url": url,
        "links": {
            "verifications": f"{url}/Verifications",
            "verification_checks": f"{url}/VerificationCheck",
        },
    }


def _verification_core(v: Verification, status: VerificationStatus) -> dict[str, Any]:
    context = v.context or {}
    return {
        "sid": sid("VE", v.id),
        "service_sid": sid("VA", v.service_id),
        "account_sid": sid("AC", v.account_id),
        "to": v.to,
        "channel": _TWILIO_CHANNEL[v.channel],
        "status": status.value,
        "valid": status is VerificationStatus.APPROVED,
        "amount": context.get("amount"),
        "payee": context.get("payee"),
        "date_created": _timestamp(v.created_at),
        "date_updated": _timestamp(v.updated_at),
    }


def _verification_json(v: Verification, status: VerificationStatus, base: str) -> dict[str, Any]:
    messages = sorted(v.messages, key=lambda m: m.created_at)
    return {
        **_verification_core(v, status),
        "lookup": {},
        "send_code_attempts": [
            {
                "time": _timestamp(m.created_at),
                "channel": _TWILIO_CHANNEL[m.channel],
                "attempt_sid": sid("VL", m.id),
            }
            for m in messages
        ],
        "sna": None,
        "url": f"{base}/v2/Services/{sid('VA', v.service_id)}/Verifications/{sid('VE', v.id)}",
    }


# --- services -----------------------------------------------------------------------------------


def _service_fields(form: Mapping[str, str], *, creating: bool) -> dict[str, Any]:
    """The otpgate policy fields of Twilio's service parameters; the ones otpgate has no
    setting for are accepted and ignored (docs/api.md lists them)."""
    fields: dict[str, Any] = dict(_TWILIO_DEFAULTS) if creating else {}
    name = form.get("FriendlyName")
    if name is not None:
        fields["name"] = name
    elif creating:
        raise _invalid("FriendlyName", "required")
    code_length = _int(form, "CodeLength")
    if code_length is not None:
        fields["code_length"] = code_length
    custom = _bool(form, "CustomCodeEnabled")
    if custom is not None:
        fields["custom_code_enabled"] = custom
    for flag in (
        "Psd2Enabled",
        "DoNotShareWarningEnabled",
        "LookupEnabled",
        "SkipSmsToLandlines",
        "DtmfInputRequired",
    ):
        _bool(form, flag)  # checked, then ignored
    return fields


async def _service(request: Request, principal: Principal, service_sid: str) -> Service:
    return await container_of(request).catalog.get(principal, native(service_sid, "VA", "svc"))


@router.post("/Services")
async def create_service(request: Request, principal: Caller) -> Response:
    fields = _service_fields(await _form(request), creating=True)
    service = await container_of(request).catalog.create(principal, fields)
    return JSONResponse(_service_json(service, _base_url(request)), status_code=201)


@router.get("/Services")
async def list_services(request: Request, principal: Caller) -> Response:
    query = request.query_params
    size = _int(query, "PageSize")
    if size is None:
        size = _DEFAULT_PAGE_SIZE
    if not 1 <= size <= _MAX_PAGE_SIZE:
        raise _invalid("PageSize", f"1 to {_MAX_PAGE_SIZE}")
    page_number = _int(query, "Page") or 0
    token = query.get("PageToken") or None
    page = await container_of(request).catalog.list(principal, limit=size, cursor=token)
    base = _base_url(request)
    url = f"{base}/v2/Services"
    next_url = None
    if page.next_cursor is not None:
        next_url = f"{url}?" + urlencode(
            {"PageSize": size, "Page": page_number + 1, "PageToken": page.next_cursor}
        )
    return JSONResponse(
        {
            "services": [_service_json(service, base) for service in page.items],
            "meta": {
                "page": page_number,
                "page_size": size,
                "first_page_url": f"{url}?" + urlencode({"PageSize": size, "Page": 0}),
                "previous_page_url": None,
                "url": f"{url}?" + urlencode({"PageSize": size, "Page": page_number}),
                "next_page_url": next_url,
                "key": "services",
            },
        }
    )


@router.get("/Services/{service_sid}")
async def fetch_service(request: Request, principal: Caller, service_sid: str) -> Response:
    service = await _service(request, principal, service_sid)
    return JSONResponse(_service_json(service, _base_url(request)))


@router.post("/Services/{service_sid}")
async def update_service(request: Request, principal: Caller, service_sid: str) -> Response:
    service_id = native(service_sid, "VA", "svc")
    fields = _service_fields(await _form(request), creating=False)
    service = await container_of(request).catalog.update(principal, service_id, fields)
    return JSONResponse(_service_json(service, _base_url(request)))


@router.delete("/Services/{service_sid}")
async def delete_service(request: Request, principal: Caller, service_sid: str) -> Response:
    await container_of(request).catalog.delete(principal, native(service_sid, "VA", "svc"))
    return Response(status_code=204)


# --- verifications ------------------------------------------------------------------------------


def _context(form: Mapping[str, str]) -> dict[str, str] | None:
    context = {
        key: form[name] for key, name in (("amount", "Amount"), ("payee", "Payee")) if name in form
    }
    return context or None


def _channel(form: Mapping[str, str]) -> str:
    name = form.get("Channel")
    if name is None:
        raise _invalid("Channel", "required")
    channel = _CHANNELS.get(name)
    if channel is None:
        raise _invalid("Channel", "sms, call or email")
    return channel.value


@router.post("/Services/{service_sid}/Verifications")
async def create_verification(request: Request, principal: Caller, service_sid: str) -> Response:
    """Twilio's start: a pending verification of (service, To) is sent again with the same
    code; otherwise a new one. Always 201, as Twilio answers."""
    service_id = native(service_sid, "VA", "svc")
    form = await _form(request)
    to = form.get("To")
    if not to:
        raise _invalid("To", "required")
    channel = _channel(form)
    for parameter in ("ChannelConfiguration", "RateLimits"):
        if parameter in form and not isinstance(_json_object(form[parameter]), dict):
            raise _invalid(parameter, "a JSON object")
    verifications = container_of(request).verifications
    verification, _ = await verifications.start(
        principal,
        StartRequest(
            service_id=service_id,
            to=to,
            channel=channel,
            locale=form.get("Locale") or None,
            custom_code=form.get("CustomCode") or None,
            context=_context(form),
            client_ip=form.get("DeviceIp") or None,
        ),
    )
    status = verification.status_at(verifications.now())
    return JSONResponse(
        _verification_json(verification, status, _base_url(request)), status_code=201
    )


async def _pending(
    request: Request, principal: Principal, service_sid: str, ve: str
) -> Verification:
    """A verification of the service, as Twilio shows one: 20404 once it is not pending
    (Twilio keeps only pending verifications)."""
    service_id = native(service_sid, "VA", "svc")
    verifications = container_of(request).verifications
    verification = await verifications.get(principal, native(ve, "VE", "ver"))
    if verification.service_id != service_id:
        raise _not_found()
    if verification.status_at(verifications.now()) is not VerificationStatus.PENDING:
        raise _not_found()
    return verification


@router.get("/Services/{service_sid}/Verifications/{verification_sid}")
async def fetch_verification(
    request: Request, principal: Caller, service_sid: str, verification_sid: str
) -> Response:
    verification = await _pending(request, principal, service_sid, verification_sid)
    return JSONResponse(
        _verification_json(verification, VerificationStatus.PENDING, _base_url(request))
    )


@router.post("/Services/{service_sid}/Verifications/{verification_sid}")
async def update_verification(
    request: Request, principal: Caller, service_sid: str, verification_sid: str
) -> Response:
    """``Status=canceled`` or ``Status=approved`` on a pending verification."""
    form = await _form(request)
    wanted = form.get("Status")
    if wanted not in ("canceled", "approved"):
        raise _invalid("Status", "canceled or approved")
    verification = await _pending(request, principal, service_sid, verification_sid)
    verifications = container_of(request).verifications
    if wanted == "canceled":
        updated = await verifications.cancel(principal, verification.id)
    else:
        updated = await verifications.approve(principal, verification.id)
    status = updated.status_at(verifications.now())
    return JSONResponse(_verification_json(updated, status, _base_url(request)))


@router.post("/Services/{service_sid}/VerificationCheck")
async def check_verification(request: Request, principal: Caller, service_sid: str) -> Response:
    """Check ``Code`` against the verification named by ``VerificationSid`` or the latest one
    of ``To``. A wrong code is ``pending`` (or ``max_attempts_reached`` on the last attempt);
    a check of a verification out of attempts is 429/60202, of any other closed one 404."""
    service_id = native(service_sid, "VA", "svc")
    form = await _form(request)
    code = form.get("Code")
    if not code:
        raise _invalid("Code", "required")
    verifications = container_of(request).verifications
    ve, to = form.get("VerificationSid"), form.get("To")
    if ve:
        verification = await verifications.get(principal, native(ve, "VE", "ver"))
        if verification.service_id != service_id:
            raise _not_found()
    elif to:
        latest = await verifications.latest_for_destination(principal, service_id=service_id, to=to)
        if latest is None:
            raise _not_found()
        verification = latest
    else:
        raise _invalid("To", "To or VerificationSid is required")
    status = verification.status_at(verifications.now())
    if status is VerificationStatus.MAX_ATTEMPTS_REACHED:
        raise TwilioError(429, 60202, "Max check attempts reached")
    if status is not VerificationStatus.PENDING:
        raise _not_found()
    result = await verifications.check(principal, verification.id, code, _context(form))
    if (
        result.status is not VerificationStatus.PENDING
        and not result.valid
        and (result.status is not VerificationStatus.MAX_ATTEMPTS_REACHED)
    ):
        raise _not_found()  # closed by another request meanwhile
    return JSONResponse(_check_json(verification, result.status))


def _check_json(v: Verification, status: VerificationStatus) -> dict[str, Any]:
    return {**_verification_core(v, status), "sna_attempts_error_codes": []}
