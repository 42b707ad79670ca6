"""Delivery: the dispatcher that drains the outbox, and delivery receipts.

A request never waits for a provider. It commits the verification and its outbox row in one
transaction and hands it to :meth:`Dispatcher.queued`, already leased; a claim loop takes the rest
(retries, scale mode, leases left by a dead process) with a lease of its own, renders each text
from the sealed code and hands it to a sender of the route. If the process dies between claim and
answer, the lease lapses and another dispatcher sends the row again: at most once more, with the
same code, because the code lives with the verification, not the message (S22).

The rules of an attempt, in the order they apply:

* **Route.** The dispatcher walks an ordered route of providers. A fresh message goes to the first
  provider that carries its channel; after a transient error or a timeout, the next attempt goes to
  the next such provider of the route, wrapping around to the first. Moving on to a later provider
  is immediate; coming back round waits for the backoff. A permanent error fails the message.
* **Retry until expiry.** A verification's message is retried, with capped exponential backoff,
  for as long as the verification can be approved: it fails only when the next attempt would come
  at or after ``expires_at``. A message without a verification has no expiry; it makes at most
  ``RetryPolicy.max_attempts`` attempts.
* **Unknown outcome.** A send that got no answer (:class:`~otpgate.errors.DeliveryTimeout`, or
  the dispatcher's own limit) may have gone out. Each provider gets at most
  :data:`MAX_UNANSWERED_SENDS` such sends of one message, i.e. one more after the first; then the
  route goes on without it, and with no provider left the message fails rather than risk more
  copies of the code. The count is kept with the message (in its stored error text, see
  :func:`unanswered_sends`), so it holds across claims, processes and restarts.
* **Sent is sent.** Once a provider accepted a message, this process never hands it to a sender
  again, even while storage refuses to record it: the sent-mark is kept in memory and retried
  with backoff until storage takes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from otpgate.domain import policy as rules
from otpgate.domain import sms
from otpgate.domain.codes import CodeVault
from otpgate.domain.events import VERIFICATION_FAILED, verification_event
from otpgate.domain.model import (
    AttemptOutcome,
    Channel,
    Message,
    OutboundMessage,
    SendReceipt,
    Service,
    SmsContent,
    Verification,
    VerificationStatus,
    new_id,
)
from otpgate.domain.phone import country_of, mask
from otpgate.domain.ports import (
    ClaimedMessage,
    Clock,
    DeliveryReport,
    DeliveryStorage,
    EventSink,
    MessageStore,
    Metrics,
    NoEvents,
    Sender,
)
from otpgate.domain.routing import CircuitBreaker, ProviderHealth, Routing
from otpgate.domain.spend import SpendCap
from otpgate.errors import (
    CountryNotAllowed,
    DeliveryTimeout,
    InsufficientCredit,
    NotConnected,
    PermanentDeliveryError,
    SpendCapReached,
    TransientDeliveryError,
    Unavailable,
)
from otpgate.services.billing import Billing
from otpgate.services.spend import SpendCaps

log = logging.getLogger(__name__)

#: Sends of one message a provider may leave unanswered before the route goes on without it: a
#: timed-out send may have gone out, so it is sent at most once more through the same provider.
MAX_UNANSWERED_SENDS = 2

#: Timed fallbacks moved per round of the dispatcher loop.
FALLBACK_BATCH = 50


def _address(verification: Verification, channel: Channel) -> str | None:
    """Where ``channel`` reaches the verification's user: its number for SMS and calls, the
    e-mail address it was started with (or given as ``email``) for e-mail."""
    is_email = "@" in verification.to
    if channel is Channel.EMAIL:
        return verification.to if is_email else verification.fallback_email
    return None if is_email else verification.to


#: The longest error text a message keeps (the size of its stored column).
MAX_ERROR_LENGTH = 500

#: How much longer than its own timeout a sender may take before the dispatcher gives up on it;
#: a sender that ignores its timeout must not hold a send slot, or outlast its lease, forever.
SEND_GRACE_SECONDS = 1.0

#: A send is abandoned this long before its lease lapses, leaving time to record the outcome
#: (as unanswered) before another dispatcher may claim the message.
LEASE_MARGIN_SECONDS = 0.5

#: The channels whose text the dispatcher can compose (``domain.policy.compose``).
COMPOSED_CHANNELS = frozenset(Channel)

# The tally of unanswered sends, at the end of a message's error text: " [unanswered: a=1, b=2]".
# It must outlive this process (another worker claims the next attempt, or a restart does), and
# the error text is the one free-form field the outbox row has; a column of its own would be
# cleaner once the storage port offers one.
_TALLY = re.compile(r" \[unanswered: ([a-z][a-z0-9_-]*=[0-9]+(?:, [a-z][a-z0-9_-]*=[0-9]+)*)\]\Z")


def unanswered_sends(error: str | None) -> dict[str, int]:
    """The unanswered sends per provider recorded in a message's error text by
    :func:`with_unanswered` (empty when there is none).

    >>> unanswered_sends("labsmobile: server error (HTTP 503) [unanswered: labsmobile=1]")
    {'labsmobile': 1}
    >>> unanswered_sends("labsmobile: server error (HTTP 503)")
    {}
    """
    match = _TALLY.search(error or "")
    if match is None:
        return {}
    pairs = (item.split("=") for item in match.group(1).split(", "))
    return {name: int(count) for name, count in pairs}


def with_unanswered(error: str, tally: Mapping[str, int]) -> str:
    """``error`` with the tally of unanswered sends appended, shortened so that the whole fits
    :data:`MAX_ERROR_LENGTH` with the tally intact.

    >>> with_unanswered("no answer within the timeout", {"labsmobile": 1})
    'no answer within the timeout [unanswered: labsmobile=1]'
    """
    error = _TALLY.sub("", error)
    if not tally:
        return error[:MAX_ERROR_LENGTH]
    suffix = " [unanswered: " + ", ".join(f"{k}={v}" for k, v in sorted(tally.items())) + "]"
    return error[: MAX_ERROR_LENGTH - len(suffix)] + suffix


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    #: Attempts of a message without a verification (no expiry bounds it) before it fails.
    max_attempts: int = 5
    #: The first wait; it doubles per round of the route, up to ``backoff_max_seconds``.
    backoff_seconds: float = 2.0
    backoff_max_seconds: float = 30.0
    lease_seconds: int = 30
    #: The longest a provider call may take; a handed-off message is sent only while its lease
    #: has at least this long to run, so no lease can lapse during its send.
    send_timeout_seconds: float = 10.0

    def delay(self, rounds: int) -> float:
        """The wait after round ``rounds`` (from 1) of the route: ``backoff · 2^(rounds−1)``, at
        most the cap, plus up to 25 % jitter so that the retries of a burst spread out."""
        exponent = min(max(0, rounds - 1), 64)  # 2.0 ** a few thousand would overflow
        step = min(self.backoff_max_seconds, self.backoff_seconds * 2.0**exponent)
        return step * (1 + secrets.randbelow(250) / 1000)

    def next_attempt_at(
        self,
        now: datetime,
        *,
        attempt: int,
        rounds: int,
        at_once: bool,
        expires_at: datetime | None,
    ) -> datetime | None:
        """When to make the next attempt after attempt number ``attempt`` failed transiently,
        or None to give up.

        ``at_once`` (the next provider comes later in the route) means now; otherwise after
        :meth:`delay` of ``rounds``. A verification's message (``expires_at`` set) gives up
        only when that time would be at or after ``expires_at``: a code that arrives later can
        no longer be approved. A message without one gives up after ``max_attempts``."""
        if expires_at is None and attempt >= self.max_attempts:
            return None
        retry_at = now if at_once else now + timedelta(seconds=self.delay(rounds))
        if expires_at is not None and retry_at >= expires_at:
            return None
        return retry_at


@dataclass(slots=True)
class _SentMark:
    """A send the provider accepted and storage has not recorded yet."""

    message_id: str
    provider: str
    receipt: SendReceipt
    sent_at: datetime


class Dispatcher:
    """Claims due outbox rows and sends them through their route, up to ``concurrency`` at a
    time.

    ``routing`` says which providers may carry a message, in order (by destination country and
    channel); ``senders`` holds a sender for each provider it names, and ``health`` a breaker
    and counters for each (made with default breakers when not given). ``channels`` is what the
    dispatcher can deliver.
    """

    #: Pending verifications past their expiry are written ``expired`` this often (S2).
    HOUSEKEEPING_SECONDS = 30.0

    def __init__(
        self,
        *,
        storage: DeliveryStorage,
        senders: Mapping[str, Sender],
        routing: Routing,
        vault: CodeVault,
        clock: Clock,
        metrics: Metrics,
        retry: RetryPolicy,
        receipt_urls: Mapping[str, str],
        concurrency: int = 64,
        poll_seconds: float = 1.0,
        health: Mapping[str, ProviderHealth] | None = None,
        billing: Billing | None = None,
        events: EventSink | None = None,
        spend: SpendCaps | None = None,
    ) -> None:
        if not routing.providers or any(name not in senders for name in routing.providers):
            raise ValueError("every provider of the routes needs a sender")
        self._storage = storage
        self._senders = senders
        self._routing = routing
        self._billing = billing
        self._events: EventSink = events or NoEvents()
        self._spend = spend
        self.health: dict[str, ProviderHealth] = dict(health or {}) or {
            name: ProviderHealth(name=name, type=name, breaker=CircuitBreaker(clock=self._seconds))
            for name in routing.providers
        }
        if set(self.health) != set(routing.providers):
            raise ValueError("health must cover exactly the providers of the routes")
        self._vault = vault
        self._clock = clock
        self._metrics = metrics
        self._retry = retry
        self._receipt_urls = receipt_urls
        self._concurrency = concurrency
        self._poll_seconds = poll_seconds
        self.channels: frozenset[Channel] = COMPOSED_CHANNELS & routing.channels
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._last_housekeeping = 0.0
        self._last_fallback_scan = 0.0
        self._stopping = False
        self._handoffs: collections.deque[ClaimedMessage] = collections.deque()
        # Set when a claim filled every free slot, so rows may still be waiting: a finished
        # send must then wake the claim loop. Otherwise finishing sends wake nothing.
        self._claims_waiting = False
        # Accepted by a provider, not yet recorded by storage: never sent again from here.
        self._unrecorded: dict[str, _SentMark] = {}
        self._recorder: asyncio.Task[None] | None = None

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
        if item.message.id in self._unrecorded:
            # A provider accepted it already; only storage does not know yet. The recorder
            # writes it as sent (which also ends this claim's lease).
            log.info("message already sent, not sent again", extra={"message_id": item.message.id})
            return
        task = asyncio.create_task(self.deliver(item))
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self.run_forever(), name="otpgate-dispatcher")

    async def stop(self) -> None:
        """Stop claiming, wait for the sends in flight to finish, and try once more to record
        the sends storage has not taken yet (what is still left then is logged by id)."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
            self._recorder = None
        await self.record_sent_marks()
        if self._unrecorded:
            log.error(
                "stopping with sends storage has not recorded; they will be sent again",
                extra={"message_ids": sorted(self._unrecorded)},
            )

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                if loop.time() - self._last_housekeeping >= self.HOUSEKEEPING_SECONDS:
                    self._last_housekeeping = loop.time()
                    await self._housekeeping()
                self._wake.clear()
                # Timed fallbacks are looked for once per poll interval, not on every wake-up
                # of a busy claim loop: a fallback is due to the second, not the millisecond.
                if loop.time() - self._last_fallback_scan >= self._poll_seconds:
                    self._last_fallback_scan = loop.time()
                    await self.fallbacks_due()
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
        """Send everything due now and wait for it (for tests and the one-shot worker). Sends
        that storage has not recorded yet are tried once before and once after, with no wait."""
        await self.record_sent_marks()
        await self.fallbacks_due()
        while await self.dispatch_due() or self._inflight:
            if self._inflight:
                await asyncio.gather(*list(self._inflight), return_exceptions=True)
        await self.record_sent_marks()

    @property
    def unrecorded_sends(self) -> frozenset[str]:
        """Ids of messages a provider accepted and storage has not recorded yet."""
        return frozenset(self._unrecorded)

    # --- one attempt -------------------------------------------------------------------------

    async def deliver(self, item: ClaimedMessage) -> None:
        """Send one claimed message through the provider whose turn it is, and record the
        outcome. Never raises."""
        message, verification, service = item.message, item.verification, item.service
        now = self._clock.now()
        try:
            # A plain SMS is sent as it was stored; a code message is rendered from its sealed
            # code, and only while its verification can still use it.
            plain = verification is None and item.body is not None
            if not plain and (
                verification is None or service is None or verification.code_sealed is None
            ):
                await self._storage.mark_failed(
                    message.id,
                    provider=None,
                    now=now,
                    error="verification closed before sending",
                    lease_until=item.lease_until,
                )
                return
            if (
                verification is not None
                and verification.status_at(now) is VerificationStatus.EXPIRED
            ):
                await self._storage.close(verification.id, VerificationStatus.EXPIRED, now)
                await self._storage.mark_failed(
                    message.id,
                    provider=None,
                    now=now,
                    error="verification expired before sending",
                    lease_until=item.lease_until,
                )
                return
            tally = unanswered_sends(message.error)
            order = self._order(item)
            candidates = self._rotation(order, message.provider, tally)
            if not candidates:
                await self._fail(
                    item,
                    message.provider,
                    with_unanswered(
                        f"no provider of the route can take this {message.channel.value} "
                        "message any more"
                        if order
                        else f"no route carries {message.channel.value} to this destination",
                        tally,
                    ),
                )
                return
            provider = next((name for name in candidates if self._admits(name)), None)
            if provider is None:
                await self._rest(item, candidates, tally)
                return
            if plain:
                assert item.body is not None
                composed = rules.Composed(item.body, item.body)
                sender_id = message.sender_id
            else:
                assert verification is not None and verification.code_sealed is not None
                assert service is not None
                try:
                    code = self._vault.unseal(verification.id, verification.code_sealed)
                except ValueError:  # sealed under another master key: it can never be sent
                    await self._fail(item, provider, "sealed code does not authenticate")
                    return
                policy = rules.effective_policy(
                    service.policy, template=verification.template, sender_id=verification.sender_id
                )
                composed = rules.compose(
                    policy,
                    message.channel,
                    code=code,
                    locale=message.locale,
                    context=verification.context,
                )
                sender_id = policy.sender_id
            await self._send(item, provider, self._outbound(item, provider, composed, sender_id))
        except Unavailable:
            # The lease lapses and the row is claimed again once storage is back.
            log.warning("storage unavailable while delivering", extra={"message_id": message.id})
        except Exception:
            log.exception("delivery of %s failed unexpectedly", message.id)

    def _outbound(
        self, item: ClaimedMessage, provider: str, composed: rules.Composed, sender_id: str | None
    ) -> OutboundMessage:
        message = item.message
        content = None
        if message.channel is Channel.SMS:
            shape = sms.measure(composed.text)
            content = SmsContent(
                sender_id=sender_id, encoding=shape.encoding, segments=shape.segments
            )
        return OutboundMessage(
            message_id=message.id,
            channel=message.channel,
            to=message.to,
            text=composed.text,
            receipt_url=self._receipt_urls.get(provider),
            sms=content,
            locale=message.locale,
            email=composed.email,
        )

    async def _send(self, item: ClaimedMessage, provider: str, outbound: OutboundMessage) -> None:
        sender = self._senders[provider]
        limit = self._retry.send_timeout_seconds + SEND_GRACE_SECONDS
        if item.lease_until is not None:
            # Never past the lease: once it lapses another dispatcher may claim the row, and a
            # send still running here would be a second copy in flight whose outcome overwrites
            # the other's (the unanswered tally, the lease itself).
            left = (item.lease_until - self._clock.now()).total_seconds()
            limit = min(limit, left - LEASE_MARGIN_SECONDS)
            if limit <= 0:
                self.health[provider].breaker.release_trial()  # not sent: no outcome to judge
                log.warning(
                    "lease too short to send; left to lapse",
                    extra={"message_id": item.message.id, "provider": provider},
                )
                return
        try:
            async with asyncio.timeout(limit):
                receipt = await sender.send(outbound)
        except PermanentDeliveryError as exc:
            self._judge(provider, str(exc), counts_against=False)
            await self._fail(item, provider, str(exc))
        except DeliveryTimeout as exc:
            self._judge(provider, str(exc))
            await self._after_unanswered(item, provider, str(exc))
        except TimeoutError:  # the sender overran its own timeout: same unknown outcome
            error = f"{provider}: no answer within {round(limit, 1)} s"
            self._judge(provider, error)
            await self._after_unanswered(item, provider, error)
        except NotConnected as exc:
            # Nothing was attempted: the attempt is not counted against the message.
            self._judge(provider, str(exc))
            await self._after_transient(item, provider, str(exc), counted=False)
        except TransientDeliveryError as exc:
            self._judge(provider, str(exc))
            await self._after_transient(item, provider, str(exc))
        except Exception as exc:  # an adapter bug must not lose the message: retry it
            log.exception("sender %s raised an unexpected error", provider)
            error = f"unexpected: {type(exc).__name__}"
            self._judge(provider, error)
            await self._after_transient(item, provider, error)
        else:
            self._judge(provider, None)
            self._metrics.count("message_sent", provider=provider)
            log.info(
                "message sent",
                extra={
                    "message_id": item.message.id,
                    "to": mask(item.message.to),
                    "provider": provider,
                },
            )
            mark = _SentMark(item.message.id, provider, receipt, self._clock.now())
            await self._record_sent(mark)

    # --- the route ---------------------------------------------------------------------------

    def _seconds(self) -> float:
        return self._clock.now().timestamp()

    def _judge(self, provider: str, error: str | None, *, counts_against: bool = True) -> None:
        """Record a send's outcome on the provider's health: ``error`` None for a success. A
        refusal of one message (``counts_against`` false) says nothing about the provider, so
        it leaves the breaker alone."""
        health = self.health[provider]
        if error is None:
            health.sent += 1
            health.breaker.succeeded()
            return
        health.failed += 1
        health.last_error = error[:MAX_ERROR_LENGTH]
        if counts_against:
            before = health.breaker.state
            health.breaker.failed()
            if health.breaker.state is not before:
                log.warning(
                    "provider circuit %s", health.breaker.state.value, extra={"provider": provider}
                )
        else:
            health.breaker.release_trial()

    def _order(self, item: ClaimedMessage) -> tuple[str, ...]:
        """The providers of the message's route that carry its channel, in order."""
        message = item.message
        country = None if message.channel is Channel.EMAIL else country_of(message.to)
        return self._routing.providers_for(country, message.channel)

    @staticmethod
    def _rotation(order: tuple[str, ...], last: str | None, tally: Mapping[str, int]) -> list[str]:
        """The providers to try next, in turn: for a message no provider has failed yet
        (``last`` is None, or not in the route any more), the route from its start; after a
        failure on ``last``, from the one after it, wrapping around (so ``last`` comes last).
        Providers that left this message unanswered twice are left out."""
        usable = [name for name in order if tally.get(name, 0) < MAX_UNANSWERED_SENDS]
        if last is None or last not in order:
            return usable
        start = order.index(last) + 1
        rotated = order[start:] + order[:start]
        return [name for name in rotated if name in usable]

    def _admits(self, provider: str) -> bool:
        """Whether the provider's circuit lets a send through now."""
        return self.health[provider].breaker.allows()

    async def _rest(
        self, item: ClaimedMessage, candidates: list[str], tally: dict[str, int]
    ) -> None:
        """Every provider that could take the message is resting (open circuits): try again
        when the first of them lets a trial through, without counting it against any of them
        (unless the verification expires first)."""
        message, verification = item.message, item.verification
        now = self._clock.now()
        wait = min(self.health[name].breaker.resting_for() for name in candidates)
        retry_at = now + timedelta(seconds=max(wait, self._poll_seconds))
        error = with_unanswered(
            f"every provider of the route is resting after failures: {', '.join(candidates)}",
            tally,
        )
        if verification is not None and retry_at >= verification.expires_at:
            await self._fail(item, message.provider, error)
            return
        await self._storage.mark_retry(
            message.id,
            provider=message.provider,
            error=error,
            next_attempt_at=retry_at,
            now=now,
            counted=False,  # nothing was attempted
            lease_until=item.lease_until,
        )
        self._metrics.count("message_retry", provider="none")

    async def _after_unanswered(self, item: ClaimedMessage, provider: str, error: str) -> None:
        self._metrics.count("message_send_timeout", provider=provider)
        tally = unanswered_sends(item.message.error)
        tally[provider] = tally.get(provider, 0) + 1
        await self._after_transient(item, provider, error, tally=tally)

    async def _after_transient(
        self,
        item: ClaimedMessage,
        provider: str,
        error: str,
        *,
        tally: dict[str, int] | None = None,
        counted: bool = True,
    ) -> None:
        """Schedule the next attempt on the provider whose turn it is, or fail the message when
        there is none, when a message without a verification used its attempts, or when its
        verification expires before the next attempt could be made."""
        message, verification = item.message, item.verification
        unanswered = tally is not None
        if tally is None:
            tally = unanswered_sends(message.error)
        detail = with_unanswered(error, tally)
        order = self._order(item)
        following_ones = self._rotation(order, provider, tally)
        following = following_ones[0] if following_ones else None
        if following is None:
            await self._fail(
                item,
                provider,
                with_unanswered(
                    "not sent again: every provider of the route left it unanswered twice "
                    f"and may have sent it; last: {error}",
                    tally,
                ),
            )
            return
        # The claim (or handoff) already counted this attempt, unless it is taken back.
        attempt = message.attempts if counted else message.attempts - 1
        expires_at = verification.expires_at if verification is not None else None
        now = self._clock.now()
        retry_at = self._retry.next_attempt_at(
            now,
            attempt=attempt,
            rounds=math.ceil(attempt / max(1, len(order))),
            at_once=provider in order and order.index(following) > order.index(provider),
            expires_at=expires_at,
        )
        if retry_at is None:
            reason = (
                f"gave up after {attempt} attempts"
                if expires_at is None
                else "gave up: the verification expires before the next attempt"
            )
            await self._fail(item, provider, with_unanswered(f"{reason}: {error}", tally))
            return
        delay = (retry_at - now).total_seconds()
        await self._storage.mark_retry(
            message.id,
            provider=provider,
            error=detail,
            next_attempt_at=retry_at,
            now=now,
            outcome=AttemptOutcome.UNANSWERED if unanswered else AttemptOutcome.RETRY,
            counted=counted,
            lease_until=item.lease_until,
        )
        self._metrics.count("message_retry", provider=provider)
        log.warning(
            "transient delivery error; will retry",
            extra={
                "message_id": message.id,
                "provider": provider,
                "next_provider": following,
                "error": error,
                "attempt": attempt,
                "retry_in_seconds": round(delay, 3),
            },
        )
        if retry_at <= now:
            self._wake.set()

    async def _fail(self, item: ClaimedMessage, provider: str | None, error: str) -> None:
        """Fail the message for good; a verification's code first moves to the service's next
        channel, if one can carry it, so the verification lives on."""
        if item.verification is not None and item.service is not None:
            await self._fall_back(item.verification, item.service, after=item.message.channel)
        failed = await self._storage.mark_failed(
            item.message.id,
            provider=provider,
            error=error,
            now=self._clock.now(),
            lease_until=item.lease_until,
        )
        self._metrics.count("message_failed", provider=provider or "none")
        log.warning(
            "message failed",
            extra={"message_id": item.message.id, "provider": provider, "error": error},
        )
        if failed is not None:
            self._metrics.count("verification_failed")
            # After the commit, as the verification events are (services/events.py).
            try:
                await self._events.emit(verification_event(VERIFICATION_FAILED, failed))
            except Unavailable:  # the failure stands; only its event is lost
                log.warning("event lost: storage unavailable", extra={"event_type": "failed"})

    # --- channel fallback ------------------------------------------------------------------

    async def fallbacks_due(self) -> int:
        """Move every verification whose timed fallback is due (no check arrived within the
        service's ``fallback_after_seconds``) to its next channel; returns how many moved."""
        now = self._clock.now()
        moved = 0
        for verification in await self._storage.fallback_due(now, limit=FALLBACK_BATCH):
            service = await self._storage.get_service(
                verification.account_id, verification.service_id
            )
            if service is not None and await self._fall_back(
                verification, service, after=verification.channel
            ):
                moved += 1
            else:
                await self._storage.clear_fallback(verification.id)
        return moved

    async def _fall_back(
        self, verification: Verification, service: Service, *, after: Channel
    ) -> bool:
        """Queue the verification's code on the first channel after ``after`` in the service's
        ``channels`` that this server can deliver, that has an address for it and has not been
        used yet (at most once per channel). True when a message was queued."""
        channels = service.policy.channels
        later = channels[channels.index(after) + 1 :] if after in channels else ()
        if not later or verification.code_sealed is None or verification.test:
            return False
        try:
            code = self._vault.unseal(verification.id, verification.code_sealed)
        except ValueError:
            return False
        policy = rules.effective_policy(
            service.policy, template=verification.template, sender_id=verification.sender_id
        )
        now = self._clock.now()
        for channel in later:
            to = _address(verification, channel)
            if to is None or channel not in self.channels:
                continue
            if verification.context and channel is not Channel.SMS:
                continue  # the amount and payee are shown by SMS only
            message, masked = rules.code_message(
                policy,
                message_id=new_id("msg"),
                account_id=verification.account_id,
                verification_id=verification.id,
                to=to,
                channel=channel,
                locale=verification.locale,
                code=code,
                context=verification.context,
                now=now,
            )
            try:
                message = await self._priced(message)
                message, caps = await self._capped(message, service)
                queued = await self._storage.queue_fallback(
                    verification.id,
                    message,
                    body_masked=masked,
                    now=now,
                    next_fallback_at=rules.fallback_at(service.policy, channel, now),
                    caps=caps,
                )
            except (InsufficientCredit, CountryNotAllowed) as exc:
                if isinstance(exc, SpendCapReached) and self._spend is not None:
                    await self._spend.refused(
                        exc, account_id=verification.account_id, service_id=service.id
                    )
                log.warning(
                    "channel fallback not billable",
                    extra={
                        "verification_id": verification.id,
                        "channel": channel.value,
                        "error": exc.code,
                    },
                )
                continue
            if queued:
                self._metrics.count("verification_fallback", channel=channel.value)
                log.info(
                    "verification falls back to another channel",
                    extra={
                        "verification_id": verification.id,
                        "from": after.value,
                        "channel": channel.value,
                    },
                )
                self._wake.set()
                return True
        return False

    async def _capped(
        self, message: Message, service: Service
    ) -> tuple[Message, tuple[SpendCap, ...]]:
        """A fallback counts against the daily spend caps like any send."""
        if self._spend is None:
            return message, ()
        account = await self._storage.get_account(message.account_id)
        if account is None:
            return message, ()
        caps = self._spend.caps(account, service)
        return self._spend.counted(message, caps), caps

    async def _priced(self, message: Message) -> Message:
        """An SMS fallback is priced and debited like any SMS; a call or an e-mail is not."""
        if self._billing is None or message.channel is not Channel.SMS:
            return message
        account = await self._storage.get_account(message.account_id)
        country = country_of(message.to)
        if account is None or country is None:
            return message
        price = await self._billing.price(account, country=country, segments=message.segments)
        return message if price is None else replace(message, price_units=price)

    # --- sent-marks storage has not taken yet ----------------------------------------------

    async def _record_sent(self, mark: _SentMark) -> None:
        """Record an accepted send. Should storage refuse, keep the mark and retry it in the
        background: the message must not reach a sender again, and its lease will lapse."""
        try:
            await self._storage.mark_sent(
                mark.message_id,
                provider=mark.provider,
                receipt=mark.receipt,
                now=mark.sent_at,
            )
        except Exception as exc:
            self._unrecorded[mark.message_id] = mark
            log.warning(
                "provider accepted the message but storage did not record it; retrying",
                extra={"message_id": mark.message_id, "error": type(exc).__name__},
            )
            if self._runner is not None and not self._stopping and self._recorder is None:
                self._recorder = asyncio.create_task(
                    self._record_until_stored(), name="otpgate-sent-marks"
                )

    async def record_sent_marks(self) -> int:
        """Try once to record every send storage has not taken yet; returns how many remain."""
        for mark in list(self._unrecorded.values()):
            try:
                await self._storage.mark_sent(
                    mark.message_id,
                    provider=mark.provider,
                    receipt=mark.receipt,
                    now=mark.sent_at,
                )
            except Exception as exc:
                log.warning(
                    "storage still does not record a sent message",
                    extra={"message_id": mark.message_id, "error": type(exc).__name__},
                )
                break  # storage is still down: the rest waits for the next round
            self._unrecorded.pop(mark.message_id, None)
        return len(self._unrecorded)

    async def _record_until_stored(self) -> None:
        """Retry the unrecorded sent-marks with exponential backoff (from the poll interval up
        to the backoff cap) until storage has taken all of them."""
        wait = self._poll_seconds
        try:
            while self._unrecorded:
                await asyncio.sleep(wait)
                if await self.record_sent_marks():
                    wait = min(wait * 2, max(self._retry.backoff_max_seconds, self._poll_seconds))
        finally:
            self._recorder = None


