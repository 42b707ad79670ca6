"""Delivery: the dispatcher that drains the outbox, and delivery receipts.

A request never waits for a provider. It commits the verification and its outbox row in one
transaction and hands it to :meth:`Dispatcher.queued`, already leased; a claim loop takes the rest
(retries, scale mode, leases left by a dead process) with a lease of its own,
renders each text from the sealed code and hands it to the route's sender. If the process dies
between claim and answer, the lease lapses and another dispatcher sends the row again: at most
once more, with the same code, because the code lives with the verification, not the message
(S22). Transient errors are retried with exponential backoff; permanent ones fail the message
at once (S23, DESIGN.md habit 5).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from otpgate.domain import policy as rules
from otpgate.domain import sms
from otpgate.domain.codes import CodeVault
from otpgate.domain.model import OutboundSms, VerificationStatus
from otpgate.domain.phone import mask
from otpgate.domain.ports import (
    ClaimedMessage,
    Clock,
    DeliveryReport,
    DeliveryStorage,
    MessageStore,
    Metrics,
    SmsSender,
)
from otpgate.errors import (
    PermanentDeliveryError,
    TransientDeliveryError,
    Unavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 5
    backoff_seconds: float = 2.0
    lease_seconds: int = 30
    #: The longest a provider call may take; a handed-off message is sent only while its lease
    #: has at least this long to run, so no lease can lapse during its send.
    send_timeout_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        """Exponential backoff with up to 25 % jitter, so retries of a burst spread out."""
        base = self.backoff_seconds * 2.0 ** max(0, attempt - 1)
        return base * (1 + secrets.randbelow(250) / 1000)


class Dispatcher:
    """Claims due outbox rows and sends them, up to ``concurrency`` at a time."""

    #: Pending verifications past their expiry are written ``expired`` this often (S2).
    HOUSEKEEPING_SECONDS = 30.0

    def __init__(
        self,
        *,
        storage: DeliveryStorage,
        senders: Mapping[str, SmsSender],
        route: tuple[str, ...],
        vault: CodeVault,
        clock: Clock,
        metrics: Metrics,
        retry: RetryPolicy,
        receipt_urls: Mapping[str, str],
        concurrency: int = 64,
        poll_seconds: float = 1.0,
    ) -> None:
        if not route or any(name not in senders for name in route):
            raise ValueError("every provider of the route needs a sender")
        self._storage = storage
        self._senders = senders
        self._route = route
        self._vault = vault
        self._clock = clock
        self._metrics = metrics
        self._retry = retry
        self._receipt_urls = receipt_urls
        self._concurrency = concurrency
        self._poll_seconds = poll_seconds
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._last_housekeeping = 0.0
        self._stopping = False
        self._handoffs: collections.deque[ClaimedMessage] = collections.deque()
        # Set when a claim filled every free slot, so rows may still be waiting: a finished
        # send must then wake the claim loop. Otherwise finishing sends wake nothing.
        self._claims_waiting = False

    # The handoff: a request that queues a message in this process gives it to this dispatcher
    # directly, already leased, so the SMS leaves right after the commit without a claim round
    # trip to storage. Should the process die first, the lease lapses and any dispatcher claims
    # the row as usual (S22).

    def lease_until(self, now: datetime) -> datetime | None:
        """The lease to write with a message queued now, when this dispatcher runs and will send
        it itself; None when it does not (scale mode: a worker process claims the row)."""
        if self._runner is None or self._stopping:
            return None
        return now + timedelta(seconds=self._retry.lease_seconds)

    def queued(self, item: ClaimedMessage | None = None) -> None:
        """A message was committed: send ``item`` (leased by :meth:`lease_until`) now, or with
        no item, wake the claim loop."""
        if item is None or item.lease_until is None:
            self._wake.set()
            return
        self._handoffs.append(item)
        self._pump()

    def _pump(self) -> None:
        now = self._clock.now()
        margin = timedelta(seconds=self._retry.send_timeout_seconds)
        while self._handoffs and len(self._inflight) < self._concurrency:
            item = self._handoffs.popleft()
            if item.lease_until is None or item.lease_until - now <= margin:
                continue  # waited too long here: its lease lapses and the claim loop takes it
            self._spawn(item)

    def _spawn(self, item: ClaimedMessage) -> None:
        task = asyncio.create_task(self.deliver(item))
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self.run_forever(), name="otpgate-dispatcher")

    async def stop(self) -> None:
        """Stop claiming and wait for the sends in flight to finish."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if loop.time() - self._last_housekeeping >= self.HOUSEKEEPING_SECONDS:
                    self._last_housekeeping = loop.time()
                    await self._housekeeping()
                self._wake.clear()
                if await self.dispatch_due() == 0 or len(self._inflight) >= self._concurrency:
                    await self._sleep()
            except asyncio.CancelledError:
                raise
            except Unavailable:
                log.warning("storage unavailable; dispatcher retries shortly")
                await asyncio.sleep(self._poll_seconds)
            except Exception:  # the loop must outlive any one bad row
                log.exception("dispatcher loop error")
                await asyncio.sleep(self._poll_seconds)

    async def _housekeeping(self) -> None:
        """Close what time has closed: expired verifications lose their sealed codes (S2), and
        idempotency keys past their 24 hours are forgotten."""
        now = self._clock.now()
        await self._storage.expire_due(now)
        await self._storage.forget_idempotency_keys(now)

    async def _sleep(self) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that arrives as the wake-up event fires, and the dispatcher would never stop.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._poll_seconds):
                await self._wake.wait()

    async def dispatch_due(self) -> int:
        """Claim what is due (within the free concurrency) and start sending it; returns how
        many were claimed."""
        free = self._concurrency - len(self._inflight)
        if free <= 0:
            return 0
        claimed = await self._storage.claim_due(
            now=self._clock.now(), lease_seconds=self._retry.lease_seconds, limit=free
        )
        self._claims_waiting = len(claimed) == free
        for item in claimed:
            self._spawn(item)
        return len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._handoffs and not self._stopping:
            self._pump()
        elif self._claims_waiting:
            self._wake.set()  # capacity is free again for rows the last claim had to leave

    async def drain(self) -> None:
        """Send everything due now and wait for it (for tests and the one-shot worker)."""
        while await self.dispatch_due() or self._inflight:
            if self._inflight:
                await asyncio.gather(*list(self._inflight), return_exceptions=True)

    async def deliver(self, item: ClaimedMessage) -> None:
        """Send one claimed message and record the outcome. Never raises."""
        message, verification, service = item.message, item.verification, item.service
        now = self._clock.now()
        provider = self._route[0]
        try:
            if verification is None or service is None or verification.code_sealed is None:
                await self._storage.mark_failed(
                    message.id, provider=None, now=now, error="verification closed before sending"
                )
                return
            if verification.status_at(now) is VerificationStatus.EXPIRED:
                await self._storage.close(verification.id, VerificationStatus.EXPIRED, now)
                await self._storage.mark_failed(
                    message.id, provider=None, now=now, error="verification expired before sending"
                )
                return
            try:
                code = self._vault.unseal(verification.id, verification.code_sealed)
            except ValueError:  # sealed under another master key: it can never be sent
                await self._fail(item, provider, "sealed code does not authenticate")
                return
            text = rules.compose_sms(
                service.policy, code=code, locale=message.locale, context=verification.context
            )
            shape = sms.measure(text)
            outbound = OutboundSms(
                message_id=message.id,
                to=message.to,
                text=text,
                sender_id=service.policy.sender_id,
                encoding=shape.encoding,
                segments=shape.segments,
                receipt_url=self._receipt_urls.get(provider),
            )
            sender = self._senders[provider]
            try:
                receipt = await sender.send(outbound)
            except PermanentDeliveryError as exc:
                await self._fail(item, provider, str(exc))
            except TransientDeliveryError as exc:
                await self._retry_or_fail(item, provider, str(exc))
            except Exception as exc:  # an adapter bug must not lose the message: retry it
                log.exception("sender %s raised an unexpected error", provider)
                await self._retry_or_fail(item, provider, f"unexpected: {type(exc).__name__}")
            else:
                await self._storage.mark_sent(
                    message.id, provider=provider, receipt=receipt, now=self._clock.now()
                )
                self._metrics.count("message_sent", provider=provider)
                log.info(
                    "message sent",
                    extra={"message_id": message.id, "to": mask(message.to), "provider": provider},
                )
        except Unavailable:
            # The lease lapses and the row is claimed again once storage is back.
            log.warning("storage unavailable while delivering", extra={"message_id": message.id})
        except Exception:
            log.exception("delivery of %s failed unexpectedly", message.id)

    async def _retry_or_fail(self, item: ClaimedMessage, provider: str, error: str) -> None:
        attempt = item.message.attempts  # the claim already counted this attempt
        if attempt >= self._retry.max_attempts:
            await self._fail(item, provider, f"gave up after {attempt} attempts: {error}")
            return
        now = self._clock.now()
        retry_at = now + timedelta(seconds=self._retry.delay(attempt))
        await self._storage.mark_retry(
            item.message.id, provider=provider, error=error, next_attempt_at=retry_at, now=now
        )
        self._metrics.count("message_retry", provider=provider)
        log.warning(
            "transient delivery error; will retry",
            extra={
                "message_id": item.message.id,
                "provider": provider,
                "error": error,
                "attempt": attempt,
            },
        )

    async def _fail(self, item: ClaimedMessage, provider: str, error: str) -> None:
        failed = await self._storage.mark_failed(
            item.message.id, provider=provider, error=error, now=self._clock.now()
        )
        self._metrics.count("message_failed", provider=provider)
        log.warning(
            "message failed",
            extra={"message_id": item.message.id, "provider": provider, "error": error},
        )
        if failed is not None:
            self._metrics.count("verification_failed")


class ReceiptService:
    """Applies authenticated delivery reports to messages (API.md §6)."""

    def __init__(self, *, storage: MessageStore, clock: Clock, metrics: Metrics) -> None:
        self._storage = storage
        self._clock = clock
        self._metrics = metrics

    async def record(self, provider: str, report: DeliveryReport | None) -> bool:
        """True when the report named a known message; unknown ones are ignored."""
        if report is None:
            return False
        known = await self._storage.apply_report(provider, report, self._clock.now())
        if known and report.status is not None:
            self._metrics.count("receipt", provider=provider, status=report.status.value)
        return known
