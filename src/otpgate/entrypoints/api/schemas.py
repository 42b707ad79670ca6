"""Request bodies, response models and renderings of the native ``/v1`` API.

Request models check shape and types only, and refuse unknown fields; the ranges and rules
live in the domain (``domain.policy``), which answers with ``invalid_request`` naming the field.
The ranges are also written into the OpenAPI document (``json_schema_extra``) so a generated
client knows them, without pydantic's wording replacing the domain's.

Every string, object key and number of a request body is checked before anything else looks
at it (:func:`refuse_unstorable`): text that no database or encoder can hold is refused with
``invalid_request`` naming where it is.

Responses are rendered by the ``render_*`` functions (plain dicts, sent as they are: the hot
path pays for no response validation); the ``*Out`` models describe the same shapes for the
OpenAPI document, and the test suite checks real responses against it.
"""

from __future__ import annotations

import enum
import sys
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from otpgate.domain.billing import BillingMode, LedgerEntry, LedgerKind, cap_text, credits_text
from otpgate.domain.events import AuditRecord, EventRecord
from otpgate.domain.fraud import GuardLevel
from otpgate.domain.model import (
    DEFAULT_START_LIMITS,
    Account,
    ApiKey,
    AttemptOutcome,
    Channel,
    CheckResult,
    CodeType,
    Message,
    MessageStatus,
    RateLimits,
    Service,
    Verification,
    VerificationStatus,
)
from otpgate.domain.policy import LIMIT_RANGE, WINDOW_RANGE
from otpgate.domain.routing import ProviderHealth
from otpgate.errors import InvalidRequest
from otpgate.services.billing import CountryPrice

#: Deeper than this, a request body is refused: no otpgate field needs more, and rendering or
#: storing a deeper value would only spend stack.
MAX_BODY_DEPTH = 32


def _unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored or rendered, or None when it can."""
    if "\x00" in text:
        return "a NUL character, which cannot be stored"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone UTF-16 surrogate, which is not Unicode text; send valid UTF-8"
    return None


def _dotted(path: tuple[str | int, ...]) -> str | None:
    return ".".join(str(part) for part in path) or None


def refuse_unstorable(data: Any) -> None:
    """Raise ``InvalidRequest`` for the first string (value or object key), number or nesting
    level of a parsed JSON body that cannot be stored or rendered.

    ``param`` names the path of the offending value (``metadata.a.1.b``); for an offending key,
    the object that holds it (a key that cannot be rendered cannot be named). Iterative, so a
    deeply nested body cannot exhaust the stack.
    """
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            reason = _unstorable(value)
            if reason:
                raise InvalidRequest(
                    f"{_dotted(path) or 'the body'} holds {reason}", param=_dotted(path)
                )
        elif isinstance(value, float | int) and not isinstance(value, bool):
            # json reads a float beyond a double's range as inf, but an integer of any size
            # as an int: both are numbers no JSON peer (nor PostgreSQL's JSON) can carry.
            # (NaN compares false with everything, so it fails this test too.)
            if not abs(value) <= sys.float_info.max:
                raise InvalidRequest(
                    f"{_dotted(path)} must be a finite number JSON can carry (not NaN, Infinity"
                    " or beyond a double's range)",
                    param=_dotted(path),
                )
        elif isinstance(value, dict | list):
            if len(path) >= MAX_BODY_DEPTH:
                raise InvalidRequest(
                    f"{path[0]} is nested more than {MAX_BODY_DEPTH} levels deep",
                    param=str(path[0]),
                )
            if isinstance(value, list):
                children = list(enumerate(value))
            else:
                children = []
                for key, child in value.items():
                    reason = _unstorable(key) if isinstance(key, str) else None
                    if reason:
                        where = f"an object key in {_dotted(path)}" if path else "a field name"
                        raise InvalidRequest(f"{where} holds {reason}", param=_dotted(path))
                    children.append((key, child))
            stack.extend((child, (*path, key)) for key, child in reversed(children))


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain a NUL character")
    return value


#: A path or query parameter: any text but NUL, which no database can compare or store.
#: (Percent-decoding never yields a lone surrogate: invalid UTF-8 becomes U+FFFD.)
Text = Annotated[str, AfterValidator(_no_nul)]


def _range(low: int, high: int) -> dict[str, Any]:
    return {"minimum": low, "maximum": high}


def one_of(values: type[enum.StrEnum], *, listed: bool = False) -> dict[str, Any]:
    """The schema of a nullable field that takes one of an enum's values (or a list of them).
    Only the schema says so: the domain checks the value and words the refusal."""
    names = {"type": "string", "enum": [member.value for member in values]}
    shape = {"type": "array", "items": names} if listed else names
    return {"anyOf": [shape, {"type": "null"}]}


class Body(BaseModel):
    # Strict: a number sent as a string ("6") or a string as a number is refused, as the
    # document says, instead of converted.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        refuse_unstorable(data)
        return data


def _rate_limits_schema() -> dict[str, Any]:
    """The shape of a service's ``rate_limits`` (the domain checks it and words refusals)."""
    low, high = LIMIT_RANGE
    shortest, longest = WINDOW_RANGE
    limit = {
        "type": "object",
        "properties": {
            "limit": {"type": "integer", "minimum": low, "maximum": high},
            "window_seconds": {"type": "integer", "minimum": shortest, "maximum": longest},
        },
        "required": ["limit", "window_seconds"],
        "additionalProperties": False,
    }
    members: dict[str, Any] = {name: limit for name in DEFAULT_START_LIMITS}
    members["fail_open"] = {"type": "boolean"}
    return {
        "anyOf": [
            {"type": "object", "properties": members, "additionalProperties": False},
            {"type": "null"},
        ]
    }


