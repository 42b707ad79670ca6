"""LabsMobile's SMS JSON API, served by otpgate: ``POST /json/send``, ``GET /json/balance``,
``POST /json/prices`` and ``POST /json/scheduled``. A client written for LabsMobile works by
changing its base URL and credentials.

The wire format is LabsMobile's: HTTP Basic ``username:API key``, JSON bodies, and answers that
carry a LabsMobile **result code** (a string on ``/json/send``, an integer elsewhere) with HTTP
``200`` whatever the code says, because LabsMobile's clients read the code only from a ``2xx``
answer. Every refusal, bad input and storage failure included, is such an answer; the table of
codes and the order in which they are checked is in ``docs/api.md``. Three answers are HTTP
errors: credentials otpgate cannot accept (``401`` with ``WWW-Authenticate: Basic``), and, before
any of this code runs, a body over the size limit (``413``) or a ``Content-Length`` that is not a
number (``400``), both from :class:`~otpgate.entrypoints.api.middleware.BodyLimit`.

A send goes through :meth:`otpgate.services.messaging.Messaging.send`: the same outbox,
dispatcher, encoding, prices and credit as every other message, a batch accepted or refused
whole. The checks here come first only to give each refusal its LabsMobile code.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field, RootModel
from pydantic.json_schema import SkipJsonSchema

from otpgate.domain import sms
from otpgate.domain.ascii import ascii_upper
from otpgate.domain.billing import DEFAULT_COUNTRY, UNITS_PER_CREDIT, BillingMode
from otpgate.domain.model import Principal
from otpgate.domain.phone import parse_phone, require_sms_capable
from otpgate.entrypoints.api import schemas as s
from otpgate.entrypoints.api.problems import problem, problem_responses
from otpgate.entrypoints.api.v1 import container_of
from otpgate.errors import (
    CountryNotAllowed,
    DestinationBlocked,
    InsufficientCredit,
    InvalidPhoneNumber,
    InvalidRequest,
    OtpgateError,
    OutboundRefused,
    PayloadTooLarge,
    RequestRefused,
    Unauthorized,
    Unavailable,
    UnsupportedNumberType,
)
from otpgate.services.billing import known_country
from otpgate.services.messaging import MAX_CLIENT_REF_LENGTH, MAX_LABEL_LENGTH, SmsRequest

#: The SMS parts a message may take with ``long`` (LabsMobile: 459 GSM-7 characters); one without.
LONG_SEGMENTS = 3
#: The longest ``ackurl`` accepted (the outbound client's limit).
MAX_ACK_URL_LENGTH = 2048
#: Bytes a recipient may take in a ``/json/send`` body (``{"msisdn": "+…"}`` with generous
#: white space): that route's body limit is the general one plus this for every recipient
#: allowed, so that a full batch always fits.
BYTES_PER_RECIPIENT = 64
#: LabsMobile's answer to an accepted send.
SENT = "Message has been successfully sent"

_MSISDN = re.compile(r"[0-9]{1,15}")
_SCHEDULED = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}")
_FLAG_WORDS = {"1": True, "true": True, "0": False, "false": False, "": False}
#: LabsMobile fields otpgate does not serve: a send that sets one is refused rather than sent
#: without what it asked for (a certified SMS, placeholders left unreplaced).
_NOT_SERVED = ("shortlink", "clickurl", "crt", "crt_id", "crt_name", "parameters")


class ResultCode(enum.IntEnum):
    """LabsMobile's result codes, as otpgate answers them."""

    OK = 0
    MISSING_JSON = 10
    MALFORMED_JSON = 11
    MESSAGE_MISSING = 20
    MESSAGE_EMPTY = 21
    NO_RECIPIENTS = 23
    TOO_MANY_RECIPIENTS = 24
    INVALID_CHARACTERS = 27
    SUBID_TOO_LONG = 28
    SEND_ERROR = 30
    NO_CREDIT = 35
    BAD_SCHEDULE = 39
    SCHEDULED_IN_TEST = 41


class Refusal(InvalidRequest):
    """A request refused with a LabsMobile result code. Raised and answered inside this module;
    an ``InvalidRequest``, so that one escaping by mistake would still be a plain 400."""

    def __init__(self, result: ResultCode, detail: str) -> None:
        super().__init__(detail)
        self.result = result


def send_body_limit(max_body_bytes: int, max_recipients: int) -> int:
    """The body limit of ``POST /json/send``: the general one, plus room for every recipient
    that a request may name."""
    return max_body_bytes + BYTES_PER_RECIPIENT * max_recipients


