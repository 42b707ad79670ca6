"""Request bodies and response renderings of the native ``/v1`` API (API.md).

Request models check shape and types only, and refuse unknown fields; the ranges and rules
live in the domain (``domain.policy``), which answers with ``invalid_request`` naming the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from otpgate.domain.model import (
    Account,
    ApiKey,
    CheckResult,
    Message,
    Service,
    Verification,
)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServiceFields(Body):
    name: str | None = Field(
        None, description="Brand shown in messages ({brand}); required on create, 1–40 characters"
    )
    code_length: int | None = Field(None, description="4–10, default 6")
    code_type: str | None = Field(None, description="numeric | alphanumeric")
    ttl_seconds: int | None = Field(None, description="60–86400, default 600")
    max_check_attempts: int | None = Field(None, description="1–20, default 5")
    max_send_attempts: int | None = Field(None, description="1–10, default 5")
    resend_interval_seconds: int | None = Field(None, description="0–3600, default 30")
    channels: list[str] | None = Field(None, description="sms, voice, email in fallback order")
    allowed_countries: list[str] | None = Field(None, description="ISO alpha-2; null = all")
    sender_id: str | None = None
    templates: dict[str, str] | None = None
    default_locale: str | None = None
    webotp_domain: str | None = None
    android_app_hash: str | None = None
    webhook_url: str | None = None


class StartVerification(Body):
    service_id: str
    to: str = Field(description="E.164, or national format with country")
    country: str | None = Field(None, description="ISO alpha-2 when to is national")
    channel: str | None = None
    locale: str | None = None
    custom_code: str | None = None
    context: dict[str, Any] | None = Field(None, description="amount and/or payee")
    metadata: dict[str, Any] | None = None


class ResendVerification(Body):
    channel: str | None = None


class CheckCode(Body):
    code: str
    context: dict[str, Any] | None = None


class CheckByDestination(Body):
    service_id: str
    to: str
    country: str | None = None
    code: str
    context: dict[str, Any] | None = None


class CreateAccount(Body):
    name: str
    username: str | None = None


class CreateKey(Body):
    name: str
    account_id: str | None = Field(None, description="admin only: another account's id")


def timestamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z`` suffix."""
    if value is None:
        return None
    return value.replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def render_message(m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "channel": m.channel.value,
        "status": m.status.value,
        "provider": m.provider,
        "segments": m.segments,
        "encoding": m.encoding,
        "price": m.price,
        "created_at": timestamp(m.created_at),
        "updated_at": timestamp(m.updated_at),
    }


def render_verification(v: Verification, now: datetime) -> dict[str, Any]:
    return {
        "id": v.id,
        "service_id": v.service_id,
        "to": v.to,
        "channel": v.channel.value,
        "status": v.status_at(now).value,
        "created_at": timestamp(v.created_at),
        "updated_at": timestamp(v.updated_at),
        "expires_at": timestamp(v.expires_at),
        "check_attempts": v.check_attempts,
        "max_check_attempts": v.max_check_attempts,
        "send_attempts": v.send_attempts,
        "max_send_attempts": v.max_send_attempts,
        "context": v.context,
        "metadata": v.metadata,
        "messages": [render_message(m) for m in v.messages],
    }


def render_check(result: CheckResult) -> dict[str, Any]:
    return {
        "id": result.verification_id,
        "status": result.status.value,
        "valid": result.valid,
        "remaining_attempts": result.remaining_attempts,
    }


def render_service(s: Service) -> dict[str, Any]:
    p = s.policy
    return {
        "id": s.id,
        "name": p.name,
        "code_length": p.code_length,
        "code_type": p.code_type.value,
        "ttl_seconds": p.ttl_seconds,
        "max_check_attempts": p.max_check_attempts,
        "max_send_attempts": p.max_send_attempts,
        "resend_interval_seconds": p.resend_interval_seconds,
        "channels": [c.value for c in p.channels],
        "allowed_countries": None if p.allowed_countries is None else list(p.allowed_countries),
        "sender_id": p.sender_id,
        "templates": dict(p.templates),
        "default_locale": p.default_locale,
        "webotp_domain": p.webotp_domain,
        "android_app_hash": p.android_app_hash,
        "webhook_url": p.webhook_url,
        "created_at": timestamp(s.created_at),
        "updated_at": timestamp(s.updated_at),
    }


def render_account(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "username": a.username,
        "is_admin": a.is_admin,
        "created_at": timestamp(a.created_at),
    }


def without_secret(rendered_key: dict[str, Any]) -> dict[str, Any]:
    """A rendered new key as it may be stored for idempotent replays: without the secret."""
    return {**rendered_key, "key": None}


def render_key(k: ApiKey, secret: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": k.id,
        "account_id": k.account_id,
        "name": k.name,
        "created_at": timestamp(k.created_at),
        "revoked_at": timestamp(k.revoked_at),
    }
    if secret is not None:
        body["key"] = secret  # shown once, never stored
    return body
