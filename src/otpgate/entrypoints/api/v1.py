"""The native ``/v1`` API (API.md §3, §4, §8)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from otpgate.bootstrap import Container
from otpgate.domain.model import Principal
from otpgate.entrypoints.api import schemas as s
from otpgate.errors import Unauthorized
from otpgate.services.idempotency import request_fingerprint
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
        return JSONResponse(body, status_code=status)
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


@router.post("/verifications", tags=["verifications"], status_code=201)
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
            ),
        )
        return (201 if created else 200), s.render_verification(verification, verifications.now())

    return await idempotent(request, principal, action)


@router.post("/verifications/{verification_id}/check", tags=["verifications"])
async def check_verification(
    request: Request, principal: Caller, verification_id: str, body: s.CheckCode
) -> Response:
    """Always 200 when the verification exists; a wrong code is ``valid: false``."""
    result = await container_of(request).verifications.check(
        principal, verification_id, body.code, body.context
    )
    # A response object skips FastAPI's generic encoder: this is the busiest endpoint.
    return JSONResponse(s.render_check(result))


@router.get("/verifications", tags=["verifications"])
async def list_verifications(
    request: Request,
    principal: Caller,
    service_id: str | None = None,
    status: str | None = None,
    to: str | None = None,
    limit: Limit = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    verifications = container_of(request).verifications
    result = await verifications.list(
        principal, service_id=service_id, status=status, to=to, limit=limit, cursor=cursor
    )
    now = verifications.now()
    return page([s.render_verification(v, now) for v in result.items], result.next_cursor)


@router.post("/verifications/check", tags=["verifications"])
async def check_by_destination(
    request: Request, principal: Caller, body: s.CheckByDestination
) -> dict[str, Any]:
    """Check the most recent verification of a destination in a service."""
    result = await container_of(request).verifications.check_destination(
        principal,
        service_id=body.service_id,
        to=body.to,
        code=body.code,
        context=body.context,
        country=body.country,
    )
    return s.render_check(result)


@router.get("/verifications/{verification_id}", tags=["verifications"])
async def get_verification(
    request: Request, principal: Caller, verification_id: str
) -> dict[str, Any]:
    verifications = container_of(request).verifications
    verification = await verifications.get(principal, verification_id)
    return s.render_verification(verification, verifications.now())


@router.post("/verifications/{verification_id}/resend", tags=["verifications"])
async def resend_verification(
    request: Request,
    principal: Caller,
    verification_id: str,
    body: s.ResendVerification | None = None,
) -> Response:
    verifications = container_of(request).verifications

    async def action() -> tuple[int, Any]:
        verification = await verifications.resend(
            principal, verification_id, body.channel if body else None
        )
        return 200, s.render_verification(verification, verifications.now())

    return await idempotent(request, principal, action)


@router.post("/verifications/{verification_id}/cancel", tags=["verifications"])
async def cancel_verification(
    request: Request, principal: Caller, verification_id: str
) -> dict[str, Any]:
    verifications = container_of(request).verifications
    verification = await verifications.cancel(principal, verification_id)
    return s.render_verification(verification, verifications.now())


# --- account and keys -----------------------------------------------------------------------


@router.get("/account", tags=["accounts"])
async def get_account(principal: Caller) -> dict[str, Any]:
    """The calling key's account."""
    return s.render_account(principal.account)


@router.get("/accounts", tags=["accounts"])
async def list_accounts(
    request: Request, principal: Caller, limit: Limit = 50, cursor: str | None = None
) -> dict[str, Any]:
    """Admin only: every account."""
    result = await container_of(request).access.list_accounts(principal, limit=limit, cursor=cursor)
    return page([s.render_account(a) for a in result.items], result.next_cursor)


@router.post("/accounts", tags=["accounts"], status_code=201)
async def create_account(request: Request, principal: Caller, body: s.CreateAccount) -> Response:
    """Admin only: a new account (its username defaults to its id)."""
    access = container_of(request).access
    access.require_admin(principal)

    async def action() -> tuple[int, Any]:
        account = await access.create_account(body.name, username=body.username)
        return 201, s.render_account(account)

    return await idempotent(request, principal, action)


@router.post("/keys", tags=["accounts"], status_code=201)
async def create_key(request: Request, principal: Caller, body: s.CreateKey) -> Response:
    """A new API key; ``key`` is in this response only. A replay of the same request under
    the same ``Idempotency-Key`` answers with the key's id and ``key: null``: the secret is
    never stored, so it cannot be shown again (revoke that key and create another)."""
    access = container_of(request).access
    account_id = body.account_id or principal.account.id
    if account_id != principal.account.id:
        access.require_admin(principal)

    async def action() -> tuple[int, Any]:
        issued = await access.create_key(account_id, name=body.name)
        return 201, s.render_key(issued.key, issued.secret)

    return await idempotent(request, principal, action, redact=s.without_secret)


@router.get("/keys", tags=["accounts"])
async def list_keys(request: Request, principal: Caller) -> dict[str, Any]:
    keys = await container_of(request).access.list_keys(principal)
    return page([s.render_key(k) for k in keys], None)


@router.delete("/keys/{key_id}", tags=["accounts"], status_code=204)
async def revoke_key(request: Request, principal: Caller, key_id: str) -> Response:
    await container_of(request).access.revoke_key(principal, key_id)
    return Response(status_code=204)


# --- services --------------------------------------------------------------------------------


@router.post("/services", tags=["services"], status_code=201)
async def create_service(request: Request, principal: Caller, body: s.ServiceFields) -> Response:
    catalog = container_of(request).catalog

    async def action() -> tuple[int, Any]:
        service = await catalog.create(principal, body.model_dump(exclude_unset=True))
        return 201, s.render_service(service)

    return await idempotent(request, principal, action)


@router.get("/services", tags=["services"])
async def list_services(
    request: Request, principal: Caller, limit: Limit = 50, cursor: str | None = None
) -> dict[str, Any]:
    result = await container_of(request).catalog.list(principal, limit=limit, cursor=cursor)
    return page([s.render_service(x) for x in result.items], result.next_cursor)


@router.get("/services/{service_id}", tags=["services"])
async def get_service(request: Request, principal: Caller, service_id: str) -> dict[str, Any]:
    return s.render_service(await container_of(request).catalog.get(principal, service_id))


@router.patch("/services/{service_id}", tags=["services"])
async def update_service(
    request: Request, principal: Caller, service_id: str, body: s.ServiceFields
) -> dict[str, Any]:
    service = await container_of(request).catalog.update(
        principal, service_id, body.model_dump(exclude_unset=True)
    )
    return s.render_service(service)


@router.delete("/services/{service_id}", tags=["services"], status_code=204)
async def delete_service(request: Request, principal: Caller, service_id: str) -> Response:
    await container_of(request).catalog.delete(principal, service_id)
    return Response(status_code=204)
