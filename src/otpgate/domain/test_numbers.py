"""Test numbers: a service's numbers whose code is fixed and whose messages never go out.

For integrators' CI and app-store reviewers: a start to a test number answers as any start
does, but its code is the number's fixed code (so checks work unchanged: the fixed code is
digested and sealed like any code), its message is stored as already sent by the provider
``test`` and never reaches a provider, and it uses no rate limit, fraud counter, credit or
spend cap. Only the fixed code approves it.
"""

from __future__ import annotations

from dataclasses import replace

from otpgate.domain.model import Message, MessageStatus, ServicePolicy

#: The provider shown on a test message.
PROVIDER = "test"


def fixed_code(policy: ServicePolicy, to: str) -> str | None:
    """The fixed code of ``to`` (E.164) when it is one of the service's test numbers."""
    return policy.test_numbers.get(to)


def as_test_message(message: Message) -> Message:
    """``message`` as a test number's message is stored: sent by ``test``, unpriced, never
    due for delivery."""
    return replace(
        message,
        status=MessageStatus.SENT,
        provider=PROVIDER,
        price_units=None,
        spend_units=None,
        test=True,
    )