# --- answers ------------------------------------------------------------------------------------


class SendAnswer(BaseModel):
    """The answer of `/json/send`, with HTTP 200 whatever `code` says."""

    code: str = Field(
        description="the result code, **a string**: `0` accepted, otherwise the refusal",
        json_schema_extra={"pattern": "^[0-9]+$"},
    )
    message: str = Field(description="for humans: what was done, or why not")
    subid: str | SkipJsonSchema[None] = Field(
        None,
        description="with `0`: the request's `subid`, or the one otpgate made for it (20 hex "
        "characters); delivery reports carry it",
    )


class CodeAnswer(BaseModel):
    """An answer with an integer result code, with HTTP 200 whatever `code` says."""

    code: int = Field(description="the result code, **an integer**: `0` done")
    message: str = Field(description="for humans: what was done, or why not")


class BalanceAnswer(BaseModel):
    """The answer of `/json/balance`, with HTTP 200 whatever `code` says."""

    code: int = Field(description="the result code, **an integer**: `0`, or `30` (try again)")
    credits: str | SkipJsonSchema[None] = Field(
        None,
        description="with `0`: the account's balance, a decimal number of credits as text with "
        "at least two decimals (`17.50`)",
    )
    message: str | SkipJsonSchema[None] = Field(
        None, description="with another code: why there is no balance"
    )


class CountryPriceAnswer(BaseModel):
    """The price of one SMS part to one country."""

    isocode: str = Field(description="ISO 3166-1 alpha-2")
    prefix: str = Field(description="the country's calling code, without `+`")
    name: str = Field(description="the country's English name")
    credits: float = Field(description="credits per SMS part, a number (at most 4 decimals)")


class PricesAnswer(RootModel[dict[str, CountryPriceAnswer] | CodeAnswer]):
    """The prices keyed by ISO code, or a refusal with an integer result code."""


def _send_answer(result: ResultCode, message: str, subid: str | None = None) -> Response:
    body: dict[str, Any] = {"code": str(int(result)), "message": message}
    if subid is not None:
        body["subid"] = subid
    return JSONResponse(body)


def _code_answer(result: ResultCode, message: str) -> Response:
    return JSONResponse({"code": int(result), "message": message})


def _unauthorized(exc: Unauthorized) -> Response:
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        headers={"WWW-Authenticate": 'Basic realm="otpgate"'},
    )


def _refusal(exc: OtpgateError) -> Refusal:
    """The result code of an error met while serving a request."""
    if isinstance(exc, Refusal):
        return exc
    if isinstance(exc, InsufficientCredit):
        return Refusal(ResultCode.NO_CREDIT, f"not enough credit for this sending: {exc.detail}")
    if isinstance(
        exc, InvalidPhoneNumber | UnsupportedNumberType | CountryNotAllowed | DestinationBlocked
    ):
        # LabsMobile drops the recipients it cannot send to; left with none, it answers 23
        # (a number under an SMS-pumping block, or on the account's deny list, included).
        return Refusal(ResultCode.NO_RECIPIENTS, exc.detail)
    if isinstance(exc, InvalidRequest):
        return Refusal(ResultCode.MALFORMED_JSON, exc.detail)
    # Storage down, and any refusal a retry may get past: LabsMobile's "error while sending".
    return Refusal(ResultCode.SEND_ERROR, f"{exc.detail}; try again later")


async def _serve(
    request: Request,
    action: Callable[[Request, Principal], Awaitable[Response]],
    answer: Callable[[ResultCode, str], Response],
) -> Response:
    """Authenticate, run ``action``, and answer every refusal with its result code."""
    try:
        principal = await basic_caller(request)
        return await action(request, principal)
    except Unauthorized as exc:
        return _unauthorized(exc)
    except (RequestRefused, Unavailable) as exc:
        refusal = _refusal(exc)
        return answer(refusal.result, refusal.detail)


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


# --- reading a body -----------------------------------------------------------------------------


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON can carry")


