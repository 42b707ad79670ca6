"""The native ``/v1`` API: verifications, services, accounts and keys.

Every handler answers with a response object built from the ``render_*`` functions (no
per-request response validation; the busiest routes come first), and declares its success
model and its real error answers (``problem_responses``) for the OpenAPI document.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from otpgate.bootstrap import Container
from otpgate.domain.billing import BillingMode
from otpgate.domain.model import Principal, VerificationStatus
from otpgate.entrypoints.api import schemas as s
from otpgate.entrypoints.api.problems import problem_responses
from otpgate.errors import (
    ChannelNotAllowed,
    CountryNotAllowed,
    DestinationBlocked,
    Forbidden,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    InsufficientCredit,
    InvalidPhoneNumber,
    InvalidRequest,
    MaxSendAttemptsReached,
    NotFound,
    OtpgateError,
    PayloadTooLarge,
    RateLimited,
    ResendTooSoon,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    UnsupportedNumberType,
)
from otpgate.services.idempotency import request_fingerprint
from otpgate.services.messaging import SmsRequest
from otpgate.services.verification import StartRequest

router = APIRouter(prefix="/v1")


def container_of(request: Request) -> Container:
    container: Container = request.app.state.container
    return container


async def principal_of(request: Request) -> Principal:
    """Bearer ``<key>`` or Basic ``<username>:<key>`` (API.md §1). The header is read here
    rather than declared as a parameter: it is on every request's hot path."""
    access = container_of(request).access
    authorization = request.headers.get("authorization")
    if not authorization:
        raise Unauthorized("send Authorization: Bearer <API key>")
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and value:
        return await access.authenticate(value.strip())
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("malformed Basic credentials") from None
        username, sep, secret = decoded.partition(":")
        if not sep:
            raise Unauthorized("malformed Basic credentials")
        return await access.authenticate_basic(username, secret)
    raise Unauthorized("unsupported Authorization scheme; use Bearer or Basic")


Caller = Annotated[Principal, Depends(principal_of)]
Limit = Annotated[int, Query(ge=1, le=200)]
Cursor = Annotated[s.Text | None, Query(description="`next_cursor` of the previous page")]

#: What every authenticated route may answer: a bad parameter, bad credentials, storage down.
AUTHENTICATED: tuple[type[OtpgateError], ...] = (InvalidRequest, Unauthorized, Unavailable)
#: What a route that reads a JSON body may answer besides.
READS_BODY: tuple[type[OtpgateError], ...] = (PayloadTooLarge, UnsupportedMediaType)


async def refuse_null_body(request: Request) -> None:
    """For a route whose body may be left out: a JSON ``null`` is not leaving it out, and, as
    any JSON that is not an object, it is refused (FastAPI reads it as no body)."""
    if (await request.body()).strip() == b"null":
        raise InvalidRequest("the body must be a JSON object")


#: What a create under an ``Idempotency-Key`` may answer besides.
IDEMPOTENT: tuple[type[OtpgateError], ...] = (IdempotencyInProgress, IdempotencyKeyMismatch)
#: The ``Idempotency-Key`` header, read by hand in :func:`idempotent`, for the document.
IDEMPOTENCY_KEY = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "1–255 printable characters, scoped to the account and kept 24 h: "
            "a retry with the same key and body answers the first response again",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
        }
    ]
}


def ok(body: Any, status: int = 200) -> Response:
    """A JSON answer sent as it is (the renderers' output is already JSON-ready)."""
    return JSONResponse(body, status_code=status)


