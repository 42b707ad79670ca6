"""Events for a service's webhook, and the audit trail's records (no I/O).

An event (:class:`otpgate.domain.ports.Event`) becomes an :class:`EventRecord`, one row of the
events outbox, when its service has a ``webhook_url``. Its id (``evt_…``) is the
``webhook-id`` of every delivery attempt, so a receiver can drop the retries it already
handled. Deliveries are signed as Standard Webhooks defines it (``webhook-id``,
``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">``)
with the service's own signing secret, ``whsec_`` + base64 of 32 random bytes.

The signing secret must be recoverable to sign, so it is kept sealed (AES-256-GCM under a key
derived from the master secret, the service id as associated data: a sealed secret cannot be
moved to another service), never in plain text; :class:`SecretBox` seals and opens it.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from standardwebhooks import Webhook

from otpgate.domain.model import (
    MessageStatus,
    ServicePolicy,
    Verification,
    VerificationStatus,
    new_id,
)
from otpgate.domain.phone import mask
from otpgate.domain.ports import Event

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 (a prefix, not a secret)
SECRET_BYTES: Final = 32
_NONCE_BYTES: Final = 12

VERIFICATION_APPROVED: Final = "verification.approved"
VERIFICATION_FAILED: Final = "verification.failed"
VERIFICATION_MAX_ATTEMPTS: Final = "verification.max_attempts_reached"
MESSAGE_DELIVERED: Final = "message.delivered"
MESSAGE_UNDELIVERED: Final = "message.undelivered"
FRAUD_BLOCKED: Final = "fraud.blocked"
SPEND_CAP_REACHED: Final = "spend_cap.reached"

#: Every event type otpgate sends (``GET /v1/events?type=`` accepts these).
EVENT_TYPES: Final = frozenset(
    {
        VERIFICATION_APPROVED,
        VERIFICATION_FAILED,
        VERIFICATION_MAX_ATTEMPTS,
        MESSAGE_DELIVERED,
        MESSAGE_UNDELIVERED,
        FRAUD_BLOCKED,
        SPEND_CAP_REACHED,
    }
)

#: Keys a payload never carries, whatever an emitter passes (defence in depth: the emitters
#: build payloads of ids, statuses and counts only).
FORBIDDEN_KEYS: Final = frozenset({"code", "text", "body", "message", "to", "number", "secret"})


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


def new_signing_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 bytes from the OS CSPRNG."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


class SecretBox:
    """Seals and opens webhook signing secrets (AES-256-GCM, 32-byte key, the service id as
    associated data). Holds the key; persists nothing."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the sealing key must be 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, service_id: str, secret: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, secret.encode(), service_id.encode())

    def open(self, service_id: str, sealed: bytes) -> str:
        """The secret back; ``ValueError`` if it was altered, moved or sealed under another key."""
        try:
            plain = self._aead.decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], service_id.encode()
            )
        except InvalidTag as exc:
            raise ValueError("sealed webhook secret does not authenticate") from exc
        return plain.decode()


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One row of the events outbox: an event on its way to ``url``."""

    id: str
    type: str
    account_id: str
    service_id: str | None
    url: str
    data: Mapping[str, Any]
    created_at: datetime
    state: DeliveryState = DeliveryState.PENDING
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None

    def __repr__(self) -> str:  # the URL may carry a token
        return f"EventRecord(id={self.id!r}, type={self.type!r}, state={self.state.value!r})"


def record_of(event: Event, url: str, now: datetime) -> EventRecord:
    """The outbox row of ``event`` for a service whose webhook is ``url``."""
    data = {k: v for k, v in event.data.items() if k not in FORBIDDEN_KEYS}
    return EventRecord(
        id=new_id("evt"),
        type=event.type,
        account_id=event.account_id,
        service_id=event.service_id,
        url=url,
        data=data,
        created_at=now,
        next_attempt_at=now,
    )


def body_of(record: EventRecord) -> bytes:
    """What is posted: ``{"type", "timestamp", "data"}``, the same bytes on every attempt."""
    document = {
        "type": record.type,
        "timestamp": record.created_at.isoformat().replace("+00:00", "Z"),
        "data": dict(record.data),
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def signed_headers(record: EventRecord, body: bytes, secret: str, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery attempt: the event id, the attempt's own
    time (receivers refuse stale timestamps), and the signature over both and the body."""
    signature = Webhook(secret).sign(record.id, now, body.decode())
    return {
        "webhook-id": record.id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


# --- payloads ---------------------------------------------------------------------------------


def verification_event(type_: str, verification: Verification, **counts: int) -> Event:
    """A verification's event: its ids, channel and status, and counts; never the code or
    the destination."""
    status = {
        VERIFICATION_APPROVED: VerificationStatus.APPROVED,
        VERIFICATION_FAILED: VerificationStatus.FAILED,
        VERIFICATION_MAX_ATTEMPTS: VerificationStatus.MAX_ATTEMPTS_REACHED,
    }[type_]
    data: dict[str, Any] = {
        "verification_id": verification.id,
        "service_id": verification.service_id,
        "channel": verification.channel.value,
        "status": status.value,
        **counts,
    }
    return Event(type_, verification.account_id, verification.service_id, data)


def message_event(
    *,
    message_id: str,
    verification_id: str | None,
    service_id: str,
    account_id: str,
    channel: str,
    status: MessageStatus,
    provider: str,
) -> Event | None:
    """A delivery report's event (``delivered``, or ``undelivered`` for an undelivered or
    failed report); ``None`` for a status that is no event."""
    if status is MessageStatus.DELIVERED:
        type_ = MESSAGE_DELIVERED
    elif status in (MessageStatus.UNDELIVERED, MessageStatus.FAILED):
        type_ = MESSAGE_UNDELIVERED
    else:
        return None
    data = {
        "message_id": message_id,
        "verification_id": verification_id,
        "service_id": service_id,
        "channel": channel,
        "status": status.value,
        "provider": provider,
    }
    return Event(type_, account_id, service_id, data)


# --- audit ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON-ready copy of a policy value (enums to their value, tuples to lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    return value


def url_origin(url: str) -> str:
    """``scheme://host[:port]``, with ``/…`` when the URL had more: a webhook URL may carry a
    token in its path, query or user information, which the audit trail never keeps."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    origin = f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")
    rest = parts.path not in ("", "/") or parts.query or parts.fragment or parts.username
    return origin + ("/…" if rest else "")


def policy_snapshot(policy: ServicePolicy) -> dict[str, Any]:
    """A service's settings as the audit trail keeps them: every field, JSON-ready, with the
    webhook URL reduced to its origin (:func:`url_origin`), the test numbers masked and
    without their fixed codes (an entry never holds a code or a full number), and the rate
    limits as the API shows them."""
    snapshot: dict[str, Any] = _plain(policy)
    if snapshot.get("webhook_url"):
        snapshot["webhook_url"] = url_origin(str(snapshot["webhook_url"]))
    snapshot["test_numbers"] = sorted(mask(number) for number in policy.test_numbers)
    snapshot["rate_limits"] = policy.rate_limits.document()
    return snapshot


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One stored audit entry."""

    id: str
    account_id: str
    actor: str
    action: str
    target: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    created_at: datetime
