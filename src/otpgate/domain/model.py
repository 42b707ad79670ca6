"""The nouns of otpgate: plain dataclasses and enums, no I/O.

Ids are a type prefix, an underscore and 32 lowercase hex characters from ``secrets``
(API.md §1). Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import enum
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from otpgate.domain.billing import BillingMode, credits_text
from otpgate.domain.fraud import GuardLevel


def new_id(prefix: str) -> str:
    """A fresh id such as ``ver_3f0c…``: 128 random bits from the OS CSPRNG."""
    return f"{prefix}_{secrets.token_hex(16)}"


class VerificationStatus(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    EXPIRED = "expired"
    CANCELED = "canceled"
    MAX_ATTEMPTS_REACHED = "max_attempts_reached"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self is not VerificationStatus.PENDING


class MessageStatus(enum.StrEnum):
    QUEUED = "queued"
    SENT = "sent"
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    #: A scheduled message canceled before it went out.
    CANCELED = "canceled"


class Channel(enum.StrEnum):
    SMS = "sms"
    VOICE = "voice"
    EMAIL = "email"


class CodeType(enum.StrEnum):
    NUMERIC = "numeric"
    ALPHANUMERIC = "alphanumeric"


@dataclass(frozen=True, slots=True)
class Account:
    id: str
    name: str
    username: str
    is_admin: bool
    created_at: datetime
    billing: BillingMode = BillingMode.UNLIMITED
    #: Credit in units of 1/10,000 credit (``domain.billing``); only a prepaid account spends it.
    balance: int = 0
    #: The most this account's messages may count against spend caps in one UTC day, in units
    #: (``domain.spend``); None: no cap.
    daily_spend_cap: int | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: only the SHA-256 of the secret, never the secret itself."""

    id: str
    account_id: str
    name: str
    key_hash: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the authenticated account and the key it used."""

    account: Account
    key_id: str


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``limit`` events in any ``window_seconds`` (a moving window)."""

    limit: int
    window_seconds: int


#: The start limits a service has unless it says otherwise (docs/security.md, "Rate limits",
#: says why each figure). Keys are per service: a destination's starts in one service.
DEFAULT_START_LIMITS: dict[str, Limit] = {
    # One person asks for a code a few times at most; ten in an hour is flooding a phone.
    "per_number": Limit(10, 3_600),
    # 1,000 consecutive numbers (the number without its last 3 digits): a pumped range.
    "per_prefix": Limit(10, 600),
    # 3,000 in 10 minutes is 5 a second, sustained, into one country.
    "per_country": Limit(3_000, 600),
    # One end user's address (as the integrator passes it); carrier-grade NAT shares one
    # address among many users, hence far more than per number.
    "per_ip": Limit(100, 3_600),
    # 30,000 in 10 minutes is 50 a second, sustained, for the whole service.
    "per_service": Limit(30_000, 600),
}