async def idempotent(
    request: Request,
    principal: Principal,
    action: Callable[[], Awaitable[tuple[int, Any]]],
    *,
    redact: Callable[[Any], Any] | None = None,
) -> Response:
    """Run a create under the request's ``Idempotency-Key``, if it has one (API.md §1).
    ``redact`` makes the body that is stored for replays (see ``services.idempotency``)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        status, body = await action()
        return ok(body, status)
    container = container_of(request)
    fingerprint = request_fingerprint(request.method, request.url.path, await request.body())
    outcome = await container.idempotency.run(
        principal.account.id, key, fingerprint, action, redact=redact
    )
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)


def page(items: list[dict[str, Any]], next_cursor: str | None) -> dict[str, Any]:
    return {"data": items, "next_cursor": next_cursor}


# --- verifications (first, so the busiest routes are matched first) ---------------------


@router.post(
    "/verifications",
    tags=["verifications"],
    status_code=201,
    response_model=s.VerificationOut,
    response_description="a new verification; its code is on its way",
    responses={
        200: {
            "model": s.VerificationOut,
            "description": "the destination's pending verification, its code sent again",
        },
        **problem_responses(
            *AUTHENTICATED,
            *READS_BODY,
            *IDEMPOTENT,
            InvalidPhoneNumber,
            UnsupportedNumberType,
            CountryNotAllowed,
            ChannelNotAllowed,
            DestinationBlocked,
            Forbidden,
            NotFound,
            RateLimited,
            ResendTooSoon,
            MaxSendAttemptsReached,
            InsufficientCredit,
        ),
    },
    openapi_extra=IDEMPOTENCY_KEY,
)
async def start_verification(
    request: Request, principal: Caller, body: s.StartVerification
) -> Response:
    """Create a verification and send its code (201), or send a pending one's code again (200)."""
    verifications = container_of(request).verifications

    async def action() -> tuple[int, Any]:
        verification, created = await verifications.start(
            principal,
            StartRequest(
                service_id=body.service_id,
                to=body.to,
                channel=body.channel,
                locale=body.locale,
                custom_code=body.custom_code,
                context=body.context,
                metadata=body.metadata,
                country=body.country,
                email=body.email,
                client_ip=body.client_ip,
            ),
        )
        return (201 if created else 200), s.render_verification(verification, verifications.now())

    return await idempotent(request, principal, action)


@router.post(
    "/verifications/{verification_id}/check",
    tags=["verifications"],
    response_model=s.CheckResultOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, NotFound, RateLimited),
)
async def check_verification(
    request: Request, principal: Caller, verification_id: s.Text, body: s.CheckCode
) -> Response:
    """Always 200 when the verification exists; a wrong code is ``valid: false``."""
    result = await container_of(request).verifications.check(
        principal, verification_id, body.code, body.context
    )
    # A response object skips FastAPI's generic encoder: this is the busiest endpoint.
    return JSONResponse(s.render_check(result))


