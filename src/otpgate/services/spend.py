"""Daily spend caps per account and per service (``domain.spend``): which caps apply to a
send, what each message counts, and the ``spend_cap.reached`` event.

The caps are enforced by the store, in the transaction that queues the messages (a
conditional update of the day's counter), so that concurrent sends never pass a cap; this
module only says which caps are in force and raises the event, once per cap and UTC day, when
one refuses a send.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from otpgate.domain.billing import credits_text
from otpgate.domain.model import Account, Message, Service
from otpgate.domain.ports import Clock, Event, EventSink, Metrics, SpendStore
from otpgate.domain.spend import ACCOUNT, SERVICE, SpendCap, message_spend
from otpgate.errors import SpendCapReached

log = logging.getLogger(__name__)

EVENT_TYPE = "spend_cap.reached"


class SpendCaps:
    def __init__(
        self,
        *,
        store: SpendStore,
        events: EventSink,
        clock: Clock,
        metrics: Metrics,
        default_units: int,
    ) -> None:
        """``default_units``: what a message without a price counts, per SMS part."""
        self._store = store
        self._events = events
        self._clock = clock
        self._metrics = metrics
        self._default_units = default_units

    @staticmethod
    def caps(account: Account, service: Service | None = None) -> tuple[SpendCap, ...]:
        """The caps a send of ``account`` (through ``service``, for a verification) counts
        against: the account's, then the service's, those that are set."""
        caps = []
        if account.daily_spend_cap is not None:
            caps.append(SpendCap(ACCOUNT, account.id, account.daily_spend_cap))
        if service is not None and service.policy.daily_spend_cap is not None:
            caps.append(SpendCap(SERVICE, service.id, service.policy.daily_spend_cap))
        return tuple(caps)

    def counted(self, message: Message, caps: Sequence[SpendCap]) -> Message:
        """The message with what it counts against ``caps`` (nothing when there is none)."""
        if not caps:
            return message
        return replace(
            message, spend_units=message_spend(message, default_units=self._default_units)
        )

    async def refused(
        self, exc: SpendCapReached, *, account_id: str, service_id: str | None
    ) -> None:
        """A cap refused a send: log it and, the first time that day, raise its event."""
        self._metrics.count("spend_cap_refusal", cap=exc.scope)
        key = SpendCap(exc.scope, exc.owner_id, exc.limit).key
        first = await self._store.note_cap_reached(key, exc.day, self._clock.now())
        log.warning(
            "daily spend cap reached",
            extra={
                "account_id": account_id,
                "service_id": service_id,
                "cap": exc.scope,
                "limit": credits_text(exc.limit),
                "spent": credits_text(exc.spent),
                "first": first,
            },
        )
        if not first:
            return
        await self._events.emit(
            Event(
                type=EVENT_TYPE,
                account_id=account_id,
                service_id=exc.owner_id if exc.scope == SERVICE else service_id,
                data={
                    "cap": exc.scope,
                    "limit": credits_text(exc.limit),
                    "spent": credits_text(exc.spent),
                    "day": exc.day,
                },
            )
        )