async def _json_object(request: Request, *, required: bool) -> dict[str, Any]:
    """The body as a JSON object: ``10`` when there is none (an empty body, or one that is not
    declared JSON), ``11`` when it is not a well-formed JSON object of storable text. Without
    ``required``, no body at all reads as ``{}``."""
    raw = await request.body()
    if not raw.strip():
        if required:
            raise Refusal(ResultCode.MISSING_JSON, "the request has no JSON body")
        return {}
    if not _is_json(request.headers.get("content-type")):
        raise Refusal(
            ResultCode.MISSING_JSON,
            "no JSON data: send the body as JSON, with the header Content-Type: application/json",
        )
    try:
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        # ValueError covers malformed JSON, NaN and Infinity, and integers too long to read.
        raise Refusal(ResultCode.MALFORMED_JSON, "the body is not well-formed JSON") from None
    if not isinstance(data, dict):
        raise Refusal(ResultCode.MALFORMED_JSON, "the body must be a JSON object")
    try:
        s.refuse_unstorable(data)
    except InvalidRequest as exc:
        raise Refusal(ResultCode.MALFORMED_JSON, exc.detail) from None
    return data


def _is_set(value: Any) -> bool:
    """Whether a field is given and on: not null, ``""``, false, ``0``, ``"0"`` or empty."""
    if isinstance(value, str):
        return value not in ("", "0")
    if isinstance(value, bool | int | float | list | dict):
        return bool(value)
    return value is not None


def _text(body: dict[str, Any], name: str, *, digits_as_number: bool = False) -> str | None:
    """A string field; None when absent, null or empty. ``digits_as_number`` also takes an
    integer, as loosely typed clients send numbers and ids."""
    value = body.get(name)
    if value is None or value == "":
        return None
    if digits_as_number and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise Refusal(ResultCode.MALFORMED_JSON, f"{name} must be a string")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    """A LabsMobile flag: ``true``/``false``, ``1``/``0``, ``"1"``/``"0"``, ``"true"``/``"false"``;
    absent or null is false."""
    value = body.get(name)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    raise Refusal(ResultCode.MALFORMED_JSON, f"{name} must be true or false (or 1 or 0)")


def _subid(body: dict[str, Any]) -> str | None:
    subid = _text(body, "subid", digits_as_number=True)
    if subid is None:
        return None
    if len(subid) > MAX_CLIENT_REF_LENGTH:
        raise Refusal(
            ResultCode.SUBID_TOO_LONG,
            f"subid is longer than {MAX_CLIENT_REF_LENGTH} characters",
        )
    if not subid.isprintable():
        raise Refusal(ResultCode.MALFORMED_JSON, "subid must be printable characters")
    return subid


# --- POST /json/send ----------------------------------------------------------------------------

_FLAG_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "boolean"},
        {"type": "integer", "enum": [0, 1]},
        {"type": "string", "enum": ["1", "0", "true", "false"]},
    ]
}
_SEND_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["recipient", "message"],
                "properties": {
                    "recipient": {
                        "type": "array",
                        "minItems": 1,
                        "description": "up to 10,000 by default "
                        "(`OTPGATE_JSON_SEND_MAX_RECIPIENTS`)",
                        "items": {
                            "type": "object",
                            "required": ["msisdn"],
                            "properties": {
                                "msisdn": {
                                    "type": "string",
                                    "pattern": "^[0-9]{1,15}$",
                                    "description": "digits with the country code, no `+`",
                                }
                            },
                        },
                    },
                    "message": {
                        "type": "string",
                        "minLength": 1,
                        "description": "GSM-7 text unless `ucs2`; one SMS part unless `long`",
                    },
                    "tpoa": {
                        "type": "string",
                        "description": "the sender: 1–11 letters, digits or spaces with a "
                        "letter, or up to 15 digits",
                    },
                    "subid": {"type": "string", "maxLength": MAX_CLIENT_REF_LENGTH},
                    "label": {"type": "string", "maxLength": MAX_LABEL_LENGTH},
                    "test": _FLAG_SCHEMA,
                    "ackurl": {"type": "string", "description": "an http or https URL"},
                    "scheduled": {
                        "type": "string",
                        "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}$",
                        "description": "`YYYY-MM-DD HH:MM:SS` in GMT",
                    },
                    "long": _FLAG_SCHEMA,
                    "ucs2": _FLAG_SCHEMA,
                    "nofilter": _FLAG_SCHEMA,
                },
            }
        }
    },
}
_BASIC: list[dict[str, list[str]]] = [{"basic": []}]
_OK = "the result: `code` `0`, or a refusal's result code (see the API guide), always HTTP 200"

router = APIRouter(prefix="/json", tags=["labsmobile sms"])