@router.get(
    "/verifications",
    tags=["verifications"],
    response_model=s.VerificationPage,
    responses=problem_responses(*AUTHENTICATED, InvalidPhoneNumber),
)
async def list_verifications(
    request: Request,
    principal: Caller,
    service_id: s.Text | None = None,
    status: Annotated[
        s.Text | None,
        Query(
            description="the reported status: expired includes pending ones past expires_at",
            json_schema_extra=s.one_of(VerificationStatus),
        ),
    ] = None,
    to: Annotated[
        s.Text | None, Query(description="E.164; write the + as %2B in the query string")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    """Newest first. ``status`` is the reported one: ``expired`` includes pending rows past
    their expiry."""
    if to is not None and to.startswith(" "):
        # "+" in a query string means a space: the client did not encode it.
        raise InvalidRequest(
            "to must be E.164 such as +34600000000; in a query string write + as %2B "
            "(a bare + arrives as a space)",
            param="to",
        )
    verifications = container_of(request).verifications
    result = await verifications.list(
        principal, service_id=service_id, status=status, to=to, limit=limit, cursor=cursor
    )
    now = verifications.now()
    return ok(page([s.render_verification(v, now) for v in result.items], result.next_cursor))


@router.post(
    "/verifications/check",
    tags=["verifications"],
    response_model=s.CheckResultOut,
    responses=problem_responses(
        *AUTHENTICATED, *READS_BODY, InvalidPhoneNumber, NotFound, RateLimited
    ),
)
async def check_by_destination(
    request: Request, principal: Caller, body: s.CheckByDestination
) -> Response:
    """Check the most recent verification of a destination in a service."""
    result = await container_of(request).verifications.check_destination(
        principal,
        service_id=body.service_id,
        to=body.to,
        code=body.code,
        context=body.context,
        country=body.country,
    )
    return ok(s.render_check(result))


@router.get(
    "/verifications/{verification_id}",
    tags=["verifications"],
    response_model=s.VerificationOut,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def get_verification(
    request: Request, principal: Caller, verification_id: s.Text
) -> Response:
    """The verification, with every message queued for it."""
    verifications = container_of(request).verifications
    verification = await verifications.get(principal, verification_id)
    return ok(s.render_verification(verification, verifications.now()))


@router.post(
    "/verifications/{verification_id}/resend",
    tags=["verifications"],
    response_model=s.VerificationOut,
    responses=problem_responses(
        *AUTHENTICATED,
        *READS_BODY,
        *IDEMPOTENT,
        NotFound,
        ChannelNotAllowed,
        DestinationBlocked,
        RateLimited,
        ResendTooSoon,
        MaxSendAttemptsReached,
        InsufficientCredit,
        CountryNotAllowed,
    ),
    openapi_extra=IDEMPOTENCY_KEY,
)
async def resend_verification(
    request: Request,
    principal: Caller,
    verification_id: s.Text,
    body: s.ResendVerification | None = None,
    _: None = Depends(refuse_null_body),
) -> Response:
    """Send the same code again on a pending verification."""
    verifications = container_of(request).verifications

    async def action() -> tuple[int, Any]:
        verification = await verifications.resend(
            principal, verification_id, body.channel if body else None
        )
        return 200, s.render_verification(verification, verifications.now())

    return await idempotent(request, principal, action)


@router.post(
    "/verifications/{verification_id}/cancel",
    tags=["verifications"],
    response_model=s.VerificationOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, NotFound),
)
async def cancel_verification(
    request: Request,
    principal: Caller,
    verification_id: s.Text,
    body: s.NoFields | None = None,
    _: None = Depends(refuse_null_body),
) -> Response:
    """A pending verification becomes canceled; a closed one is returned unchanged."""
    verifications = container_of(request).verifications
    verification = await verifications.cancel(principal, verification_id)
    return ok(s.render_verification(verification, verifications.now()))


# --- account and keys -----------------------------------------------------------------------


@router.get(
    "/account",
    tags=["accounts"],
    response_model=s.AccountOut,
    responses=problem_responses(Unauthorized, Unavailable),
)
async def get_account(request: Request, principal: Caller) -> Response:
    """The calling key's account, with its billing mode and current balance."""
    account = await container_of(request).access.get_account(principal.account.id)
    return ok(s.render_account(account))


@router.get(
    "/account/ledger",
    tags=["accounts"],
    response_model=s.LedgerPage,
    responses=problem_responses(*AUTHENTICATED),
)
async def get_ledger(
    request: Request, principal: Caller, limit: Limit = 50, cursor: Cursor = None
) -> Response:
    """Every top-up, debit and refund of the account, newest first."""
    result = await container_of(request).billing.ledger(principal, limit=limit, cursor=cursor)
    return ok(page([s.render_ledger_entry(e) for e in result.items], result.next_cursor))


@router.get(
    "/providers",
    tags=["delivery"],
    response_model=s.ProviderList,
    responses=problem_responses(*AUTHENTICATED, Forbidden),
)
async def list_providers(request: Request, principal: Caller) -> Response:
    """Admin only: every configured provider with its circuit state and the sends this
    process made through it since it started (each process keeps its own count)."""
    container = container_of(request)
    container.access.require_admin(principal)
    health = container.dispatcher.health
    return ok({"data": [s.render_provider(h) for h in health.values()]})


@router.get(
    "/prices",
    tags=["accounts"],
    response_model=s.PriceList,
    responses=problem_responses(*AUTHENTICATED),
)
async def list_prices(
    request: Request,
    principal: Caller,
    country: Annotated[
        list[s.Text] | None, Query(description="ISO alpha-2 codes; default: every row")
    ] = None,
) -> Response:
    """Credits per SMS part by destination country, from the operator's price table."""
    prices = await container_of(request).billing.list_prices(country)
    return ok({"data": [s.render_price(p) for p in prices]})


# --- plain messages --------------------------------------------------------------------------


@router.post(
    "/messages",
    tags=["messages"],
    status_code=202,
    response_model=s.SmsOut,
    response_description="the message, queued",
    responses=problem_responses(
        *AUTHENTICATED,
        *READS_BODY,
        *IDEMPOTENT,
        InvalidPhoneNumber,
        UnsupportedNumberType,
        InsufficientCredit,
        CountryNotAllowed,
        DestinationBlocked,
    ),
    openapi_extra=IDEMPOTENCY_KEY,
)
async def send_message(request: Request, principal: Caller, body: s.SendMessage) -> Response:
    """Send a plain SMS: through the same routes, encoding, prices and credit as codes."""
    messaging = container_of(request).messaging

    async def action() -> tuple[int, Any]:
        (message,) = await messaging.send(
            principal,
            SmsRequest(
                to=[body.to], text=body.text, country=body.country, sender_id=body.sender_id
            ),
        )
        return 202, s.render_sms(message)

    return await idempotent(request, principal, action)


@router.get(
    "/messages/{message_id}",
    tags=["messages"],
    response_model=s.SmsOut,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def get_message(request: Request, principal: Caller, message_id: s.Text) -> Response:
    message = await container_of(request).messaging.get(principal, message_id)
    return ok(s.render_sms(message))


@router.get(
    "/accounts",
    tags=["accounts"],
    response_model=s.AccountPage,
    responses=problem_responses(*AUTHENTICATED, Forbidden),
)
async def list_accounts(
    request: Request, principal: Caller, limit: Limit = 50, cursor: Cursor = None
) -> Response:
    """Admin only: every account."""
    result = await container_of(request).access.list_accounts(principal, limit=limit, cursor=cursor)
    return ok(page([s.render_account(a) for a in result.items], result.next_cursor))


@router.post(
    "/accounts",
    tags=["accounts"],
    status_code=201,
    response_model=s.AccountOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, *IDEMPOTENT, Forbidden),
    openapi_extra=IDEMPOTENCY_KEY,
)
async def create_account(request: Request, principal: Caller, body: s.CreateAccount) -> Response:
    """Admin only: a new account (its username defaults to its id)."""
    access = container_of(request).access
    access.require_admin(principal)

    async def action() -> tuple[int, Any]:
        account = await access.create_account(
            body.name, username=body.username, billing=body.billing or BillingMode.PREPAID
        )
        return 201, s.render_account(account)

    return await idempotent(request, principal, action)


@router.patch(
    "/accounts/{account_id}",
    tags=["accounts"],
    response_model=s.AccountOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, Forbidden, NotFound),
)
async def update_account(
    request: Request, principal: Caller, account_id: s.Text, body: s.UpdateAccount
) -> Response:
    """Admin only: change an account's settings: ``daily_spend_cap`` (credits per UTC day;
    ``null`` removes it). Fields left out are unchanged."""
    access = container_of(request).access
    access.require_admin(principal)
    if "daily_spend_cap" in body.model_fields_set:
        account = await access.set_daily_spend_cap(principal, account_id, body.daily_spend_cap)
    else:
        account = await access.get_account(account_id)
    return ok(s.render_account(account))


@router.post(
    "/keys",
    tags=["accounts"],
    status_code=201,
    response_model=s.NewKeyOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, *IDEMPOTENT, Forbidden, NotFound),
    openapi_extra=IDEMPOTENCY_KEY,
)
async def create_key(request: Request, principal: Caller, body: s.CreateKey) -> Response:
    """A new API key; ``key`` is in this response only. A replay of the same request under
    the same ``Idempotency-Key`` answers with the key's id and ``key: null``: the secret is
    never stored, so it cannot be shown again (revoke that key and create another)."""
    access = container_of(request).access
    account_id = body.account_id or principal.account.id
    if account_id != principal.account.id:
        access.require_admin(principal)

    async def action() -> tuple[int, Any]:
        issued = await access.create_key(account_id, name=body.name, actor=principal.key_id)
        return 201, s.render_key(issued.key, issued.secret)

    return await idempotent(request, principal, action, redact=s.without_secret)