class ServiceFields(Body):
    name: str | None = Field(
        None,
        description="Brand shown in messages ({brand}); required on create; 1–40 characters "
        "once trimmed",
    )
    code_length: int | None = Field(
        None, description="4–10, default 6", json_schema_extra=_range(4, 10)
    )
    code_type: str | None = Field(
        None, description="default numeric", json_schema_extra=one_of(CodeType)
    )
    ttl_seconds: int | None = Field(
        None, description="60–86400, default 600", json_schema_extra=_range(60, 86_400)
    )
    max_check_attempts: int | None = Field(
        None, description="1–20, default 5", json_schema_extra=_range(1, 20)
    )
    max_send_attempts: int | None = Field(
        None, description="1–10, default 5", json_schema_extra=_range(1, 10)
    )
    resend_interval_seconds: int | None = Field(
        None, description="0–3600, default 30", json_schema_extra=_range(0, 3_600)
    )
    channels: list[str] | None = Field(
        None,
        description="in fallback order; no repeats; default [sms]",
        json_schema_extra=one_of(Channel, listed=True),
    )
    allowed_countries: list[str] | None = Field(
        None, description="ISO 3166-1 alpha-2 codes; null = all"
    )
    sender_id: str | None = Field(
        None, description="1–11 letters/digits/spaces with a letter, or up to 15 digits"
    )
    templates: dict[str, str] | None = Field(None, description="locale → template")
    default_locale: str | None = Field(None, description="such as en or es-MX; default en")
    webotp_domain: str | None = Field(None, description="a bare host; adds the WebOTP line")
    android_app_hash: str | None = Field(None, description="11 characters of A-Za-z0-9+/")
    webhook_url: str | None = Field(None, description="an http(s) URL")
    allow_multipart: bool | None = Field(
        None,
        description="accept custom templates longer than one SMS segment (each part billed); "
        "default false",
    )
    fallback_after_seconds: int | None = Field(
        None,
        description="with several channels: move to the next when no check arrived within "
        "this many seconds (10–3600, shorter than ttl_seconds); null: only when a channel "
        "fails for good",
        json_schema_extra=_range(10, 3_600),
    )
    test_numbers: dict[str, Any] | None = Field(
        None,
        description="test numbers: E.164 number → its fixed code (the service's code length "
        "and alphabet), at most 100. A start to one answers as usual, sends nothing, uses no "
        "rate limit, credit or spend cap, and only the fixed code approves it. null: none",
    )
    daily_spend_cap: str | None = Field(
        None,
        description="the most this service's messages may cost in one UTC day, in credits "
        '(decimal text such as "25" or "12.5"); past it sends are refused with 402 '
        "insufficient_credit. null: no cap",
        json_schema_extra={"pattern": r"^[0-9]{1,10}(\.[0-9]{1,4})?$"},
    )
    rate_limits: dict[str, Any] | None = Field(
        None,
        description="limits on starts (and resends): any of per_number (default 10 per "
        "3600 s), per_prefix (10 per 600 s), per_country (3000 per 600 s), per_ip (100 per "
        "3600 s) and per_service (30000 per 600 s), each {limit, window_seconds}; and "
        "fail_open (default false: starts answer 503 while the shared limit store is down). "
        "What is left out keeps its default; the object replaces the previous one whole; "
        "null: every default",
        json_schema_extra=_rate_limits_schema(),
    )
    fraud_guard: str | None = Field(
        None,
        description="the SMS-pumping detector's sensitivity for this service's starts; "
        "default standard (docs/security.md)",
        json_schema_extra=one_of(GuardLevel),
    )
    allow_voip: bool | None = Field(
        None, description="send SMS codes to VoIP numbers too; default false"
    )
    custom_code_enabled: bool | None = Field(
        None,
        description="accept a start's own `custom_code`; default true (false for a service "
        "created through the Twilio Verify surface, as Twilio's `CustomCodeEnabled`)",
    )


