"""The SMS-pumping scenario of issue 9, measured: how many messages reached the provider for
the pumped prefixes before they were blocked, how many legitimate users were refused, and what
the defence costs on the path of a start.

``python -m benchmarks.pumping [--database sqlite|postgres] [--delays 5,15,30]`` runs otpgate
in this process (its ASGI app, a recording SMS sender, a frozen clock moving 0.2 s per start:
about 5 starts a second from 4 concurrent clients) on a temporary SQLite file or a fresh schema
of the local PostgreSQL. The scenario is ``tests/support/pumping.py``: 500 never-checked starts
to two prefixes of the Philippines interleaved with 200 legitimate verifications in six other
countries, each checked ``delay`` seconds after its start.

Then it times ``FraudGuard.screen`` (the blocks step and the detector) on that database, with
the scenario's rows and 20,000 more verifications spread over other prefixes: the per-start
cost of the defence.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import text
from tests.conftest import POSTGRES_URL, Api, Database, make_settings, serving
from tests.support import pumping

from otpgate.adapters.storage import tables as t
from otpgate.adapters.storage.engine import create_engine
from otpgate.adapters.storage.migrate import upgrade
from otpgate.domain.fraud import LEVELS, GuardLevel
from otpgate.domain.phone import parse_phone


async def database(kind: str, tmp: Path) -> Database:
    if kind == "sqlite":
        path = tmp / f"bench-{secrets.token_hex(3)}.db"
        url = f"sqlite:///{path}"
        await upgrade(url)
        return Database("sqlite", url, "", path)
    schema = "otpgate_bench_" + secrets.token_hex(4)
    await upgrade(POSTGRES_URL, schema=schema)
    return Database("postgres", POSTGRES_URL, schema, None)


async def drop(db: Database) -> None:
    if db.backend == "postgres":
        engine = create_engine(POSTGRES_URL, pool_size=1)
        async with engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE'))
        await engine.dispose()


async def filler(db: Database, count: int, stamp: datetime) -> None:
    """``count`` verifications of the last 50 minutes to 20 busy prefixes of Spain (every
    number of each, mostly approved), written behind the API's back: the detector's query
    for a number of those prefixes counts a thousand rows, its worst case."""
    engine = create_engine(db.url, schema=db.schema, pool_size=1)
    async with engine.begin() as conn:
        account = (await conn.execute(text("SELECT id FROM accounts LIMIT 1"))).scalar_one()
        service = (await conn.execute(text("SELECT id FROM services LIMIT 1"))).scalar_one()
        rows = [
            {
                "id": f"ver_fill{i:024d}",
                "account_id": account,
                "service_id": service,
                "to": f"+346000{i % 20:02d}{i // 20 % 1000:03d}",
                "channel": "sms",
                "status": "approved" if i // 20 % 5 else "expired",
                "code_digest": b"\0" * 32,
                "locale": "en",
                "metadata": {},
                "check_attempts": 1,
                "max_check_attempts": 5,
                "send_attempts": 1,
                "max_send_attempts": 5,
                "created_at": stamp - timedelta(seconds=i % 3_000),
                "updated_at": stamp,
                "expires_at": stamp,
                "last_sent_at": stamp,
            }
            for i in range(count)
        ]
        await conn.execute(t.verifications.insert(), rows)
    await engine.dispose()


async def scenario(kind: str, delay: float, tmp: Path, *, time_screen: bool) -> None:
    db = await database(kind, tmp)
    try:
        async with serving(make_settings(db, tmp), db) as api:
            wall = time.perf_counter()
            outcome = await pumping.run(api, check_delay=delay)
            wall = time.perf_counter() - wall
            blocked = {b["value"]: b for b in outcome.blocks}
            print(f"\n[{kind}] legitimate users check {delay:g} s after their start")
            print(
                f"  simulated {outcome.simulated_seconds:.0f} s, {len(outcome.start_seconds)} "
                f"starts in {wall:.1f} s of wall time"
            )
            for prefix in pumping.BAD_PREFIXES:
                at = outcome.bad_blocked_at.get(prefix)
                print(
                    f"  {prefix}: {outcome.bad_sent_before_block[prefix]} messages reached the "
                    f"provider; blocked at start #{at} "
                    f"({'listed' if prefix in blocked else 'NOT listed'} in /v1/blocks); "
                    f"{outcome.bad_refusals.get(prefix, 0)} starts refused"
                )
            print(f"  pumped prefixes, in total: {outcome.bad_sent_total} messages (limit 60)")
            print(
                f"  legitimate: {outcome.good_approved} approved, "
                f"{len(outcome.good_refused)} refused (limit 2)"
            )
            others = sorted(set(blocked) - set(pumping.BAD_PREFIXES))
            print(f"  other blocks: {others or 'none'}")
            if time_screen:
                await screen_cost(api, db)
    finally:
        await drop(db)


async def screen_cost(api: Api, db: Database, rounds: int = 2_000) -> None:
    await filler(db, 20_000, api.clock.now())
    fraud = api.container.fraud
    account = api.account_id
    busy = [parse_phone(f"+346000{i % 20:02d}{i * 7 % 1000:03d}") for i in range(rounds)]

    async def timed(level: GuardLevel | None) -> float:
        samples = []
        for destination in busy:
            started = time.perf_counter()
            await fraud.screen(
                account_id=account, service_id=None, destination=destination, level=level
            )
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e6

    blocks_only = await timed(None)
    detector = await timed(GuardLevel.STANDARD)
    print(
        f"  cost of the blocks step per start ({rounds} starts to prefixes with 1,000 "
        f"verifications each in the window, 20,700 stored): "
        f"blocks and safe list {blocks_only:.0f} µs median; with the detector (standard) "
        f"{detector:.0f} µs median; a check pays nothing (no extra write)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--delays", default="5,15,30")
    args = parser.parse_args()
    standard = LEVELS[GuardLevel.STANDARD]
    print(
        f"fraud_guard standard: block a prefix with >= {standard.min_volume} decided "
        f"verifications and <= {standard.max_conversion:.0%} approved in "
        f"{standard.window_seconds // 60} min; grace {standard.grace_seconds} s"
    )
    delays = [float(d) for d in args.delays.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for index, delay in enumerate(delays):
            asyncio.run(scenario(args.database, delay, Path(tmp), time_screen=index == 0))


if __name__ == "__main__":
    main()