@router.get(
    "/keys",
    tags=["accounts"],
    response_model=s.KeyPage,
    responses=problem_responses(Unauthorized, Unavailable),
)
async def list_keys(request: Request, principal: Caller) -> Response:
    """This account's keys, revoked ones included, never the secret; all in one page."""
    keys = await container_of(request).access.list_keys(principal)
    return ok(page([s.render_key(k) for k in keys], None))


@router.delete(
    "/keys/{key_id}",
    tags=["accounts"],
    status_code=204,
    response_class=Response,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def revoke_key(request: Request, principal: Caller, key_id: s.Text) -> Response:
    """Revoke a live key of this account."""
    await container_of(request).access.revoke_key(principal, key_id)
    return Response(status_code=204)


# --- services --------------------------------------------------------------------------------


@router.post(
    "/services",
    tags=["services"],
    status_code=201,
    response_model=s.NewServiceOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, *IDEMPOTENT),
    openapi_extra=IDEMPOTENCY_KEY,
)
async def create_service(request: Request, principal: Caller, body: s.ServiceFields) -> Response:
    """A new service; ``name`` is required, every other field has a default. The answer
    carries the service's webhook signing secret (``webhook_secret``), in this response only
    (``POST /v1/services/{id}/webhook-secret`` issues a new one)."""
    container = container_of(request)

    async def action() -> tuple[int, Any]:
        service = await container.catalog.create(principal, body.model_dump(exclude_unset=True))
        secret = await container.webhook_secrets.issue(principal, service.id, rotated=False)
        return 201, {**s.render_service(service), "webhook_secret": secret}

    return await idempotent(request, principal, action, redact=s.without_webhook_secret)


