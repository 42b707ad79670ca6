"""Count what one verification round trip costs inside otpgate: statements, transactions,
database round trips and CPU time, per phase (start, dispatch, check).

``python -m benchmarks.statements [--round-trips N] [--database sqlite|postgres]`` runs otpgate
in this process on a temporary SQLite database (the embedded default) or a fresh schema of the
local PostgreSQL, through its ASGI app (no sockets but the database's) and with a recording SMS
sender, so the numbers are otpgate's own work without HTTP transport or the load client. It is
the quick way to see whether a change to the storage path made a round trip cheaper;
``benchmarks.roundtrip`` is the end-to-end measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from otpgate.adapters.storage.migrate import upgrade
from otpgate.adapters.storage.postgres import PostgresExecutor
from otpgate.adapters.storage.sqlite import SqliteExecutor
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
    """Statements (by verb) and transactions since the last reset."""

    def __init__(self) -> None:
        self.statements: Counter[str] = Counter()

    def reset(self) -> None:
        self.statements.clear()

    def count(self, sql: str) -> None:
        self.statements[sql.split(None, 1)[0].upper()] += 1

    def snapshot(self) -> dict[str, Any]:
        total = sum(self.statements.values())
        ends = sum(self.statements.get(verb, 0) for verb in ("BEGIN", "COMMIT", "ROLLBACK"))
        return {
            "transactions": self.statements.get("BEGIN", 0),
            "statements": total - ends,
            "by_verb": dict(sorted(self.statements.items())),
        }


def trace(executor: Any, tally: Tally) -> None:
    """Count every statement the executor sends to its database."""
    if isinstance(executor, SqliteExecutor):
        # SQLite reports every statement it runs on the executor's connection.
        executor._db.set_trace_callback(tally.count)
        return
    assert isinstance(executor, PostgresExecutor)
    fetch, execute, call = executor.fetch, executor.execute, executor._call

    async def counted_fetch(conn: Any, compiled: Any, params: Any) -> Any:
        tally.count(compiled.sql)
        return await fetch(conn, compiled, params)

    async def counted_execute(conn: Any, compiled: Any, params: Any) -> Any:
        tally.count(compiled.sql)
        return await execute(conn, compiled, params)

    async def counted_call(awaitable: Any, doing: str, conn: Any = None) -> Any:
        verb = {"begin": "BEGIN", "commit": "COMMIT", "deferred write": "UPDATE"}.get(doing)
        if verb is not None:
            tally.count(verb)
        return await call(awaitable, doing, conn)

    executor.fetch, executor.execute = counted_fetch, counted_execute  # type: ignore[method-assign]
    executor._call = counted_call  # type: ignore[method-assign]


#: Rate limits of a service far busier than the defaults allow (every limit still counted).
BUSY_SERVICE_LIMITS = {
    name: {"limit": 100_000, "window_seconds": 60}
    for name in ("per_number", "per_prefix", "per_country", "per_ip", "per_service")
}


async def run(round_trips: int, database: str, postgres_url: str) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="otpgate-statements-"))
    schema = "otpgate_statements_" + os.urandom(4).hex() if database == "postgres" else ""
    settings = Settings(
        data_dir=data_dir,
        database_url=postgres_url if schema else "",
        database_schema=schema,
        sms_provider="console",
        log_level="WARNING",
    )
    if schema:
        await upgrade(postgres_url, schema=schema)
    await prepare_database(settings)
    sender = RecordingSender()
    container = build(settings, sender=sender)
    tally = Tally()
    trace(container.storage.executor, tally)  # type: ignore[attr-defined]

    account, _ = await container.access.ensure_default_account()
    issued = await container.access.create_key(account.id, name="statements")
    service = await container.catalog.create(
        Principal(account=account, key_id="cli"),
        {
            "name": "Bench",
            "max_send_attempts": 10,
            "resend_interval_seconds": 0,
            # A load test is one very busy service: its limits are raised, as such a service
            # would raise them (the limiter still runs and counts on every start).
            "rate_limits": BUSY_SERVICE_LIMITS,
        },
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
    if schema:
        conn = await asyncpg.connect(postgres_url, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    where = "embedded SQLite" if not schema else "PostgreSQL"
    print(f"one round trip inside otpgate ({where}, recording sender):\n")
    print(f"{'phase':<9} {'transactions':>12} {'statements':>10} {'round trips':>11}  verbs")
    totals = Counter[str]()
    for name, phase in phases.items():
        trips = sum(phase["by_verb"].values())
        print(
            f"{name:<9} {phase['transactions']:>12} {phase['statements']:>10} {trips:>11}  "
            + ", ".join(f"{verb} {count}" for verb, count in phase["by_verb"].items())
        )
        totals.update(
            {
                "transactions": phase["transactions"],
                "statements": phase["statements"],
                "trips": trips,
            }
        )
    print(
        f"{'total':<9} {totals['transactions']:>12} {totals['statements']:>10} "
        f"{totals['trips']:>11}"
    )
    print(
        "\n(round trips: every statement plus BEGIN and COMMIT; on SQLite they are calls into "
        "the library, on PostgreSQL messages to the server)"
    )
    print(
        f"\nCPU per round trip, in process (ASGI, no sockets; includes the httpx test client): "
        f"{cpu_ms:.1f} ms over {round_trips} round trips"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for --database postgres (loopback); a fresh schema is made and dropped",
    )
    args = parser.parse_args()
    if not 1 <= args.round_trips <= 100_000:
        parser.error("--round-trips must be 1 to 100000")
    asyncio.run(run(args.round_trips, args.database, args.postgres_url))


if __name__ == "__main__":
    main()