class ReceiptService:
    """Applies authenticated delivery reports to messages (API.md §6).

    A report can arrive before the sent-mark of its message is stored: an SMSC may report
    within milliseconds, while the dispatcher's sent-marks share a commit a moment later (and
    an HTTP receipt may reach an API node before the worker's commit). A report that names no
    known message is therefore held and applied again every second for
    :attr:`EARLY_REPORT_SECONDS`; only then is it dropped as a report of an unknown message.
    Held reports live in this process's memory (at most :attr:`EARLY_REPORT_LIMIT`): a
    process that stops drops them, and their messages stay ``sent``.
    """

    EARLY_REPORT_SECONDS = 120.0
    EARLY_REPORT_LIMIT = 10_000
    RETRY_SECONDS = 1.0

    def __init__(self, *, storage: MessageStore, clock: Clock, metrics: Metrics) -> None:
        self._storage = storage
        self._clock = clock
        self._metrics = metrics
        # (provider, reference) → (report, when it first arrived), oldest first.
        self._early: dict[tuple[str, str], tuple[DeliveryReport, datetime]] = {}
        self._retrier: asyncio.Task[None] | None = None

    async def record(self, provider: str, report: DeliveryReport | None) -> bool:
        """True when the report named a known message. An unknown one is held and retried
        (see the class docstring); the caller acknowledges it either way."""
        if report is None:
            return False
        known = await self._apply(provider, report)
        if not known and report.status is not None:
            self._hold(provider, report)
        return known

    async def _apply(self, provider: str, report: DeliveryReport) -> bool:
        known = await self._storage.apply_report(provider, report, self._clock.now())
        if known and report.status is not None:
            self._metrics.count("receipt", provider=provider, status=report.status.value)
        return known

    def _hold(self, provider: str, report: DeliveryReport) -> None:
        key = (provider, report.provider_ref)
        first = self._early.pop(key, (report, self._clock.now()))[1]
        self._early[key] = (report, first)
        while len(self._early) > self.EARLY_REPORT_LIMIT:
            self._early.pop(next(iter(self._early)))
        if self._retrier is None:
            self._retrier = asyncio.create_task(self._retry_held(), name="otpgate-early-reports")

    async def apply_held(self) -> int:
        """Apply every held report once more; drop those applied and those held too long.
        Returns how many are still held."""
        now = self._clock.now()
        limit = timedelta(seconds=self.EARLY_REPORT_SECONDS)
        for key, (report, first) in list(self._early.items()):
            try:
                known = await self._apply(key[0], report)
            except Unavailable:
                break  # storage is down: try them all again next round
            if known or now - first >= limit:
                self._early.pop(key, None)
                if not known:
                    log.info(
                        "delivery report for an unknown message dropped",
                        extra={"provider": key[0]},
                    )
        return len(self._early)

    async def _retry_held(self) -> None:
        try:
            while self._early:
                await asyncio.sleep(self.RETRY_SECONDS)
                await self.apply_held()
        except asyncio.CancelledError:
            raise
        except Exception:  # the retrier must not die silently with reports held
            log.exception("retrying early delivery reports failed")
        finally:
            self._retrier = None

    @property
    def held(self) -> int:
        """How many reports wait for their message's sent-mark."""
        return len(self._early)

    async def aclose(self) -> None:
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
            self._retrier = None
