"""What the rate limits cost each send of a code: ``RateLimiting.send`` (six counters: number,
prefix, country, client IP, service, account) and ``RateLimiting.check`` (one counter), timed
in this process, on the in-process store (the default) or on a Redis.

``python -m benchmarks.ratelimit [--sends N] [--redis redis://127.0.0.1:6379/0]``

Each send goes to a new number (so the store grows as it would under real traffic: one
number counter per destination, one prefix counter per 1,000 numbers) of one service, well
under every limit, so every call takes the whole path: read every window, then count on each.
With ``--redis`` the keys go under a random prefix and are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from datetime import UTC, datetime

from otpgate.adapters.metrics import PrometheusMetrics
from otpgate.adapters.ratelimit import LimitsRateLimiter
from otpgate.domain import policy as rules
from otpgate.domain.model import Limit, Service
from otpgate.services.ratelimit import RateLimiting


def _service() -> Service:
    # Limits far above the run's volume: every send takes the whole path and none is refused.
    wide = {"limit": 100_000, "window_seconds": 3_600}
    policy = rules.build_policy(
        {
            "name": "Bench",
            "rate_limits": {
                "per_prefix": wide,
                "per_country": wide,
                "per_ip": wide,
                "per_service": wide,
            },
        }
    )
    now = datetime.now(UTC)
    return Service("svc_bench", "acc_bench", policy, now, now)


async def _run(sends: int, redis_url: str | None) -> None:
    prefix = "otpgate-bench-" + secrets.token_hex(4)
    limiter = (
        LimitsRateLimiter.redis(redis_url, key_prefix=prefix, timeout_seconds=1.0)
        if redis_url
        else LimitsRateLimiter.in_process()
    )
    limiting = RateLimiting(
        limiter=limiter, metrics=PrometheusMetrics(), per_account=Limit(100_000, 3_600)
    )
    service = _service()
    send_times: list[float] = []
    check_times: list[float] = []
    try:
        for n in range(sends):
            to = f"+346{n:08d}"
            ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
            began = time.perf_counter()
            await limiting.send(service, to=to, country="ES", client_ip=ip)
            send_times.append(time.perf_counter() - began)
            began = time.perf_counter()
            await limiting.check(service_id=service.id, to=to)
            check_times.append(time.perf_counter() - began)
    finally:
        if redis_url:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            async for key in client.scan_iter(match=f"{prefix}:*"):
                await client.delete(key)
            await client.aclose()
        await limiter.aclose()
    store = "redis" if redis_url else "in-process"
    for what, times in (("send (6 counters)", send_times), ("check (1 counter)", check_times)):
        ordered = sorted(times)
        print(
            f"{store:10} {what:18} n={len(times):6}  "
            f"mean {statistics.fmean(times) * 1e6:7.1f} µs  "
            f"p50 {ordered[len(ordered) // 2] * 1e6:7.1f} µs  "
            f"p99 {ordered[int(len(ordered) * 0.99)] * 1e6:7.1f} µs"
        )
    # The first and last tenth: does the cost grow with the number of counters kept?
    tenth = max(1, sends // 10)
    print(
        f"{store:10} send, first tenth mean {statistics.fmean(send_times[:tenth]) * 1e6:.1f} µs, "
        f"last tenth {statistics.fmean(send_times[-tenth:]) * 1e6:.1f} µs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=20_000)
    parser.add_argument("--redis", default=None, help="a Redis URL (default: in-process)")
    args = parser.parse_args()
    asyncio.run(_run(args.sends, args.redis))


if __name__ == "__main__":
    main()
