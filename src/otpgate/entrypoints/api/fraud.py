"""The SMS-pumping defence's routes: deployment-wide blocks (admin keys), and each account's
safe list and deny list (``services.fraud``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field

from otpgate.domain.fraud import BlockKind, EntryKind, ListName
from otpgate.entrypoints.api import schemas as s
from otpgate.entrypoints.api.problems import problem_responses
from otpgate.entrypoints.api.v1 import AUTHENTICATED, READS_BODY, Caller, container_of, ok
from otpgate.errors import Forbidden, NotFound
from otpgate.services.fraud import render_block, render_entry

router = APIRouter(prefix="/v1")


# --- shapes ---------------------------------------------------------------------------------


class CreateBlock(s.Body):
    country: str | None = Field(None, description="ISO 3166-1 alpha-2: block a whole country")
    prefix: str | None = Field(
        None, description="+ and 4–13 digits, such as +63917555: block a number range"
    )
    duration_seconds: int | None = Field(
        None,
        description="60–31536000; default 2592000 (30 days)",
        json_schema_extra={"minimum": 60, "maximum": 31_536_000},
    )
    reason: str | None = Field(None, description="up to 300 characters", max_length=300)


class BlockOut(s.Out):
    id: str
    kind: BlockKind
    value: str = Field(description="the prefix (+63917555) or the country (PH)")
    country: str | None = Field(description="the country of the prefix, when it has one")
    reason: str
    automatic: bool = Field(description="made by the detector rather than an operator")
    created_at: str
    expires_at: str


class BlockList(s.Out):
    data: list[BlockOut]


class SafeListIn(s.Body):
    number: str | None = Field(None, description="E.164, such as +34600000000")
    prefix: str | None = Field(None, description="+ and 4–13 digits, such as +63917555")


class DenyListIn(s.Body):
    country: str | None = Field(None, description="ISO 3166-1 alpha-2")
    prefix: str | None = Field(None, description="+ and 4–13 digits, such as +63917555")


class ListEntryOut(s.Out):
    id: str
    kind: EntryKind
    value: str
    created_at: str


class ListEntryList(s.Out):
    data: list[ListEntryOut]


# --- blocks ---------------------------------------------------------------------------------

ADMIN = (*AUTHENTICATED, Forbidden)


@router.get(
    "/blocks",
    tags=["fraud"],
    response_model=BlockList,
    responses=problem_responses(*ADMIN),
)
async def list_blocks(request: Request, principal: Caller) -> Response:
    """Admin only: the blocks in force on this server (every account's starts obey them)."""
    container = container_of(request)
    container.access.require_admin(principal)
    blocks = await container.fraud.blocks()
    return ok({"data": [render_block(b) for b in blocks]})


@router.post(
    "/blocks",
    tags=["fraud"],
    status_code=201,
    response_model=BlockOut,
    responses=problem_responses(*ADMIN, *READS_BODY),
)
async def create_block(request: Request, principal: Caller, body: CreateBlock) -> Response:
    """Admin only: block a whole country or a number prefix for everyone. A block in force for
    the same value is replaced."""
    container = container_of(request)
    container.access.require_admin(principal)
    fields: dict[str, Any] = body.model_dump(exclude={"reason"})
    block = await container.fraud.create_block(principal, fields=fields, reason=body.reason)
    return ok(render_block(block), 201)


@router.delete(
    "/blocks/{block_id}",
    tags=["fraud"],
    status_code=204,
    response_class=Response,
    responses=problem_responses(*ADMIN, NotFound),
)
async def lift_block(request: Request, principal: Caller, block_id: s.Text) -> Response:
    """Admin only: lift a block in force; starts to its destinations pass again at once, and
    the detector counts that prefix afresh."""
    container = container_of(request)
    container.access.require_admin(principal)
    await container.fraud.lift_block(principal, block_id)
    return Response(status_code=204)


# --- safe list and deny list ----------------------------------------------------------------


async def _list(request: Request, principal: Any, name: ListName) -> Response:
    entries = await container_of(request).fraud.entries(principal, name)
    return ok({"data": [render_entry(e) for e in entries]})


async def _add(
    request: Request, principal: Any, name: ListName, fields: dict[str, Any]
) -> Response:
    entry, created = await container_of(request).fraud.add_entry(principal, name, fields)
    return ok(render_entry(entry), 201 if created else 200)


_EXISTING: dict[int | str, dict[str, Any]] = {
    200: {"model": ListEntryOut, "description": "the value was listed already"}
}


@router.get(
    "/safe-list",
    tags=["fraud"],
    response_model=ListEntryList,
    responses=problem_responses(*AUTHENTICATED),
)
async def list_safe(request: Request, principal: Caller) -> Response:
    """This account's safe list: numbers and prefixes that bypass the detector and the blocks."""
    return await _list(request, principal, ListName.SAFE)


@router.post(
    "/safe-list",
    tags=["fraud"],
    status_code=201,
    response_model=ListEntryOut,
    responses={**_EXISTING, **problem_responses(*AUTHENTICATED, *READS_BODY)},
)
async def add_safe(request: Request, principal: Caller, body: SafeListIn) -> Response:
    """Add ``{"number": "+34…"}`` or ``{"prefix": "+63917555"}``."""
    return await _add(request, principal, ListName.SAFE, body.model_dump())


@router.delete(
    "/safe-list/{entry_id}",
    tags=["fraud"],
    status_code=204,
    response_class=Response,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def remove_safe(request: Request, principal: Caller, entry_id: s.Text) -> Response:
    await container_of(request).fraud.remove_entry(principal, ListName.SAFE, entry_id)
    return Response(status_code=204)


@router.get(
    "/deny-list",
    tags=["fraud"],
    response_model=ListEntryList,
    responses=problem_responses(*AUTHENTICATED),
)
async def list_deny(request: Request, principal: Caller) -> Response:
    """This account's deny list: countries and prefixes it never sends to."""
    return await _list(request, principal, ListName.DENY)


@router.post(
    "/deny-list",
    tags=["fraud"],
    status_code=201,
    response_model=ListEntryOut,
    responses={**_EXISTING, **problem_responses(*AUTHENTICATED, *READS_BODY)},
)
async def add_deny(request: Request, principal: Caller, body: DenyListIn) -> Response:
    """Add ``{"country": "PH"}`` or ``{"prefix": "+63917555"}``."""
    return await _add(request, principal, ListName.DENY, body.model_dump())


@router.delete(
    "/deny-list/{entry_id}",
    tags=["fraud"],
    status_code=204,
    response_class=Response,
    responses=problem_responses(*AUTHENTICATED, NotFound),
)
async def remove_deny(request: Request, principal: Caller, entry_id: s.Text) -> Response:
    await container_of(request).fraud.remove_entry(principal, ListName.DENY, entry_id)
    return Response(status_code=204)
