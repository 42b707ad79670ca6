"""Daily spend caps: how much an account's or a service's messages may cost in one UTC day.

A cap is a number of credits (``domain.billing`` units). Each message counts its price when a
price table gives it one, otherwise the default price per part (``OTPGATE_DEFAULT_MESSAGE_
CREDITS``, one credit unless set) times its SMS parts; an e-mail counts nothing (no operator is
paid for it). A cap counts the messages queued while it is set, on the UTC day they are queued;
a message refunded (failed before it reached the network, or a scheduled one canceled) gives
its amount back. The store applies a send's amount to every cap in force in the transaction
that stores it, with a conditional update, so concurrent sends never overshoot a cap.

>>> spend_day(datetime(2026, 1, 2, 23, 59, tzinfo=UTC))
'2026-01-02'
>>> SpendCap("service", "svc_1", 10_000).key
'service:svc_1'
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from otpgate.domain.model import Channel, Message

ACCOUNT = "account"
SERVICE = "service"


@dataclass(frozen=True, slots=True)
class SpendCap:
    """One cap in force: whose (``scope`` ``account`` or ``service``, and the owner's id) and
    how many units a UTC day allows."""

    scope: str
    owner_id: str
    limit: int

    @property
    def key(self) -> str:
        """The cap's counter key: ``account:acc_…`` or ``service:svc_…``."""
        return f"{self.scope}:{self.owner_id}"


def spend_day(at: datetime) -> str:
    """The UTC day a message queued at ``at`` counts on, as ``YYYY-MM-DD``."""
    return at.astimezone(UTC).date().isoformat()


def message_spend(message: Message, *, default_units: int) -> int:
    """What ``message`` counts against a cap: its price, else ``default_units`` per part; an
    e-mail nothing (it has no price and no operator is paid for it)."""
    if message.price_units is not None:
        return message.price_units
    if message.channel is Channel.EMAIL:
        return 0
    return default_units * max(1, message.segments)