@dataclass(frozen=True, slots=True)
class RateLimits:
    """A service's start limits: its own where it set them (``overrides``), the defaults
    (:data:`DEFAULT_START_LIMITS`) otherwise. ``fail_open``: starts go on, unlimited, while
    the shared limit store (Redis) cannot answer; code checks never do."""

    overrides: tuple[tuple[str, Limit], ...] = ()
    fail_open: bool = False

    def limit(self, name: str) -> Limit:
        for key, value in self.overrides:
            if key == name:
                return value
        return DEFAULT_START_LIMITS[name]

    def effective(self) -> dict[str, Limit]:
        """Every start limit in force, by name, in the order of the defaults."""
        return {name: self.limit(name) for name in DEFAULT_START_LIMITS}

    def document(self) -> dict[str, Any]:
        """The limits as the API shows them: each in force, by name, as ``{"limit",
        "window_seconds"}``, and ``fail_open``."""
        shown: dict[str, Any] = {
            name: {"limit": limit.limit, "window_seconds": limit.window_seconds}
            for name, limit in self.effective().items()
        }
        shown["fail_open"] = self.fail_open
        return shown


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """The settings of a service (API.md §3), validated by ``domain.policy.validate_policy``."""

    name: str
    code_length: int = 6
    code_type: CodeType = CodeType.NUMERIC
    ttl_seconds: int = 600
    max_check_attempts: int = 5
    max_send_attempts: int = 5
    resend_interval_seconds: int = 30
    channels: tuple[Channel, ...] = (Channel.SMS,)
    allowed_countries: tuple[str, ...] | None = None
    sender_id: str | None = None
    templates: dict[str, str] = field(default_factory=dict)
    default_locale: str = "en"
    webotp_domain: str | None = None
    android_app_hash: str | None = None
    webhook_url: str | None = None
    #: Accept templates that may need more than one SMS part (each part is billed).
    allow_multipart: bool = False
    #: With several channels: the next one is used when no check arrived within this long.
    fallback_after_seconds: int | None = None
    #: Test numbers: E.164 number → its fixed code. A start to one sends nothing and uses no
    #: limit, credit or cap; only the fixed code approves (``services.test_numbers``).
    test_numbers: dict[str, str] = field(default_factory=dict)
    #: The most this service's messages may count against spend caps in one UTC day, in units
    #: (``domain.spend``); None: no cap.
    daily_spend_cap: int | None = None
    #: Rate limits on starts (``RateLimits``): the defaults unless the service overrides them.
    rate_limits: RateLimits = RateLimits()
    #: The SMS-pumping detector's sensitivity for this service's starts (``domain.fraud``).
    fraud_guard: GuardLevel = GuardLevel.STANDARD
    #: Send SMS codes to VoIP numbers too (S12: refused by default).
    allow_voip: bool = False
    #: Accept a caller's own code (``custom_code`` at start). On by default; a service made
    #: through the Twilio Verify surface starts with it off, as Twilio's ``CustomCodeEnabled``.
    custom_code_enabled: bool = True


@dataclass(frozen=True, slots=True)
class Service:
    id: str
    account_id: str
    policy: ServicePolicy
    created_at: datetime
    updated_at: datetime


class AttemptOutcome(enum.StrEnum):
    """What became of one delivery attempt."""

    #: The provider accepted the message.
    SENT = "sent"
    #: It failed for now (a transient error, or every provider was resting); another follows.
    RETRY = "retry"
    #: The request went out and no answer came: the provider may have sent it.
    UNANSWERED = "unanswered"
    #: The message failed for good.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt in a message's history: which provider (None when none was
    tried), when it ended, how, and the error text when it did not succeed."""

    provider: str | None
    at: datetime
    outcome: AttemptOutcome
    error: str | None = None

    def to_line(self) -> str:
        """One JSON line, as the message's stored history keeps it."""
        return (
            json.dumps(
                {
                    "provider": self.provider,
                    "at": self.at.isoformat(),
                    "outcome": self.outcome.value,
                    "error": self.error,
                },
                separators=(",", ":"),
                ensure_ascii=False,
            )
            + "\n"
        )


