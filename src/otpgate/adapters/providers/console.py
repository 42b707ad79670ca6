"""The development sender: prints each message in a clearly marked banner, sends nothing.

It carries every channel (SMS, voice, e-mail), so a development server can show any of them.

This is the one documented place where a message text (and so a code) is shown (SECURITY.md S2).
It writes straight to a text stream and deliberately does not use ``logging``: logs never carry
codes (S18), and a log handler could ship them somewhere. The receipt URL is not printed either,
because it carries the receipt secret.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from otpgate.adapters.providers.registry import ProviderContext, ProviderOptions, register
from otpgate.domain.model import Channel, OutboundMessage, SendReceipt
from otpgate.errors import ConfigurationError, TransientDeliveryError
from otpgate.settings import Environment

__all__ = ["BANNER", "ConsoleSender", "from_options"]

BANNER = "==== DEV SMS (console sender, not delivered) ===="
_FOOTER = "=" * len(BANNER)


@register("console")
def from_options(options: ProviderOptions, context: ProviderContext) -> ConsoleSender:
    """The console sender; refused in production, where it would only print codes."""
    if context.settings.env is Environment.PRODUCTION:
        raise ConfigurationError(
            f"provider {context.name!r}: console only prints codes; "
            "choose a real provider in production"
        )
    return ConsoleSender(name=context.name)


class ConsoleSender:
    """``Sender`` that writes each message to ``stream`` (``sys.stdout`` at send time by
    default) and returns ``SendReceipt(provider_ref=<message id>)``. A stream that cannot be
    written raises ``TransientDeliveryError``."""

    name = "console"
    channels = frozenset(Channel)

    def __init__(self, *, stream: TextIO | None = None, name: str = "console") -> None:
        self.name = name
        self._stream = stream
        # One banner is written as one block, even with several dispatchers in threads.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        target = "stdout" if self._stream is None else type(self._stream).__name__
        return f"ConsoleSender(stream={target})"

    async def send(self, message: OutboundMessage) -> SendReceipt:
        lines = ["", BANNER]
        if message.channel is not Channel.SMS:
            lines.append(f"channel:    {message.channel.value}")
        lines += [f"to:         {message.to}", f"message id: {message.message_id}"]
        if message.sms is not None:
            sender = message.sms.sender_id
            lines += [
                f"sender:     {sender if sender is not None else '(account default)'}",
                f"encoding:   {message.sms.encoding}, {message.sms.segments} segment(s)",
            ]
        lines += ["-" * len(BANNER), message.text, _FOOTER, ""]
        block = "\n".join(lines)
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
        return SendReceipt(provider_ref=message.message_id)

    async def check(self) -> None:
        """Nothing to connect to: the console is always there."""

    async def aclose(self) -> None:
        """Nothing to release: the stream belongs to the caller."""
