"""The one place that wires settings → adapters → services.

:func:`build` reads nothing but the :class:`~otpgate.settings.Settings` it is given. A bad
provider name or a missing credential fails here, at start-up, with a message naming the
setting (DESIGN.md habit 3), never at the first send.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from otpgate.adapters import providers
from otpgate.adapters.metrics import PrometheusMetrics
from otpgate.adapters.outbound import OutboundHttp
from otpgate.adapters.outbound import from_settings as outbound_from_settings
from otpgate.adapters.providers.config import Delivery, load_delivery
from otpgate.adapters.ratelimit import LimitsRateLimiter
from otpgate.adapters.storage.engine import is_sqlite, sqlite_file
from otpgate.adapters.storage.executor import Executor
from otpgate.adapters.storage.migrate import upgrade
from otpgate.adapters.storage.postgres import PostgresExecutor
from otpgate.adapters.storage.sqlite import SqliteExecutor
from otpgate.adapters.storage.store import SqlStore
from otpgate.domain.codes import CodeVault
from otpgate.domain.events import SecretBox
from otpgate.domain.model import Limit
from otpgate.domain.ports import (
    Clock,
    EventSink,
    RateLimiter,
    ReceiptParser,
    ReportSource,
    Sender,
    Storage,
)
from otpgate.domain.routing import (
    CIRCUIT_GAUGE,
    CircuitBreaker,
    ProviderHealth,
    Route,
    Routing,
)
from otpgate.errors import ConfigurationError
from otpgate.services.accounts import AccessService
from otpgate.services.audit import AuditLog
from otpgate.services.billing import Billing
from otpgate.services.cache import TtlCache
from otpgate.services.callbacks import CallbackSender
from otpgate.services.catalog import ServiceCatalog
from otpgate.services.delivery import Dispatcher, ReceiptService, RetryPolicy
from otpgate.services.events import EventLog, EventSender, WebhookEvents, WebhookSecrets
from otpgate.services.fraud import FraudGuard
from otpgate.services.idempotency import Idempotency
from otpgate.services.messaging import Messaging
from otpgate.services.ratelimit import RateLimiting
from otpgate.services.spend import SpendCaps
from otpgate.services.verification import LockoutPolicy, VerificationService
from otpgate.settings import Environment, Settings

log = logging.getLogger(__name__)

DEV_KEY_FILE = "secret.key"
MIN_SECRET_BYTES = 32


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Keys:
    """Keys derived from the master secret; each purpose gets its own (HKDF-style labels)."""

    digest: bytes
    sealing: bytes
    receipts: bytes
    #: Seals the services' webhook signing secrets (``domain.events.SecretBox``).
    webhooks: bytes
    #: Hashes destinations and addresses in rate-limit counter keys.
    rate_limits: bytes

    def __repr__(self) -> str:
        return "Keys(<hidden>)"

    def receipt_token(self, provider: str) -> str:
        """The secret a provider's receipt URL carries (S20)."""
        mac = hmac.new(self.receipts, provider.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def derive_keys(master: bytes) -> Keys:
    def derive(label: str) -> bytes:
        return hmac.new(master, f"otpgate/{label}/v1".encode(), hashlib.sha256).digest()

    return Keys(
        digest=derive("code-digest"),
        sealing=derive("code-sealing"),
        receipts=derive("receipt-token"),
        webhooks=derive("webhook-secret-sealing"),
        rate_limits=derive("rate-limit-keys"),
    )


def load_master_secret(settings: Settings) -> bytes:
    """The master secret from ``OTPGATE_SECRET_KEY``, ``OTPGATE_SECRET_KEY_FILE`` (mode 0600) or,
    outside production only, a development key generated in the data directory (S17)."""
    if settings.secret_key is not None:
        secret = settings.secret_key.get_secret_value().encode()
    elif settings.secret_key_file is not None:
        secret = _read_key_file(settings.secret_key_file, "OTPGATE_SECRET_KEY_FILE")
    elif settings.env is Environment.PRODUCTION:
        raise ConfigurationError(
            "OTPGATE_SECRET_KEY (or OTPGATE_SECRET_KEY_FILE) is required when "
            "OTPGATE_ENV=production; development keys are refused in production"
        )
    else:
        secret = _development_key(settings.data_dir / DEV_KEY_FILE)
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(f"the secret key must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def _read_key_file(path: Path, setting: str) -> bytes:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigurationError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigurationError(f"{setting}: {path} must have mode 0600 (readable by owner)")
    return path.read_bytes().strip()


def _development_key(path: Path) -> bytes:
    if path.exists():
        return _read_key_file(path, "development key")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(48))
    log.warning("generated a development secret key at %s (never use it in production)", path)
    return path.read_bytes().strip()


def build_delivery(settings: Settings) -> Delivery:
    """The providers and routes of ``settings`` (``OTPGATE_CONFIG`` or the environment form);
    each provider's factory checks its own options (see ``adapters/providers/registry.py``)."""
    return load_delivery(settings)


def build_sender(settings: Settings) -> Sender:
    """The sender named by ``OTPGATE_SMS_PROVIDER``, made by the factory its provider module
    registered; the factory checks its own settings (see ``adapters/providers/registry.py``)."""
    return providers.create_sender(settings.sms_provider, settings)


def build_executor(settings: Settings) -> Executor:
    """SQLite through ``sqlite3`` on the event loop (the embedded default), or PostgreSQL
    through asyncpg; both run the same compiled statements (``adapters/storage``)."""
    url = settings.effective_database_url
    if is_sqlite(url):
        path = sqlite_file(url)
        if path is None:
            raise ConfigurationError(
                "OTPGATE_DATABASE_URL: in-memory SQLite keeps nothing; give a file"
            )
        return SqliteExecutor(path, lock_timeout_seconds=settings.database_timeout_seconds)
    return PostgresExecutor(
        url,
        schema=settings.database_schema,
        pool_size=settings.database_pool_size,
        timeout_seconds=settings.database_timeout_seconds,
    )


def build_storage(settings: Settings) -> Storage:
    return SqlStore(build_executor(settings))


def build_rate_limiter(settings: Settings) -> RateLimiter:
    """Rate-limit counters in Redis when ``OTPGATE_REDIS_URL`` is set (shared by every
    process that uses it), in this process otherwise."""
    url = settings.redis_url.get_secret_value()
    if not url:
        return LimitsRateLimiter.in_process()
    return LimitsRateLimiter.redis(
        url,
        key_prefix=settings.redis_key_prefix,
        timeout_seconds=settings.redis_timeout_seconds,
    )


@dataclass
class Container:
    """Everything a running otpgate needs, built once."""

    settings: Settings
    storage: Storage
    access: AccessService
    catalog: ServiceCatalog
    verifications: VerificationService
    fraud: FraudGuard
    billing: Billing
    messaging: Messaging
    outbound: OutboundHttp
    callbacks: CallbackSender
    dispatcher: Dispatcher
    receipts: ReceiptService
    idempotency: Idempotency
    metrics: PrometheusMetrics
    keys: Keys
    senders: dict[str, Sender]
    rate_limiter: RateLimiter
    events: WebhookEvents
    event_sender: EventSender
    event_log: EventLog
    webhook_secrets: WebhookSecrets
    audit: AuditLog
    receipt_parsers: dict[str, ReceiptParser] = field(default_factory=dict)

    def start_workers(self) -> None:
        """Run the delivery dispatcher, the callback sender and the webhook event sender in
        this process."""
        self.dispatcher.start()
        self.callbacks.start()
        self.event_sender.start()

    async def aclose(self) -> None:
        await self.dispatcher.stop()
        await self.callbacks.stop()
        await self.event_sender.stop()
        await self.receipts.aclose()
        for sender in self.senders.values():
            await sender.aclose()
        await self.outbound.aclose()
        await self.rate_limiter.aclose()
        await self.storage.aclose()


def build(
    settings: Settings,
    *,
    sender: Sender | None = None,
    route: Sequence[Sender] | None = None,
    clock: Clock | None = None,
    events: EventSink | None = None,
) -> Container:
    """Wire a container. Delivery is what the settings configure (``build_delivery``);
    ``sender`` replaces it with one provider (tests pass a recording one), and ``route`` with
    several on one default route, tried in that order (their names must differ). ``events``
    receives the events otpgate raises instead of the webhook outbox (tests pass a recording
    sink)."""
    clock = clock or SystemClock()
    given_events = events
    keys = derive_keys(load_master_secret(settings))
    vault = CodeVault(digest_key=keys.digest, sealing_key=keys.sealing)
    if sender is not None and route is not None:
        raise ValueError("pass either sender or route, not both")

    def seconds() -> float:
        # Circuit breakers read the same clock as the rest (tests move a frozen one).
        return clock.now().timestamp()

    if sender is not None or route is not None:
        chosen = [sender] if sender is not None else list(route or ())
        senders: dict[str, Sender] = {s.name: s for s in chosen}
        if not chosen or len(senders) != len(chosen):
            raise ConfigurationError("a delivery route needs providers with distinct names")
        routes: tuple[Route, ...] = (Route(frozenset(), tuple(senders)),)
        health = {
            name: ProviderHealth(name=name, type=name, breaker=CircuitBreaker(clock=seconds))
            for name in senders
        }
    else:
        delivery = build_delivery(settings)
        senders = {p.name: p.sender for p in delivery.providers}
        routes = delivery.routes
        health = {
            p.name: ProviderHealth(
                name=p.name,
                type=p.type,
                breaker=CircuitBreaker(
                    failure_threshold=p.options.failure_threshold,
                    cooloff_seconds=p.options.cooloff_seconds,
                    clock=seconds,
                ),
            )
            for p in delivery.providers
        }
    routing = Routing(routes, {name: s.channels for name, s in senders.items()})
    storage = build_storage(settings)
    metrics = PrometheusMetrics()
    audit = AuditLog(store=storage, clock=clock)
    box = SecretBox(keys.webhooks)
    outbound = outbound_from_settings(settings)
    event_sender = EventSender(
        store=storage, outbound=outbound, box=box, clock=clock, metrics=metrics
    )
    catalog = ServiceCatalog(
        storage=storage,
        clock=clock,
        cache=TtlCache(settings.lookup_cache_seconds),
        audit=audit,
    )
    webhook_events = WebhookEvents(
        store=storage, catalog=catalog, clock=clock, wake=event_sender.wake
    )
    events = given_events or webhook_events
    metrics.watch_circuits(lambda: [(name, CIRCUIT_GAUGE[h.state]) for name, h in health.items()])
    parsers: dict[str, ReceiptParser] = {
        name: s for name, s in senders.items() if isinstance(s, ReceiptParser)
    }
    receipt_urls = {
        name: f"{settings.public_url}/v1/receipts/{name}?token={keys.receipt_token(name)}"
        for name in parsers
    }
    billing = Billing(
        prices=storage,
        credit=storage,
        clock=clock,
        cache=TtlCache(settings.lookup_cache_seconds),
    )
    spend = SpendCaps(
        store=storage,
        events=events,
        clock=clock,
        metrics=metrics,
        default_units=settings.default_message_units,
    )
    dispatcher = Dispatcher(
        storage=storage,
        senders=senders,
        routing=routing,
        health=health,
        billing=billing,
        vault=vault,
        clock=clock,
        metrics=metrics,
        retry=RetryPolicy(
            max_attempts=settings.delivery_max_attempts,
            backoff_seconds=settings.delivery_backoff_seconds,
            backoff_max_seconds=settings.delivery_backoff_max_seconds,
            lease_seconds=settings.delivery_lease_seconds,
            send_timeout_seconds=settings.provider_timeout_seconds,
        ),
        receipt_urls=receipt_urls,
        events=events,
        spend=spend,
    )
    receipts = ReceiptService(storage=storage, clock=clock, metrics=metrics)
    for name, source in senders.items():
        if isinstance(source, ReportSource):
            source.report_to(functools.partial(receipts.record, name))
    rate_limiter = build_rate_limiter(settings)
    rate_limits = RateLimiting(
        limiter=rate_limiter,
        metrics=metrics,
        per_account=Limit(
            settings.rate_limit_per_account, settings.rate_limit_per_account_window_seconds
        ),
        checks=Limit(settings.rate_limit_checks, settings.rate_limit_checks_window_seconds),
        key=keys.rate_limits,
    )
    fraud = FraudGuard(
        store=storage,
        clock=clock,
        metrics=metrics,
        lists_cache=TtlCache(settings.lookup_cache_seconds),
        events=events,
        audit=audit,
    )
    verifications = VerificationService(
        storage=storage,
        catalog=catalog,
        vault=vault,
        clock=clock,
        metrics=metrics,
        channels_available=dispatcher.channels,
        lockout=LockoutPolicy(
            threshold=settings.lockout_threshold, seconds=settings.lockout_seconds
        ),
        outbox=dispatcher,
        billing=billing,
        spend=spend,
        rate_limits=rate_limits,
        events=events,
        audit=audit,
        fraud=fraud,
    )
    messaging = Messaging(
        messages=storage,
        billing=billing,
        clock=clock,
        metrics=metrics,
        outbox=dispatcher,
        fraud=fraud,
        spend=spend,
    )
    callbacks = CallbackSender(store=storage, outbound=outbound, clock=clock, metrics=metrics)
    return Container(
        settings=settings,
        storage=storage,
        access=AccessService(
            storage=storage,
            clock=clock,
            key_cache=TtlCache(settings.lookup_cache_seconds),
            audit=audit,
        ),
        catalog=catalog,
        verifications=verifications,
        fraud=fraud,
        billing=billing,
        messaging=messaging,
        outbound=outbound,
        callbacks=callbacks,
        dispatcher=dispatcher,
        receipts=receipts,
        idempotency=Idempotency(store=storage, clock=clock),
        metrics=metrics,
        keys=keys,
        senders=senders,
        rate_limiter=rate_limiter,
        events=webhook_events,
        event_sender=event_sender,
        event_log=EventLog(store=storage),
        webhook_secrets=WebhookSecrets(store=storage, box=box, clock=clock, audit=audit),
        audit=audit,
        receipt_parsers=parsers,
    )


async def prepare_database(settings: Settings) -> None:
    """Upgrade the schema when the database is the embedded SQLite (``serve`` does this by
    itself); PostgreSQL is upgraded explicitly with ``otpgate db upgrade``."""
    if is_sqlite(settings.effective_database_url):
        await upgrade(settings.effective_database_url, schema=settings.database_schema)
