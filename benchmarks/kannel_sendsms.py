"""How many messages a second Kannel's smsbox accepts through otpgate's Kannel sender.

Starts real Kannel (bearerbox, smsbox, fakesmsc from Debian's ``kannel`` and ``kannel-extras``)
in a network namespace of its own with only loopback (``tests/support/kannel.py``; root is
needed), then sends ``--messages`` SMS through ``KannelSender.send`` with ``--concurrency``
sends in flight, each with a ``dlr-url`` (Kannel's reports go to a listener that takes the
connection and drops it). The figure is accepted sends (HTTP 202) per second of wall time, and
the time until fakesmsc has printed every message is shown too.

    sudo .venv/bin/python -m benchmarks.kannel_sendsms --messages 2000 --concurrency 20
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from tests.contract.sender_contract import make_sms
from tests.support.kannel import UNAVAILABLE, Kannel, running_kannel

from otpgate.adapters.providers.kannel import KannelSender


async def _run(kannel: Kannel, messages: int, concurrency: int) -> None:
    receipt_url = "http://127.0.0.1:9/v1/receipts/kannel?token=bench"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for number in range(messages):
        queue.put_nowait(number)
    async with kannel.ns.session() as session:
        sender = KannelSender(url=kannel.url(), client=session, timeout_seconds=30)
        await sender.check()

        async def worker() -> None:
            while not queue.empty():
                number = queue.get_nowait()
                await sender.send(
                    make_sms(
                        message_id=f"msg_{number:032x}",
                        to=f"+3460{number:07d}",
                        receipt_url=receipt_url,
                    )
                )

        kannel.mark_seen()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        accepted = time.perf_counter() - started
        kannel.new_messages(messages, timeout=600)
        arrived = time.perf_counter() - started
    print(
        f"{messages} messages, {concurrency} in flight: accepted in {accepted:.2f} s "
        f"({messages / accepted:.0f} sendsms/s); all at fakesmsc after {arrived:.2f} s "
        f"({messages / arrived:.0f} messages/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    if UNAVAILABLE:
        raise SystemExit(UNAVAILABLE)
    with (
        tempfile.TemporaryDirectory() as directory,
        running_kannel(Path(directory), quiet=True) as kannel,
    ):
        asyncio.run(_run(kannel, args.messages, args.concurrency))


if __name__ == "__main__":
    main()