@router.post(
    "/send",
    response_model=SendAnswer,
    response_description=_OK,
    responses=problem_responses(InvalidRequest, Unauthorized, PayloadTooLarge),
    openapi_extra={"security": _BASIC, "requestBody": _SEND_BODY},
)
async def send(request: Request) -> Response:
    """Send one text to up to 10,000 recipients (configurable), a batch accepted or refused
    whole; `test` checks and prices it and sends nothing; `scheduled` sends it later."""
    return await _serve(request, _send, _send_answer)


async def _send(request: Request, principal: Principal) -> Response:
    container = container_of(request)
    cap = container.settings.json_send_max_recipients
    body = await _json_object(request, required=True)
    test, long, ucs2 = _flag(body, "test"), _flag(body, "long"), _flag(body, "ucs2")
    _flag(body, "nofilter")  # accepted: otpgate has no anti-duplicate filter to skip
    for name in _NOT_SERVED:
        if _is_set(body.get(name)):
            raise Refusal(ResultCode.MALFORMED_JSON, f"otpgate does not serve {name}")
    message = _message(body)
    numbers = _recipients(body, cap)
    shape = sms.measure(message)
    if not ucs2 and shape.encoding != sms.GSM7:
        raise Refusal(
            ResultCode.INVALID_CHARACTERS,
            "message has characters outside GSM-7: set ucs2 to send it as Unicode",
        )
    subid = _subid(body)
    tpoa = _sender(body)
    label = _label(body)
    ack_url = _ack_url(body)
    if ack_url is not None:
        try:
            # A literal address otpgate may never call is refused now, not at report time;
            # a host name's addresses are checked each time it is called.
            container.outbound.validate(ack_url)
        except OutboundRefused:
            raise Refusal(
                ResultCode.MALFORMED_JSON, "ackurl points at an address otpgate may not call"
            ) from None
    scheduled = _scheduled(body)
    if scheduled is not None and test:
        raise Refusal(
            ResultCode.SCHEDULED_IN_TEST, "a scheduled message cannot be sent in test mode"
        )
    most = LONG_SEGMENTS if long else 1
    if shape.segments > most:
        raise Refusal(
            ResultCode.MALFORMED_JSON,
            f"message needs {shape.segments} SMS parts; at most {most}"
            + ("" if long else " without long"),
        )
    messaging = container.messaging
    subid = subid or secrets.token_hex(MAX_CLIENT_REF_LENGTH // 2)
    later = scheduled if scheduled is not None and scheduled > messaging.now() else None
    try:
        messages = await messaging.send(
            principal,
            SmsRequest(
                to=numbers,
                text=message,
                sender_id=tpoa,
                client_ref=subid,
                label=label,
                ack_url=ack_url,
                scheduled_at=later,
                gsm7_only=not ucs2,
                max_segments=most,
                max_recipients=cap,
                test=test,
            ),
        )
    except (InvalidPhoneNumber, UnsupportedNumberType) as exc:
        raise Refusal(ResultCode.NO_RECIPIENTS, _first_unusable(numbers) or exc.detail) from None
    if test:
        # Nothing is debited in test mode; still, answer what the real send would get.
        account = await container.access.get_account(principal.account.id)
        price = sum(m.price_units or 0 for m in messages)
        if account.billing is BillingMode.PREPAID and price > account.balance:
            raise InsufficientCredit("the balance does not cover this batch")
    if later is not None:
        return _send_answer(ResultCode.OK, "Message has been successfully scheduled", subid)
    return _send_answer(ResultCode.OK, SENT, subid)


def _message(body: dict[str, Any]) -> str:
    value = body.get("message")
    if value is None:
        raise Refusal(ResultCode.MESSAGE_MISSING, "the message element must be present")
    if not isinstance(value, str):
        raise Refusal(ResultCode.MALFORMED_JSON, "message must be a string")
    if not value.strip():
        raise Refusal(ResultCode.MESSAGE_EMPTY, "the message element cannot be empty")
    return value


def _recipients(body: dict[str, Any], cap: int) -> list[str]:
    """The recipients in E.164: ``23`` for none or for an msisdn that is not digits, ``24`` for
    more than ``cap``, ``11`` for a list of another shape."""
    value = body.get("recipient")
    if value is None or value == []:
        raise Refusal(ResultCode.NO_RECIPIENTS, "there are no recipients")
    if not isinstance(value, list):
        raise Refusal(
            ResultCode.MALFORMED_JSON,
            'recipient must be a list of objects such as {"msisdn": "34600000000"}',
        )
    if len(value) > cap:
        raise Refusal(
            ResultCode.TOO_MANY_RECIPIENTS,
            f"too many recipients: at most {cap} in one request",
        )
    numbers = []
    for index, item in enumerate(value, start=1):
        msisdn = item.get("msisdn") if isinstance(item, dict) else None
        if isinstance(msisdn, int) and not isinstance(msisdn, bool):
            msisdn = str(msisdn)
        if not isinstance(msisdn, str):
            raise Refusal(
                ResultCode.MALFORMED_JSON,
                f'recipient {index} must be an object such as {{"msisdn": "34600000000"}}',
            )
        digits = msisdn.strip().removeprefix("+")
        if not _MSISDN.fullmatch(digits):
            raise Refusal(
                ResultCode.NO_RECIPIENTS,
                f"recipient {index}: msisdn must be digits with the country code, no + or 00",
            )
        numbers.append("+" + digits)
    return numbers


def _first_unusable(numbers: Sequence[str]) -> str | None:
    """Which recipient cannot receive an SMS, and why (only looked for once a batch failed)."""
    for index, number in enumerate(numbers, start=1):
        try:
            require_sms_capable(parse_phone(number))
        except (InvalidPhoneNumber, UnsupportedNumberType) as exc:
            return f"recipient {index}: {exc.detail}"
    return None


def _sender(body: dict[str, Any]) -> str | None:
    tpoa = _text(body, "tpoa", digits_as_number=True)
    if tpoa is None:
        return None
    try:
        return sms.validate_sender_id(tpoa)
    except InvalidRequest:
        raise Refusal(
            ResultCode.MALFORMED_JSON,
            "tpoa must be 1-11 letters, digits or spaces with at least one letter, or a number "
            "of at most 15 digits",
        ) from None


def _label(body: dict[str, Any]) -> str | None:
    label = _text(body, "label")
    if label is not None and (len(label) > MAX_LABEL_LENGTH or not label.isprintable()):
        raise Refusal(
            ResultCode.MALFORMED_JSON,
            f"label must be at most {MAX_LABEL_LENGTH} printable characters",
        )
    return label


def _ack_url(body: dict[str, Any]) -> str | None:
    """An ``http`` or ``https`` URL with a host. Where it may point (no loopback, private or
    metadata address in production) is checked each time it is called."""
    url = _text(body, "ackurl")
    if url is None:
        return None
    refusal = Refusal(
        ResultCode.MALFORMED_JSON,
        f"ackurl must be an http or https URL with a host, at most {MAX_ACK_URL_LENGTH} characters",
    )
    if len(url) > MAX_ACK_URL_LENGTH or not url.isprintable() or " " in url:
        raise refusal
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # read for its check: a port that is not a number raises
    except ValueError:
        raise refusal from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise refusal
    return url


def _scheduled(body: dict[str, Any]) -> datetime | None:
    value = body.get("scheduled")
    if value is None or value == "":
        return None
    refusal = Refusal(
        ResultCode.BAD_SCHEDULE,
        "scheduled must be a date and time in GMT written YYYY-MM-DD HH:MM:SS",
    )
    if not isinstance(value, str) or not _SCHEDULED.fullmatch(value):
        raise refusal
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise refusal from None


# --- GET /json/balance --------------------------------------------------------------------------


def balance_text(units: int) -> str:
    """A balance as LabsMobile writes one: decimal text with at least two decimals, exact.

    >>> balance_text(175_000), balance_text(725), balance_text(0), balance_text(-25_000)
    ('17.50', '0.0725', '0.00', '-2.50')
    """
    sign = "-" if units < 0 else ""
    whole, fraction = divmod(abs(units), UNITS_PER_CREDIT)
    decimals = f"{fraction:04d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{decimals}"


@router.get(
    "/balance",
    response_model=BalanceAnswer,
    response_description="`code` `0` and the balance, or `30` when storage cannot answer",
    responses=problem_responses(Unauthorized),
    openapi_extra={"security": _BASIC},
)
async def balance(request: Request) -> Response:
    """The account's credit. An `unlimited` account is never refused for credit; its balance
    is whatever was topped up (usually `0.00`)."""
    return await _serve(request, _balance, _code_answer)


async def _balance(request: Request, principal: Principal) -> Response:
    account = await container_of(request).access.get_account(principal.account.id)
    return JSONResponse({"code": int(ResultCode.OK), "credits": balance_text(account.balance)})


# --- POST /json/prices --------------------------------------------------------------------------

_PRICES_BODY: dict[str, Any] = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "format": {"type": "string", "enum": ["JSON"]},
                    "countries": {
                        "type": "array",
                        "items": {"type": "string", "pattern": "^[A-Za-z]{2}$"},
                        "description": "ISO 3166-1 alpha-2 codes; every country with a price "
                        "when absent or empty",
                    },
                },
            }
        }
    },
}