class StartVerification(Body):
    service_id: str
    to: str = Field(description="E.164, or national format with country")
    country: str | None = Field(None, description="ISO alpha-2 when to is national")
    channel: str | None = Field(
        None,
        description="default: the service's first channel",
        json_schema_extra=one_of(Channel),
    )
    locale: str | None = Field(None, description="such as en or es-MX")
    custom_code: str | None = Field(
        None, description="a code of the service's length and alphabet, instead of a random one"
    )
    context: dict[str, Any] | None = Field(
        None, description="amount and/or payee: strings of 1–32 characters"
    )
    metadata: dict[str, Any] | None = Field(
        None, description="any object, at most 4096 bytes as JSON; returned as given"
    )
    email: str | None = Field(
        None,
        description="an e-mail address for the email channel when the service falls back to "
        "it (with channel email, `to` is the address)",
    )
    client_ip: str | None = Field(
        None,
        description="the end user's IPv4 or IPv6 address, as your backend saw it: counted "
        "against the service's per_ip rate limit (IPv6 by its /64)",
    )


class ResendVerification(Body):
    channel: str | None = Field(None, json_schema_extra=one_of(Channel))


class NoFields(Body):
    """The optional body of an action that takes no parameters: left out, or ``{}``."""


class CheckCode(Body):
    code: str = Field(
        description="as the user typed it: digits of any script, spaces and dashes are fine",
        json_schema_extra={"maxLength": 64},
    )
    context: dict[str, Any] | None = Field(None, description="the start's context, if any")


class CheckByDestination(Body):
    service_id: str
    to: str
    country: str | None = None
    code: str = Field(json_schema_extra={"maxLength": 64})
    context: dict[str, Any] | None = None


class CreateAccount(Body):
    name: str = Field(description="1–200 characters once trimmed")
    username: str | None = Field(
        None, description="an e-mail address or a simple identifier; default: the account id"
    )
    billing: str | None = Field(
        None,
        description="prepaid (the default: sends need credit) or unlimited",
        json_schema_extra=one_of(BillingMode),
    )


class UpdateAccount(Body):
    daily_spend_cap: str | None = Field(
        None,
        description="the most the account's messages may cost in one UTC day, in credits "
        '(decimal text such as "100"); null removes the cap',
        json_schema_extra={"pattern": r"^[0-9]{1,10}(\.[0-9]{1,4})?$"},
    )


class SendMessage(Body):
    to: str = Field(description="E.164, or national format with country")
    country: str | None = Field(None, description="ISO alpha-2 when to is national")
    text: str = Field(description="the text; GSM-7 or Unicode, up to 10 SMS parts")
    sender_id: str | None = Field(
        None, description="alphanumeric (1–11) or numeric (up to 15 digits); default: the route's"
    )


class CreateKey(Body):
    name: str = Field(description="1–200 characters once trimmed")
    account_id: str | None = Field(None, description="admin only: another account's id")


# --- responses (for the OpenAPI document; the renderers below produce the same shapes) ------


class Out(BaseModel):
    """A response shape. Every field is always present (null where the type says so)."""


class AttemptOut(Out):
    provider: str | None = Field(description="null when no provider could be tried")
    at: datetime
    outcome: AttemptOutcome
    error: str | None


