"""The development SMS sender: prints each message in a clearly marked banner, sends nothing.

This is the one documented place where a message text (and so a code) is shown (SECURITY.md S2).
It writes straight to a text stream and deliberately does not use ``logging``: logs never carry
codes (S18), and a log handler could ship them somewhere. The receipt URL is not printed either,
because it carries the receipt secret.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from otpgate.domain.model import OutboundSms, SendReceipt
from otpgate.errors import TransientDeliveryError

__all__ = ["BANNER", "ConsoleSender"]

BANNER = "==== DEV SMS (console sender, not delivered) ===="
_FOOTER = "=" * len(BANNER)


class ConsoleSender:
    """``SmsSender`` that writes each message to ``stream`` (``sys.stdout`` at send time by
    default) and returns ``SendReceipt(provider_ref=<message id>)``. A stream that cannot be
    written raises ``TransientDeliveryError``."""

    name = "console"

    def __init__(self, *, stream: TextIO | None = None) -> None:
        self._stream = stream
        # One banner is written as one block, even with several dispatchers in threads.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        target = "stdout" if self._stream is None else type(self._stream).__name__
        return f"ConsoleSender(stream={target})"

    async def send(self, sms: OutboundSms) -> SendReceipt:
        sender = sms.sender_id if sms.sender_id is not None else "(account default)"
        block = "\n".join(
            (
                "",
                BANNER,
                f"to:         {sms.to}",
                f"message id: {sms.message_id}",
                f"sender:     {sender}",
                f"encoding:   {sms.encoding}, {sms.segments} segment(s)",
                "-" * len(BANNER),
                sms.text,
                _FOOTER,
                "",
            )
        )
        # Resolved now, not at construction, so a replaced sys.stdout (pytest capture) is used.
        stream = self._stream if self._stream is not None else sys.stdout
        try:
            with self._lock:
                stream.write(block)
                stream.flush()
        except (OSError, ValueError) as exc:  # closed or broken stream
            raise TransientDeliveryError(
                f"console: cannot write to the stream ({type(exc).__name__})"
            ) from exc
        return SendReceipt(provider_ref=sms.message_id)

    async def aclose(self) -> None:
        """Nothing to release: the stream belongs to the caller."""