@router.get(
    "/services",
    tags=["services"],
    response_model=s.ServicePage,
    responses=problem_responses(*AUTHENTICATED),
)
async def list_services(
    request: Request, principal: Caller, limit: Limit = 50, cursor: Cursor = None
) -> Response:
    result = await container_of(request).catalog.list(principal, limit=limit, cursor=cursor)
    return ok(page([s.render_service(x) for x in result.items], result.next_cursor))


@router.get(
    "/services/{service_id}",
    tags=["services"],
    response_model=s.ServiceOut,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def get_service(request: Request, principal: Caller, service_id: s.Text) -> Response:
    return ok(s.render_service(await container_of(request).catalog.get(principal, service_id)))


@router.patch(
    "/services/{service_id}",
    tags=["services"],
    response_model=s.ServiceOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, NotFound),
)
async def update_service(
    request: Request, principal: Caller, service_id: s.Text, body: s.ServiceFields
) -> Response:
    """Change the fields given; ``null`` resets a field to its default. The whole policy is
    checked again, and a refused change changes nothing."""
    service = await container_of(request).catalog.update(
        principal, service_id, body.model_dump(exclude_unset=True)
    )
    return ok(s.render_service(service))


@router.delete(
    "/services/{service_id}",
    tags=["services"],
    status_code=204,
    response_class=Response,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def delete_service(request: Request, principal: Caller, service_id: s.Text) -> Response:
    """Delete the service; its pending verifications are canceled with it."""
    await container_of(request).catalog.delete(principal, service_id)
    return Response(status_code=204)


@router.post(
    "/services/{service_id}/webhook-secret",
    tags=["services"],
    response_model=s.WebhookSecretOut,
    responses=problem_responses(*AUTHENTICATED, *READS_BODY, NotFound),
)
async def rotate_webhook_secret(
    request: Request,
    principal: Caller,
    service_id: s.Text,
    body: s.NoFields | None = None,
    _: None = Depends(refuse_null_body),
) -> Response:
    """Issue a new webhook signing secret for the service, shown in this response only. The
    old one stops signing at once: deliveries from now on, retries included, use the new one."""
    secret = await container_of(request).webhook_secrets.issue(principal, service_id)
    return ok({"service_id": service_id, "webhook_secret": secret})


# --- events and the audit log ------------------------------------------------------------------


@router.get(
    "/events",
    tags=["events"],
    response_model=s.EventPage,
    responses=problem_responses(*AUTHENTICATED, Forbidden),
)
async def list_events(
    request: Request,
    principal: Caller,
    service_id: Annotated[s.Text | None, Query(max_length=64)] = None,
    type: Annotated[s.Text | None, Query(max_length=64, description="an event type")] = None,
    account_id: Annotated[
        s.Text | None, Query(max_length=64, description="admin keys only: another account's")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    """The events sent (or being sent) to the services' webhooks, newest first, with their
    delivery state; an account key sees its own account's, an admin key every account's (or
    the one ``account_id`` names). Never the signing secret."""
    result = await container_of(request).event_log.list(
        principal,
        account_id=account_id,
        service_id=service_id,
        type=type,
        limit=limit,
        cursor=cursor,
    )
    return ok(page([s.render_event(e) for e in result.items], result.next_cursor))


@router.get(
    "/audit",
    tags=["audit"],
    response_model=s.AuditPage,
    responses=problem_responses(*AUTHENTICATED, Forbidden),
)
async def list_audit(
    request: Request,
    principal: Caller,
    action: Annotated[
        s.Text | None, Query(max_length=64, description="e.g. key.created, service.updated")
    ] = None,
    account_id: Annotated[
        s.Text | None, Query(max_length=64, description="admin keys only: another account's")
    ] = None,
    limit: Limit = 50,
    cursor: Cursor = None,
) -> Response:
    """Security-relevant actions, newest first: who (the API key id, or ``cli``), what, on
    which object, and the state before and after (never a secret). An account key sees its
    own account's entries; an admin key every account's, or the one ``account_id`` names."""
    result = await container_of(request).audit.list(
        principal, account_id=account_id, action=action, limit=limit, cursor=cursor
    )
    return ok(page([s.render_audit(a) for a in result.items], result.next_cursor))