class MessageOut(Out):
    id: str
    channel: Channel
    status: MessageStatus
    provider: str | None
    segments: int
    encoding: str
    price: str | None
    test: bool = Field(
        description="a message to a test number: never sent (provider test), never billed"
    )
    created_at: datetime
    updated_at: datetime
    attempts: list[AttemptOut] = Field(
        description="delivery attempts, oldest first: provider, time and outcome of each"
    )


class VerificationOut(Out):
    id: str
    service_id: str
    to: str = Field(description="E.164")
    channel: Channel
    status: VerificationStatus
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    check_attempts: int
    max_check_attempts: int
    send_attempts: int
    max_send_attempts: int
    context: dict[str, str] | None
    metadata: dict[str, Any]
    test: bool = Field(description="a verification of one of the service's test numbers")
    messages: list[MessageOut]


class CheckResultOut(Out):
    id: str
    status: VerificationStatus
    valid: bool
    remaining_attempts: int


class LimitOut(Out):
    limit: int
    window_seconds: int


class RateLimitsOut(Out):
    """The start limits in force: the service's own where it set them, else the defaults."""

    per_number: LimitOut
    per_prefix: LimitOut
    per_country: LimitOut
    per_ip: LimitOut
    per_service: LimitOut
    fail_open: bool


class ServiceOut(Out):
    id: str
    name: str
    code_length: int
    code_type: CodeType
    ttl_seconds: int
    max_check_attempts: int
    max_send_attempts: int
    resend_interval_seconds: int
    channels: list[Channel]
    allowed_countries: list[str] | None
    sender_id: str | None
    templates: dict[str, str]
    default_locale: str
    webotp_domain: str | None
    android_app_hash: str | None
    webhook_url: str | None
    allow_multipart: bool
    fallback_after_seconds: int | None
    test_numbers: dict[str, str]
    daily_spend_cap: str | None = Field(description="credits per UTC day; null: no cap")
    rate_limits: RateLimitsOut
    fraud_guard: GuardLevel
    allow_voip: bool
    custom_code_enabled: bool
    created_at: datetime
    updated_at: datetime


class AccountOut(Out):
    id: str
    name: str
    username: str
    is_admin: bool
    created_at: datetime
    billing: BillingMode
    balance: str = Field(description="credits, as a decimal")
    daily_spend_cap: str | None = Field(description="credits per UTC day; null: no cap")


class SmsOut(MessageOut):
    """A plain SMS (``POST /v1/messages``)."""

    to: str
    sender_id: str | None
    error: str | None


class LedgerEntryOut(Out):
    id: str
    kind: LedgerKind
    credits: str = Field(description="signed: a debit is negative")
    balance: str = Field(description="the account's balance right after this entry")
    message_id: str | None
    note: str | None
    created_at: datetime


class LedgerPage(Out):
    data: list[LedgerEntryOut]
    next_cursor: str | None


class PriceOut(Out):
    country: str = Field(description="ISO 3166-1 alpha-2, or * for every other country")
    prefix: str | None = Field(description="the calling code, without +")
    name: str
    credits: str = Field(description="per SMS part")


class PriceList(Out):
    data: list[PriceOut]


class ProviderOut(Out):
    name: str
    type: str
    state: Literal["closed", "open", "half_open"] = Field(
        description="circuit breaker: closed (in use), open (resting after failures), "
        "half_open (one trial send allowed)"
    )
    last_error: str | None
    sent: int = Field(description="sends accepted by the provider, by this process")
    failed: int = Field(description="sends that failed, by this process")


class ProviderList(Out):
    data: list[ProviderOut]


def render_provider(health: ProviderHealth) -> dict[str, Any]:
    return {
        "name": health.name,
        "type": health.type,
        "state": health.state.value,
        "last_error": health.last_error,
        "sent": health.sent,
        "failed": health.failed,
    }


class KeyOut(Out):
    id: str
    account_id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


class NewKeyOut(KeyOut):
    key: str | None = Field(
        description="the secret, shown in this response only; null when the response is a "
        "replay under the same Idempotency-Key, since the secret is never stored"
    )


class VerificationPage(Out):
    data: list[VerificationOut]
    next_cursor: str | None


class ServicePage(Out):
    data: list[ServiceOut]
    next_cursor: str | None