def parse_attempt_log(text: str | None) -> tuple[Attempt, ...]:
    """The attempts of a stored history (lines that do not parse are skipped: a history cut
    at its size limit ends in a whole line, but a reader must not fail on an old row)."""
    attempts = []
    for line in (text or "").splitlines():
        try:
            item = json.loads(line)
            attempts.append(
                Attempt(
                    provider=item["provider"],
                    at=datetime.fromisoformat(item["at"]),
                    outcome=AttemptOutcome(item["outcome"]),
                    error=item.get("error"),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return tuple(attempts)


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery attempt of a verification's code (or a plain SMS); also the outbox row."""

    id: str
    account_id: str
    verification_id: str | None
    channel: Channel
    to: str
    status: MessageStatus
    locale: str
    segments: int
    encoding: str
    created_at: datetime
    updated_at: datetime
    provider: str | None = None
    provider_ref: str | None = None
    #: What the message costs, in units; None when no price applies (no price table loaded).
    price_units: int | None = None
    error: str | None = None
    attempts: int = 0
    #: A plain SMS's sender, the caller's own reference (LabsMobile ``subid``), its label and
    #: where its delivery reports are forwarded; None for verification messages.
    sender_id: str | None = None
    client_ref: str | None = None
    label: str | None = None
    ack_url: str | None = None
    #: The delivery history, oldest first (the first hundred or so attempts).
    history: tuple[Attempt, ...] = ()
    #: A message to a test number: stored as sent by provider ``test``, never sent, unpriced.
    test: bool = False
    #: What the message counts against the daily spend caps in force when it was queued, in
    #: units (its price, or the default price per part when it has none); None: no cap applied.
    spend_units: int | None = None

    @property
    def price(self) -> str | None:
        """The price as decimal credits, as the API shows it."""
        return None if self.price_units is None else credits_text(self.price_units)


@dataclass(frozen=True, slots=True)
class Verification:
    id: str
    account_id: str
    service_id: str
    to: str
    channel: Channel
    status: VerificationStatus
    code_digest: bytes
    code_sealed: bytes | None
    locale: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    last_sent_at: datetime
    check_attempts: int
    max_check_attempts: int
    send_attempts: int
    max_send_attempts: int
    context: dict[str, str] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: tuple[Message, ...] = ()
    #: A template and a sender of this verification's own (LabsMobile's ``sendCode`` message and
    #: sender), used instead of the service's.
    template: str | None = None
    sender_id: str | None = None
    #: Where an e-mail fallback goes (``email`` at start), and when the next channel of the
    #: service is due if no check arrives first (the service's ``fallback_after_seconds``).
    fallback_email: str | None = None
    fallback_at: datetime | None = None
    #: A verification of a test number (the service's ``test_numbers``): its code is the fixed
    #: one and none of its messages reaches a provider.
    test: bool = False

    def status_at(self, now: datetime) -> VerificationStatus:
        """The status as the API reports it: a pending verification past its expiry is expired,
        whether or not anything has written that yet (API.md §4.5)."""
        if self.status is VerificationStatus.PENDING and now >= self.expires_at:
            return VerificationStatus.EXPIRED
        return self.status

    @property
    def remaining_attempts(self) -> int:
        return max(0, self.max_check_attempts - self.check_attempts)


@dataclass(frozen=True, slots=True)
class CheckResult:
    verification_id: str
    status: VerificationStatus
    valid: bool
    remaining_attempts: int


@dataclass(frozen=True, slots=True)
class SmsContent:
    """What only the SMS channel needs to know about a message: the sender id shown on the
    handset (``None``: the provider account's default) and how the text travels, as measured by
    ``domain.sms.measure`` (``GSM-7`` or ``UCS-2``, and the number of billed parts)."""

    sender_id: str | None
    encoding: str
    segments: int


@dataclass(frozen=True, slots=True)
class EmailContent:
    """What only the e-mail channel needs: the subject line and the HTML alternative of the
    text (self-contained: no remote images, no tracking)."""

    subject: str
    html: str


@dataclass(frozen=True, slots=True)
class OutboundMessage:
    """What a sender is asked to deliver, on any channel: a destination (an E.164 number for
    SMS and voice, an address for e-mail) and the text the recipient reads or hears.

    ``text`` holds the code: never log it. ``sms`` is set exactly when ``channel`` is SMS and is
    read only by SMS senders; a voice or e-mail sender ignores it. ``receipt_url`` is where the
    provider reports delivery (it carries a secret), ``None`` for senders without reports.
    """

    message_id: str
    channel: Channel
    to: str
    text: str
    receipt_url: str | None = None
    sms: SmsContent | None = None
    #: The language of the text, for a voice provider's speech engine (``es``, ``pt-BR``).
    locale: str = "en"
    #: Set exactly when ``channel`` is e-mail.
    email: EmailContent | None = None

    def __post_init__(self) -> None:
        if (self.channel is Channel.SMS) != (self.sms is not None):
            raise ValueError("an SMS message needs its SmsContent, and only an SMS message")

    def __repr__(self) -> str:  # the text carries the code; keep it out of reprs and tracebacks
        return f"OutboundMessage(message_id={self.message_id!r}, channel={self.channel.value!r})"


@dataclass(frozen=True, slots=True)
class SendReceipt:
    """A provider's answer to an accepted message."""

    provider_ref: str | None = None
    price: str | None = None