@router.post(
    "/prices",
    response_model=PricesAnswer,
    response_description="the prices keyed by ISO code, or a refusal with an integer `code`",
    responses=problem_responses(InvalidRequest, Unauthorized, PayloadTooLarge),
    openapi_extra={"security": _BASIC, "requestBody": _PRICES_BODY},
)
async def prices(request: Request) -> Response:
    """Credits per SMS part, by destination country, from the operator's price table. A
    country without a price is left out; with a `*` price, every country has one."""
    return await _serve(request, _prices, _code_answer)


async def _prices(request: Request, principal: Principal) -> Response:
    body = await _json_object(request, required=False)
    answer_format = body.get("format")
    if _is_set(answer_format) and (
        not isinstance(answer_format, str) or answer_format.strip().upper() != "JSON"
    ):
        raise Refusal(ResultCode.MALFORMED_JSON, "format must be JSON, the only one otpgate has")
    countries = _countries(body.get("countries"))
    billing = container_of(request).billing
    rows = await billing.list_prices(countries)
    if countries is None and any(row.country == DEFAULT_COUNTRY for row in rows):
        # The table prices every other country too: list them all, as LabsMobile does.
        rows = await billing.list_prices(_every_country())
    return JSONResponse(
        {
            row.country: {
                "isocode": row.country,
                "prefix": row.prefix or "",
                "name": row.name,
                "credits": row.unit_price / UNITS_PER_CREDIT,
            }
            for row in rows
            if row.country != DEFAULT_COUNTRY
        }
    )