class AccountPage(Out):
    data: list[AccountOut]
    next_cursor: str | None


class KeyPage(Out):
    data: list[KeyOut]
    next_cursor: None = Field(description="always null: every key is in one page")


class HealthOut(Out):
    status: Literal["ok"]


class ReadyOut(Out):
    status: Literal["ready"]


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
        "test": m.test,
        "created_at": timestamp(m.created_at),
        "updated_at": timestamp(m.updated_at),
        "attempts": [
            {
                "provider": a.provider,
                "at": timestamp(a.at),
                "outcome": a.outcome.value,
                "error": a.error,
            }
            for a in m.history
        ],
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
        "test": v.test,
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
        "allow_multipart": p.allow_multipart,
        "fallback_after_seconds": p.fallback_after_seconds,
        "test_numbers": dict(p.test_numbers),
        "daily_spend_cap": cap_text(p.daily_spend_cap),
        "rate_limits": render_rate_limits(p.rate_limits),
        "fraud_guard": p.fraud_guard.value,
        "allow_voip": p.allow_voip,
        "custom_code_enabled": p.custom_code_enabled,
        "created_at": timestamp(s.created_at),
        "updated_at": timestamp(s.updated_at),
    }


def render_rate_limits(limits: RateLimits) -> dict[str, Any]:
    return limits.document()


def render_account(a: Account) -> dict[str, Any]:
    return {
        "id": a.id,
        "name": a.name,
        "username": a.username,
        "is_admin": a.is_admin,
        "created_at": timestamp(a.created_at),
        "billing": a.billing.value,
        "balance": credits_text(a.balance),
        "daily_spend_cap": cap_text(a.daily_spend_cap),
    }


def render_sms(m: Message) -> dict[str, Any]:
    return {**render_message(m), "to": m.to, "sender_id": m.sender_id, "error": m.error}


def render_ledger_entry(e: LedgerEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind.value,
        "credits": credits_text(e.amount),
        "balance": credits_text(e.balance),
        "message_id": e.message_id,
        "note": e.note,
        "created_at": timestamp(e.created_at),
    }


def render_price(p: CountryPrice) -> dict[str, Any]:
    return {
        "country": p.country,
        "prefix": p.prefix,
        "name": p.name,
        "credits": credits_text(p.unit_price),
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


# --- events and the audit log ------------------------------------------------------------------


class NewServiceOut(ServiceOut):
    webhook_secret: str | None = Field(
        description="the webhook signing secret (whsec_…), shown in this response only; null "
        "when the response is a replay under the same Idempotency-Key"
    )


class WebhookSecretOut(Out):
    service_id: str
    webhook_secret: str = Field(
        description="the new signing secret (whsec_…), shown in this response only; the "
        "previous one stops signing at once"
    )


class EventOut(Out):
    id: str = Field(description="the webhook-id of every delivery attempt")
    type: str
    account_id: str
    service_id: str | None
    data: dict[str, Any] = Field(description="ids, statuses and counts; what was posted")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


class EventPage(Out):
    data: list[EventOut]
    next_cursor: str | None


class AuditOut(Out):
    id: str
    account_id: str
    actor: str = Field(description="the API key id that acted, or cli")
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    created_at: datetime


class AuditPage(Out):
    data: list[AuditOut]
    next_cursor: str | None


def without_webhook_secret(rendered: dict[str, Any]) -> dict[str, Any]:
    """A rendered new service as it may be stored for idempotent replays."""
    return {**rendered, "webhook_secret": None}


def render_event(e: EventRecord) -> dict[str, Any]:
    return {
        "id": e.id,
        "type": e.type,
        "account_id": e.account_id,
        "service_id": e.service_id,
        "data": dict(e.data),
        "status": e.state.value,
        "attempts": e.attempts,
        "last_error": e.last_error,
        "next_attempt_at": timestamp(e.next_attempt_at),
        "created_at": timestamp(e.created_at),
        "delivered_at": timestamp(e.delivered_at),
    }


def render_audit(a: AuditRecord) -> dict[str, Any]:
    return {
        "id": a.id,
        "account_id": a.account_id,
        "actor": a.actor,
        "action": a.action,
        "target": a.target,
        "before": None if a.before is None else dict(a.before),
        "after": None if a.after is None else dict(a.after),
        "created_at": timestamp(a.created_at),
    }
