"""Events for a service's webhook: the sink the use cases emit to, the delivery loop, the
signing secrets, and the list of what was sent (``GET /v1/events``).

**Emitting.** :class:`WebhookEvents` is the ``EventSink``: an event of a service with a
``webhook_url`` becomes one row of the events outbox (``domain.events.EventRecord``); an event
of a service without one, or with no service, is dropped before any write, so the hot path of
a service without a webhook pays one in-process cache lookup. Delivery reports write their
event in the report's own transaction (``MessageStore.apply_report``); the verification events
are emitted right after the state change commits, so a crash in between loses that one event
(the verification itself is consistent, and ``GET /v1/verifications/{id}`` tells its state).

**Delivering.** :class:`EventSender` claims due rows with a lease, as the message dispatcher
does, and POSTs ``{"type", "timestamp", "data"}`` through the ``Outbound`` port (which refuses
loopback, private and metadata addresses in production, and never follows a redirect), signed
as Standard Webhooks defines it with the service's secret. A 2xx answer settles it; anything
else is retried with capped exponential backoff (5 s doubling to 10 min, with jitter) for a
day, always with the same ``webhook-id``, then given up (``failed``). An address that can
never be called is given up at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

from otpgate.domain.events import (
    EVENT_TYPES,
    EventRecord,
    SecretBox,
    body_of,
    new_signing_secret,
    record_of,
    signed_headers,
)
from otpgate.domain.model import Principal
from otpgate.domain.ports import (
    AuditEntry,
    AuditTrail,
    ClaimedEvent,
    Clock,
    Event,
    EventStore,
    Metrics,
    NoAudit,
    Outbound,
    Page,
)
from otpgate.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    OutboundError,
    OutboundRefused,
)
from otpgate.services.callbacks import CallbackPolicy
from otpgate.services.catalog import ServiceCatalog
from otpgate.services.polling import PollingSender

log = logging.getLogger(__name__)

#: Retries: 5 s doubling to 10 min, for a day (the callback policy's figures).
EventPolicy = CallbackPolicy


class WebhookEvents:
    """The ``EventSink``: queues an event for its service's webhook, if it has one."""

    def __init__(
        self,
        *,
        store: EventStore,
        catalog: ServiceCatalog,
        clock: Clock,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._clock = clock
        self._wake = wake

    async def emit(self, event: Event) -> None:
        if event.service_id is None:
            return
        service = await self._catalog.lookup(event.account_id, event.service_id)
        url = None if service is None else service.policy.webhook_url
        if not url:
            return
        await self._store.insert_event(record_of(event, url, self._clock.now()))
        if self._wake is not None:
            self._wake()


class WebhookSecrets:
    """Issues the services' signing secrets (shown once), sealed at rest."""

    def __init__(
        self, *, store: EventStore, box: SecretBox, clock: Clock, audit: AuditTrail | None = None
    ) -> None:
        self._store = store
        self._box = box
        self._clock = clock
        self._audit: AuditTrail = audit or NoAudit()

    async def issue(self, principal: Principal, service_id: str, *, rotated: bool = True) -> str:
        """A new signing secret for the principal's service, replacing any other at once;
        ``NotFound`` when there is no such service. The audit trail records that it changed,
        never the secret."""
        secret = new_signing_secret()
        sealed = self._box.seal(service_id, secret)
        if not await self._store.set_webhook_secret(
            principal.account.id, service_id, sealed, self._clock.now()
        ):
            raise NotFound("no such service")
        if rotated:
            await self._audit.record(
                AuditEntry(
                    account_id=principal.account.id,
                    actor=principal.key_id,
                    action="service.webhook_secret_rotated",
                    target=service_id,
                )
            )
        return secret


class EventLog:
    """What was sent to webhooks, and how its delivery went (``GET /v1/events``)."""

    def __init__(self, *, store: EventStore) -> None:
        self._store = store

    async def list(
        self,
        principal: Principal,
        *,
        account_id: str | None,
        service_id: str | None,
        type: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[EventRecord]:
        """The events the principal may see (:func:`scope`), newest first."""
        if type is not None and type not in EVENT_TYPES:
            raise InvalidRequest("unknown event type", param="type")
        return await self._store.list_events(
            scope(principal, account_id),
            service_id=service_id,
            type=type,
            limit=limit,
            cursor=cursor,
        )


def scope(principal: Principal, account_id: str | None) -> str | None:
    """The account a listing covers: an account key sees its own account only; an admin key
    sees every account's, or the one it names (``None``: every account)."""
    if principal.account.is_admin:
        return account_id
    if account_id is not None and account_id != principal.account.id:
        raise Forbidden("only an admin account's key may read another account's records")
    return principal.account.id


class EventSender(PollingSender):
    """Claims due events and posts them, up to ``concurrency`` at a time."""

    task_name = "otpgate-events"
    what = "webhook deliveries"

    def __init__(
        self,
        *,
        store: EventStore,
        outbound: Outbound,
        box: SecretBox,
        clock: Clock,
        metrics: Metrics,
        policy: CallbackPolicy | None = None,
        concurrency: int = 16,
        poll_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._outbound = outbound
        self._box = box
        self._clock = clock
        self._metrics = metrics
        self._policy = policy or EventPolicy()
        self._concurrency = concurrency
        super().__init__(poll_seconds=poll_seconds)

    async def send_due(self) -> int:
        """Claim what is due and post it; how many were claimed."""
        claimed = await self._store.claim_events(
            now=self._clock.now(), lease_seconds=self._policy.lease_seconds, limit=self._concurrency
        )
        if claimed:
            await asyncio.gather(*(self._post(item) for item in claimed))
        return len(claimed)

    async def drain(self) -> None:
        """Post everything due now (tests, and the one-shot worker)."""
        while await self.send_due():
            pass

    async def _post(self, item: ClaimedEvent) -> None:
        record = item.record
        if item.sealed_secret is None or record.service_id is None:
            await self._later(
                record, "the service has no signing secret: issue one (webhook-secret)"
            )
            return
        try:
            secret = self._box.open(record.service_id, item.sealed_secret)
        except ValueError:
            await self._later(record, "the signing secret does not open (master key changed?)")
            return
        body = body_of(record)
        try:
            await self._outbound.post(
                record.url, body, signed_headers(record, body, secret, self._clock.now())
            )
        except OutboundRefused as exc:
            await self._settle(record, delivered=False, error=str(exc))
        except OutboundError as exc:
            await self._later(record, str(exc))
        except Exception as exc:  # an adapter bug must not lose the event: retry it
            log.exception("event %s raised an unexpected error", record.id)
            await self._later(record, f"unexpected: {type(exc).__name__}")
        else:
            await self._settle(record, delivered=True, error=None)

    async def _settle(self, record: EventRecord, *, delivered: bool, error: str | None) -> None:
        await self._store.finish_event(
            record.id, delivered=delivered, error=error, now=self._clock.now()
        )
        self._metrics.count("webhook", result="delivered" if delivered else "given_up")
        if not delivered:
            log.warning("webhook event given up", extra={"event_id": record.id, "error": error})

    async def _later(self, record: EventRecord, error: str) -> None:
        now = self._clock.now()
        retry_at = now + timedelta(seconds=self._policy.delay(record.attempts))
        if retry_at - record.created_at > self._policy.give_up_after:
            await self._settle(record, delivered=False, error=f"gave up: {error}")
            return
        await self._store.retry_event(record.id, error=error, next_attempt_at=retry_at, now=now)
        self._metrics.count("webhook", result="retry")
        log.info(
            "webhook event will be retried",
            extra={"event_id": record.id, "attempt": record.attempts, "error": error},
        )