def _countries(value: Any) -> list[str] | None:
    """The ISO codes asked for; None for every country."""
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, list) or not all(isinstance(code, str) for code in value):
        raise Refusal(ResultCode.MALFORMED_JSON, "countries must be a list of ISO country codes")
    codes = [ascii_upper(code.strip()) for code in value]
    for index, code in enumerate(codes, start=1):
        if not known_country(code):
            raise Refusal(
                ResultCode.MALFORMED_JSON,
                f"countries: item {index} is not an ISO 3166-1 alpha-2 country code",
            )
    return codes


def _every_country() -> list[str]:
    return sorted(code for code in phonenumbers.SUPPORTED_REGIONS if known_country(code))


# --- POST /json/scheduled -----------------------------------------------------------------------

_SCHEDULED_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["subid", "cmd"],
                "properties": {
                    "subid": {"type": "string", "maxLength": MAX_CLIENT_REF_LENGTH},
                    "cmd": {"type": "string", "enum": ["cancel", "send"]},
                },
            }
        }
    },
}


@router.post(
    "/scheduled",
    response_model=CodeAnswer,
    response_description=_OK,
    responses=problem_responses(InvalidRequest, Unauthorized, PayloadTooLarge),
    openapi_extra={"security": _BASIC, "requestBody": _SCHEDULED_BODY},
)
async def scheduled(request: Request) -> Response:
    """`cancel` the messages of a scheduled send that have not gone out (their price is
    refunded), or `send` them now. `23` when no message of that `subid` is waiting."""
    return await _serve(request, _scheduled_command, _code_answer)


async def _scheduled_command(request: Request, principal: Principal) -> Response:
    body = await _json_object(request, required=True)
    subid = _subid(body)
    if subid is None:
        raise Refusal(ResultCode.MALFORMED_JSON, "subid is required: the subid of the send")
    command = body.get("cmd")
    if not isinstance(command, str) or command.strip().lower() not in ("cancel", "send"):
        raise Refusal(ResultCode.MALFORMED_JSON, "cmd must be cancel or send")
    messaging = container_of(request).messaging
    if command.strip().lower() == "cancel":
        count, done = await messaging.cancel_scheduled(principal, subid), "canceled"
    else:
        count, done = await messaging.send_scheduled_now(principal, subid), "sent now"
    if count == 0:
        raise Refusal(
            ResultCode.NO_RECIPIENTS, "no scheduled message with this subid is waiting to be sent"
        )
    return _code_answer(ResultCode.OK, f"{count} scheduled message(s) {done}")
