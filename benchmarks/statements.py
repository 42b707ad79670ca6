"""Count what one verification round trip costs inside otpgate: SQL statements, transactions,
aiosqlite thread hops and CPU time, per phase (start, dispatch, check).

``python -m benchmarks.statements [--round-trips N]`` runs otpgate in this process on a
temporary SQLite database (the embedded default), through its ASGI app (no sockets at all) and
with a recording SMS sender, so the numbers are otpgate's own work without HTTP transport or
the load client. It is the quick way to see whether a change to the storage path made a round
trip cheaper; ``benchmarks.roundtrip`` is the end-to-end measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from otpgate.bootstrap import build, prepare_database
from otpgate.domain.model import Channel, OutboundMessage, Principal, SendReceipt
from otpgate.entrypoints.api.app import create_app
from otpgate.settings import Settings

_CODE = re.compile(r"(?:code|codigo)\W+([0-9A-Za-z]{4,10})\b", re.IGNORECASE)


class RecordingSender:
    name = "recording"
    channels = frozenset({Channel.SMS})

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def send(self, sms: OutboundMessage) -> SendReceipt:
        self.texts.append(sms.text)
        return SendReceipt(provider_ref=sms.message_id.removeprefix("msg_")[:20])

    async def aclose(self) -> None:
        return None


class Tally:
    """Statements (by verb), transactions and aiosqlite thread hops since the last reset."""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()
        self.hops = 0

    def reset(self) -> None:
        self.statements.clear()
        self.hops = 0

    def snapshot(self) -> dict[str, Any]:
        total = sum(self.statements.values())
        begins = self.statements.get("BEGIN", 0)
        return {
            "transactions": begins,
            "statements": total - begins,
            "by_verb": {k: v for k, v in sorted(self.statements.items()) if k != "BEGIN"},
            "aiosqlite_hops": self.hops,
        }


def _count_hops(tally: Tally) -> bool:
    """Wrap aiosqlite's one entry point to its worker thread; False if it is not there."""
    try:
        from aiosqlite.core import Connection
    except ImportError:  # pragma: no cover - aiosqlite is a dependency
        return False
    original = getattr(Connection, "_execute", None)
    if original is None:
        return False

    async def counted(self: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        tally.hops += 1
        return await original(self, fn, *args, **kwargs)

    Connection._execute = counted  # type: ignore[method-assign]
    return True


async def run(round_trips: int) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="otpgate-statements-"))
    settings = Settings(
        data_dir=data_dir, database_url="", sms_provider="console", log_level="WARNING"
    )
    await prepare_database(settings)
    sender = RecordingSender()
    container = build(settings, sender=sender)
    tally = Tally()
    hops_counted = _count_hops(tally)

    def _count(sql: str) -> None:
        tally.statements[sql.split(None, 1)[0].upper()] += 1

    # SQLite reports every statement it runs on the executor's connection.
    container.storage.executor._db.set_trace_callback(_count)  # type: ignore[attr-defined]

    account, _ = await container.access.ensure_default_account()
    issued = await container.access.create_key(account.id, name="statements")
    service = await container.catalog.create(
        Principal(account=account, key_id="cli"),
        {"name": "Bench", "max_send_attempts": 10, "resend_interval_seconds": 0},
    )
    app = create_app(container, run_dispatcher=False)
    headers = {"Authorization": f"Bearer {issued.secret}"}
    dispatcher = container.dispatcher

    async def one(number: int) -> dict[str, dict[str, Any]]:
        phases: dict[str, dict[str, Any]] = {}
        tally.reset()
        started = await client.post(
            "/v1/verifications",
            json={"service_id": service.id, "to": f"+3460{number:07d}"},
            headers=headers,
        )
        assert started.status_code == 201, started.text
        phases["start"] = tally.snapshot()
        tally.reset()
        # What the embedded dispatcher does when notified: claim until nothing is due, then
        # (stop() with no loop running) wait for the sends in flight.
        while await dispatcher.dispatch_due():
            pass
        await dispatcher.stop()
        phases["dispatch"] = tally.snapshot()
        match = _CODE.search(sender.texts[-1])
        assert match is not None, sender.texts[-1]
        tally.reset()
        checked = await client.post(
            f"/v1/verifications/{started.json()['id']}/check",
            json={"code": match.group(1)},
            headers=headers,
        )
        assert checked.json().get("status") == "approved", checked.text
        phases["check"] = tally.snapshot()
        return phases

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://otpgate.invalid") as client:
        for warm in range(5):
            await one(warm)
        phases = await one(5)
        cpu = time.process_time()
        for n in range(6, 6 + round_trips):
            await one(n)
        cpu_ms = (time.process_time() - cpu) * 1000 / round_trips
    await container.aclose()

    shutil.rmtree(data_dir, ignore_errors=True)
    print("one round trip inside otpgate (embedded SQLite, recording sender):\n")
    print(f"{'phase':<9} {'transactions':>12} {'statements':>10} {'aiosqlite hops':>14}  verbs")
    totals = Counter[str]()
    for name, phase in phases.items():
        hops = phase["aiosqlite_hops"] if hops_counted else "-"
        print(
            f"{name:<9} {phase['transactions']:>12} {phase['statements']:>10} {hops:>14}  "
            + ", ".join(f"{verb} {count}" for verb, count in phase["by_verb"].items())
        )
        totals.update({k: phase[k] for k in ("transactions", "statements", "aiosqlite_hops")})
    print(
        f"{'total':<9} {totals['transactions']:>12} {totals['statements']:>10} "
        f"{totals['aiosqlite_hops'] if hops_counted else '-':>14}"
    )
    print(
        f"\nCPU per round trip, in process (ASGI, no sockets; includes the httpx test client): "
        f"{cpu_ms:.1f} ms over {round_trips} round trips"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=200)
    args = parser.parse_args()
    if not 1 <= args.round_trips <= 100_000:
        parser.error("--round-trips must be 1 to 100000")
    asyncio.run(run(args.round_trips))


if __name__ == "__main__":
    main()
