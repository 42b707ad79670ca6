"""Typed settings, read once from the environment (prefix ``OTPGATE_``) at start-up.

Nothing else in otpgate reads ``os.environ``: the entrypoints build one :class:`Settings` and
hand it to :func:`otpgate.bootstrap.build`. Secrets are ``SecretStr`` so they never show in
reprs or logs. ``docs/configuration.md`` lists every setting.
"""

from __future__ import annotations

import enum
import ipaddress
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from otpgate.domain.billing import parse_credits
from otpgate.errors import InvalidRequest


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OTPGATE_", extra="ignore", frozen=True)

    env: Environment = Environment.DEVELOPMENT
    data_dir: Path = Path("var")
    #: ``sqlite:///var/otpgate.db`` or ``postgresql://user@host:5432/db``; the async driver is
    #: chosen by otpgate. Empty means SQLite at ``{data_dir}/otpgate.db``.
    database_url: str = ""
    #: PostgreSQL schema to use (``search_path``); empty for the server's default.
    database_schema: str = ""
    database_pool_size: int = Field(default=10, ge=1, le=200)
    #: The longest a request waits for storage: a SQLite write lock held by another process,
    #: a PostgreSQL connection or answer. Past it the request fails with 503 unavailable.
    database_timeout_seconds: float = Field(default=1.0, gt=0, le=30)
    #: Master secret (at least 32 bytes of entropy, e.g. ``openssl rand -base64 48``); the
    #: HMAC, encryption and receipt-token keys are derived from it. Required in production.
    secret_key: SecretStr | None = None
    #: Alternatively a file holding the secret, which must have mode 0600.
    secret_key_file: Path | None = None

    public_url: str = "http://127.0.0.1:8000"
    #: A TOML file of providers and routes (``[providers.NAME]``, ``[[routes]]``). When set, it
    #: is the whole delivery configuration and the one-provider settings below are ignored.
    config: Path | None = None
    #: The one provider of the environment form: its type; its options follow, by type.
    sms_provider: str = "console"
    labsmobile_username: str = ""
    labsmobile_token: SecretStr = SecretStr("")
    labsmobile_url: str = "https://api.labsmobile.com"
    #: ``smpp://SYSTEM_ID:PASSWORD@HOST:PORT?window=…`` (holds the password).
    smpp_url: SecretStr = SecretStr("")
    #: smsbox's ``sendsms`` URL with ``username`` and ``password`` (holds the password).
    kannel_url: SecretStr = SecretStr("")
    #: The ``smsc-id`` Kannel routes otpgate's messages to; empty: Kannel's own routing.
    kannel_smsc: str = ""
    #: Which Kannel delivery reports to ask for (sum of 1, 2, 4, 8, 16); unset: 19.
    kannel_dlr_mask: int | None = None
    twilio_account_sid: str = ""
    twilio_auth_token: SecretStr = SecretStr("")
    twilio_from: str = ""
    #: SMS through a Twilio Messaging Service instead of ``twilio_from``.
    twilio_messaging_service_sid: str = ""
    twilio_url: str = "https://api.twilio.com"
    vonage_api_key: str = ""
    vonage_api_secret: SecretStr = SecretStr("")
    vonage_url: str = "https://rest.nexmo.com"
    #: The sender for a service without a sender id (Vonage needs one on every SMS).
    vonage_from: str = ""
    #: ``smtp://user:pass@host:port?starttls=1`` (holds the password), for the e-mail channel.
    smtp_url: SecretStr = SecretStr("")
    email_from: str = ""
    #: PEM bundle of the CAs that may sign the SMTP server's certificate (default: certifi's).
    smtp_ca_file: Path | None = None
    provider_timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    #: Calls to URLs that callers supply (LabsMobile ``ackurl``, webhooks). Comma-separated
    #: CIDRs whose non-public addresses may be called anyway (loopback, private, link-local...
    #: are refused otherwise; loopback is allowed outside production).
    outbound_allow: str = ""
    #: The longest one such call may take, resolution, connection and answer included.
    outbound_timeout_seconds: float = Field(default=5.0, gt=0, le=60)

    #: Delivery. A verification's message is retried until the verification expires; a message
    #: without a verification (so without an expiry) makes at most this many attempts.
    delivery_max_attempts: int = Field(default=5, ge=1, le=20)
    #: The first retry waits this long; each further wait doubles, up to the cap below (each
    #: wait plus up to 25 % jitter).
    delivery_backoff_seconds: float = Field(default=2.0, gt=0, le=3600)
    delivery_backoff_max_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: How long a dispatcher holds a claimed message before another may take it (S22).
    delivery_lease_seconds: int = Field(default=30, ge=1, le=3600)
    #: Run the delivery dispatcher inside the API process (the embedded default).
    embedded_worker: bool = True

    #: S8: after this many consecutive failed checks the destination is locked for the service.
    lockout_threshold: int = Field(default=100, ge=1, le=10_000)
    lockout_seconds: int = Field(default=86_400, ge=60)

    #: Rate limits (docs/security.md, "Rate limits"). ``redis://[:PASSWORD@]HOST:PORT/DB`` or
    #: ``rediss://…`` (holds the password): counters shared by every process and node that
    #: uses it. Empty: counters in this process only.
    redis_url: SecretStr = SecretStr("")
    #: Every Redis key otpgate writes starts with this (several deployments, or test runs,
    #: can share one Redis).
    redis_key_prefix: str = Field(default="otpgate", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    #: The longest a request waits for Redis (connection or answer); past it, 503.
    redis_timeout_seconds: float = Field(default=0.5, gt=0, le=10)
    #: Sends of codes per account (every service of it) per window.
    rate_limit_per_account: int = Field(default=60_000, ge=1, le=100_000)
    rate_limit_per_account_window_seconds: int = Field(default=600, ge=1, le=86_400)
    #: Checks of a code per destination per service per window (guessing across a
    #: destination's verifications).
    rate_limit_checks: int = Field(default=60, ge=1, le=100_000)
    rate_limit_checks_window_seconds: int = Field(default=3_600, ge=1, le=86_400)

    #: API keys and services read on every request are cached this long per process; a change
    #: made through another process (or node) takes effect within it. 0 turns caching off.
    lookup_cache_seconds: float = Field(default=2.0, ge=0, le=60)

    #: Request bodies larger than this are refused with 413 before they are read whole (and
    #: before authentication). otpgate's largest request, a service with templates for many
    #: locales, stays well under the default of 64 KiB.
    max_body_bytes: int = Field(default=65_536, ge=1_024, le=16 * 1_048_576)
    #: The most recipients one LabsMobile ``POST /json/send`` may name (LabsMobile's own
    #: default is 10,000). That route's body limit grows with it, so a full batch fits.
    json_send_max_recipients: int = Field(default=10_000, ge=1, le=100_000)

    #: What a message without a price (no price table loaded, or a call) counts against the
    #: daily spend caps, in credits per SMS part (a call counts one part; an e-mail nothing).
    default_message_credits: str = "1"

    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("public_url", "labsmobile_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @field_validator("default_message_credits")
    @classmethod
    def _credits(cls, value: str) -> str:
        try:
            parse_credits(value, param="OTPGATE_DEFAULT_MESSAGE_CREDITS")
        except InvalidRequest as exc:
            raise ValueError(exc.detail) from None
        return value.strip()

    @property
    def default_message_units(self) -> int:
        """``default_message_credits`` in credit units (validated when the settings were read)."""
        return parse_credits(self.default_message_credits, param="default_message_credits")

    @field_validator("outbound_allow")
    @classmethod
    def _cidr_ranges(cls, value: str) -> str:
        _cidr_ranges(value)
        return value

    @model_validator(mode="after")
    def _timeout_inside_lease(self) -> Settings:
        # A send that can outlast its lease could be claimed and sent again while still running.
        if self.provider_timeout_seconds >= self.delivery_lease_seconds:
            raise ValueError(
                "OTPGATE_PROVIDER_TIMEOUT_SECONDS must be shorter than "
                "OTPGATE_DELIVERY_LEASE_SECONDS"
            )
        return self

    @property
    def outbound_allow_ranges(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``outbound_allow`` parsed (validated when the settings were read)."""
        return _cidr_ranges(self.outbound_allow)

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "otpgate.db"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.sqlite_path}"


def _cidr_ranges(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Comma-separated CIDRs (``10.0.0.0/8, fd12::/16``; a bare address is a range of one).
    A range with host bits set (``10.0.0.1/8``) is refused rather than guessed at."""
    ranges = []
    for entry in (part.strip() for part in value.split(",")):
        if entry:
            try:
                ranges.append(ipaddress.ip_network(entry))
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a CIDR range ({exc})") from None
    return tuple(ranges)
