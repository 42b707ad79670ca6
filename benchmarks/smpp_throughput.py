"""SMPP throughput on one bind: ``submit_sm`` per second through ``SmppSender``.

``make bench-smpp`` (or ``.venv/bin/python -m benchmarks.smpp_throughput [--messages 1000]
[--rounds 5] [--window 10]``):

1. starts the test SMSC (node-smpp's server side, ``tests/node/smsc.mjs``) on a free
   127.0.0.1 port, without per-PDU records, sending a ``deliver_sm`` receipt for every
   message as a real SMSC would (the sender acknowledges each with ``deliver_sm_resp``);
2. binds one ``SmppSender`` (``check``), then, each round, hands it ``--messages`` queued
   messages at once (one ``send`` each, as the dispatcher does with its claimed batch) and
   times from the first ``send`` to the last ``submit_sm_resp``;
3. checks the SMSC accepted every message and prints the median round in ``submit_sm``/s
   against the target of 1,000/s, and writes ``benchmarks/results/smpp.json``.

Not through HTTP or storage: this measures the SMPP session alone (window, PDU codec,
receipts on the same connection). Every socket is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tests.support.smsc import Smsc, smsc_missing

from otpgate.adapters.providers.smpp import SmppSender
from otpgate.domain.model import Channel, OutboundMessage, SmsContent
from otpgate.domain.ports import DeliveryReport

TARGET = 1000.0
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "smpp.json"
TEXT = "Your Acme code is 845201. Do not share it.\n\n@acme.example #845201"


def message(index: int) -> OutboundMessage:
    return OutboundMessage(
        message_id=f"msg_{index:032x}",
        channel=Channel.SMS,
        to=f"+3460{index % 10_000_000:07d}",
        text=TEXT,
        sms=SmsContent(sender_id="Acme", encoding="GSM-7", segments=1),
    )


async def run(messages: int, rounds: int, window: int) -> dict[str, object]:
    results: list[float] = []
    reports = 0

    async def sink(report: DeliveryReport) -> None:
        nonlocal reports
        reports += 1

    with Smsc(quiet=True, receipt_delay_ms=5) as smsc:
        sender = SmppSender(
            host="127.0.0.1",
            port=smsc.port,
            system_id=smsc.system_id,
            password=smsc.password,
            window=window,
            timeout_seconds=30.0,
        )
        sender.report_to(sink)
        try:
            await sender.check()
            # warm-up: one small batch
            await asyncio.gather(*(sender.send(message(i)) for i in range(100)))
            counter = 100
            for _ in range(rounds):
                batch = [message(counter + i) for i in range(messages)]
                counter += messages
                started = time.perf_counter()
                receipts = await asyncio.gather(*(sender.send(m) for m in batch))
                elapsed = time.perf_counter() - started
                assert all(r.provider_ref for r in receipts)
                results.append(messages / elapsed)
            await asyncio.sleep(0.5)  # let the last receipts arrive
        finally:
            await sender.aclose()
        smsc.sync()
        accepted = smsc.accepted_count
    expected = 100 + messages * rounds
    if accepted != expected:
        raise SystemExit(f"the SMSC accepted {accepted} submit_sm, expected {expected}")
    return {
        "messages_per_round": messages,
        "rounds": rounds,
        "window": window,
        "submit_sm_per_second": [round(r, 1) for r in results],
        "median_submit_sm_per_second": round(statistics.median(results), 1),
        "receipts_received": reports,
        "target": TARGET,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    missing = smsc_missing()
    if missing is not None:
        raise SystemExit(f"cannot run the SMPP benchmark: {missing}")
    result = asyncio.run(run(args.messages, args.rounds, args.window))
    result["machine"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    median = result["median_submit_sm_per_second"]
    print(
        f"SMPP, one bind, window {args.window}: {args.messages} queued messages x "
        f"{args.rounds} rounds -> median {median} submit_sm/s "
        f"(rounds: {result['submit_sm_per_second']}); target >= {TARGET:.0f}/s"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
