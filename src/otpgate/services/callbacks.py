"""Calls owed to callers: delivery reports forwarded to the ``ackurl`` a LabsMobile client gave.

A report that moves a message with an ``ackurl`` writes a callback row in the same transaction
(``MessageStore.apply_report``). This sender claims due rows with a lease, as the message
dispatcher does, and GETs the URL with LabsMobile's ack parameters through the ``Outbound``
port (which refuses loopback, private and metadata addresses in production). A 2xx answer
settles it; anything else is retried with capped exponential backoff, the same callback id
each time, for ``give_up_after`` (24 h by default), then given up. A URL that can never be
called (a refused address) is given up at once. A restart loses nothing: the rows are the
outbox.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from otpgate.domain.ports import Callback, CallbackStore, Clock, Metrics, Outbound
from otpgate.errors import OutboundError, OutboundRefused
from otpgate.services.polling import PollingSender

log = logging.getLogger(__name__)

#: LabsMobile's ``desc`` for each message status otpgate reports.
_DESCRIPTIONS = {"delivered": "DELIVRD", "undelivered": "UNDELIV", "failed": "REJECTD"}
_LABSMOBILE_CODES = frozenset({"DELIVRD", "UNDELIV", "REJECTD", "EXPIRED", "BLOCKED", "READ"})


def labsmobile_ack(callback: Callback) -> dict[str, str]:
    """The query parameters LabsMobile's own delivery reports carry (``acklevel``, ``status``,
    ``desc``, ``subid``, ``msisdn``, ``timestamp``), from a callback's neutral ``params``.

    ``subid`` is the caller's own (its ``subid`` on ``/json/send``); ``desc`` is the
    provider's own code when it is one of LabsMobile's, else the one for the status.
    """
    params = callback.params
    status = params.get("status", "")
    detail = params.get("detail", "").upper()
    description = detail if detail in _LABSMOBILE_CODES else _DESCRIPTIONS.get(status, "UNKNOWN")
    reported = datetime.fromisoformat(params["reported_at"]) if params.get("reported_at") else None
    return {
        "acklevel": "handset" if status == "delivered" else "error",
        "status": "ok" if status == "delivered" else "ko",
        "desc": description,
        "subid": params.get("client_ref", ""),
        "msisdn": params.get("to", "").removeprefix("+"),
        "timestamp": "" if reported is None else reported.strftime("%Y-%m-%d %H:%M:%S"),
    }


@dataclass(frozen=True, slots=True)
class CallbackPolicy:
    backoff_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    give_up_after: timedelta = timedelta(hours=24)
    lease_seconds: int = 30

    def delay(self, attempt: int) -> float:
        """Capped exponential backoff with up to 25 % jitter."""
        base = min(self.backoff_max_seconds, self.backoff_seconds * 2.0 ** max(0, attempt - 1))
        return base * (1 + secrets.randbelow(250) / 1000)


class CallbackSender(PollingSender):
    """Claims due callbacks and calls them, up to ``concurrency`` at a time."""

    task_name = "otpgate-callbacks"
    what = "callbacks"

    def __init__(
        self,
        *,
        store: CallbackStore,
        outbound: Outbound,
        clock: Clock,
        metrics: Metrics,
        policy: CallbackPolicy | None = None,
        concurrency: int = 16,
        poll_seconds: float = 1.0,
    ) -> None:
        self._store = store
        self._outbound = outbound
        self._clock = clock
        self._metrics = metrics
        self._policy = policy or CallbackPolicy()
        self._concurrency = concurrency
        super().__init__(poll_seconds=poll_seconds)

    async def send_due(self) -> int:
        """Claim what is due and call it; how many were claimed."""
        now = self._clock.now()
        claimed = await self._store.claim_callbacks(
            now=now, lease_seconds=self._policy.lease_seconds, limit=self._concurrency
        )
        if claimed:
            await asyncio.gather(*(self._call(callback) for callback in claimed))
        return len(claimed)

    async def drain(self) -> None:
        """Call everything due now (tests, and the one-shot worker)."""
        while await self.send_due():
            pass

    async def _call(self, callback: Callback) -> None:
        try:
            await self._outbound.get(callback.url, labsmobile_ack(callback))
        except OutboundRefused as exc:
            # It can never be called: no retry would change that.
            await self._settle(callback, delivered=False, error=str(exc))
        except OutboundError as exc:
            await self._later(callback, str(exc))
        except Exception as exc:  # an adapter bug must not lose the callback: retry it
            log.exception("callback %s raised an unexpected error", callback.id)
            await self._later(callback, f"unexpected: {type(exc).__name__}")
        else:
            await self._settle(callback, delivered=True, error=None)

    async def _settle(self, callback: Callback, *, delivered: bool, error: str | None) -> None:
        await self._store.finish_callback(
            callback.id, delivered=delivered, error=error, now=self._clock.now()
        )
        self._metrics.count("callback", result="delivered" if delivered else "given_up")
        if not delivered:
            log.warning("callback given up", extra={"callback_id": callback.id, "error": error})

    async def _later(self, callback: Callback, error: str) -> None:
        now = self._clock.now()
        retry_at = now + timedelta(seconds=self._policy.delay(callback.attempts))
        if retry_at - callback.created_at > self._policy.give_up_after:
            await self._settle(callback, delivered=False, error=f"gave up: {error}")
            return
        await self._store.retry_callback(
            callback.id, error=error, next_attempt_at=retry_at, now=now
        )
        self._metrics.count("callback", result="retry")
        log.info(
            "callback will be retried",
            extra={"callback_id": callback.id, "attempt": callback.attempts, "error": error},
        )
