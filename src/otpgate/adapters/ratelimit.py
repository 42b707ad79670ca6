"""Rate-limit counters (the ``RateLimiter`` port) on the ``limits`` library.

Every counter is a **moving window** (``limits``' ``MovingWindowRateLimiter``): the store keeps
the time of each event still inside the window, so "at most 10 in any hour" holds exactly, at
every instant, with no burst at a window's edge (a fixed window allows twice the limit across
its boundary) and no estimate (the sliding-window counter weights the previous window's count).
The price is memory: one timestamp per counted event, at most ``limit`` per counter
(``domain.policy.LIMIT_RANGE`` bounds it).

Two stores:

- in-process (``limits``' async memory storage), the default: counters hold in one process;
- Redis (``OTPGATE_REDIS_URL``), through the ``redis`` package's asyncio client (``limits``
  defaults to coredis for async Redis; otpgate asks for ``implementation="redispy"``), so
  every process and node that shares the Redis shares the counters. Keys start with
  ``OTPGATE_REDIS_KEY_PREFIX``.

An acquire reads every counter's window first and counts only when all have room, so a refused
request consumes nothing. With Redis the reads go out together, then the counts together: two
round trips of latency (plus one to explain a refusal that a concurrent request caused), not
one per counter.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import ConfigurationError as LimitsConfigurationError
from limits.errors import StorageError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from otpgate.domain.ports import RateCounter, RateRefusal
from otpgate.errors import ConfigurationError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: What every store failure answers: the address and password of the store stay out of it.
_DOWN = "the rate-limit store (Redis) cannot answer; try again shortly"


class SweptMemoryStorage(MemoryStorage):
    """``limits``' async in-process storage, with its clean-up made cheap.

    The library schedules a sweep of *every* key after *every* count, and sweeps each key
    through a thread hop (``asyncio.to_thread``): with tens of thousands of counters (one per
    destination number) that sweep never ends and takes the event loop's time from requests
    (measured: p99 of a send near 10 ms at 20,000 numbers; ``benchmarks/ratelimit.py``). Here
    the sweep runs at most every ``SWEEP_SECONDS``, inline, yielding to other tasks every
    ``SWEEP_BATCH`` keys. Expired events are also ignored by every read, so sweeping late
    only keeps memory a little longer. (The hooks are the library's private methods, pinned
    in the lock at 5.8: if they were renamed, the library's own sweep would run instead,
    correct and slower.)"""

    SWEEP_SECONDS = 10.0
    SWEEP_BATCH = 2_000

    def __init__(self) -> None:
        super().__init__()
        self._next_sweep = 0.0
        self._sweeping: asyncio.Task[None] | None = None

    async def _MemoryStorage__schedule_expiry(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or (self._sweeping is not None and not self._sweeping.done()):
            return
        self._next_sweep = now + self.SWEEP_SECONDS
        self._sweeping = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        now = time.time()
        for n, key in enumerate(list(self.events)):
            events = self.events.get(key)
            if events:
                # Newest first; keep those whose expiry is still ahead.
                keep = bisect.bisect_left(events, -now, key=lambda event: -event.expiry)
                if keep < len(events):
                    del events[keep:]
            if not events and not (key in self.locks and self.locks[key].locked()):
                self.events.pop(key, None)
                self.locks.pop(key, None)
            if n % self.SWEEP_BATCH == self.SWEEP_BATCH - 1:
                await asyncio.sleep(0)
                now = time.time()


class LimitsRateLimiter:
    """``RateLimiter`` over a ``limits`` async storage, moving windows."""

    def __init__(self, storage: Storage, *, concurrent: bool) -> None:
        """``concurrent``: read and count the counters with concurrent calls (a remote store,
        where each is a round trip); otherwise one after the other (in-process, where each
        call returns at once and tasks would only cost)."""
        self._storage = storage
        self._strategy = MovingWindowRateLimiter(storage)
        self._concurrent = concurrent
        self._items: dict[tuple[int, int], RateLimitItem] = {}

    @classmethod
    def in_process(cls) -> LimitsRateLimiter:
        return cls(SweptMemoryStorage(), concurrent=False)

    @classmethod
    def redis(cls, url: str, *, key_prefix: str, timeout_seconds: float) -> LimitsRateLimiter:
        """Counters in the Redis at ``url`` (``redis://``, ``rediss://``), under
        ``key_prefix``. Connecting is lazy: a Redis that is down fails the first request that
        needs it, not the start-up."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("redis", "rediss"):
            raise ConfigurationError("OTPGATE_REDIS_URL must be a redis:// or rediss:// URL")
        try:
            storage = RedisStorage(
                f"async+{scheme}://{rest}",
                implementation="redispy",
                key_prefix=key_prefix,
                wrap_exceptions=True,
                socket_timeout=timeout_seconds,
                socket_connect_timeout=timeout_seconds,
                # redis-py retries 10 times with backoff by default (seconds, when Redis is
                # down); one immediate retry covers a pooled connection Redis dropped.
                retry=Retry(NoBackoff(), 1),  # type: ignore[arg-type]
            )
        except (LimitsConfigurationError, ValueError) as exc:
            # The text of a URL parser's error may quote the URL, password included.
            raise ConfigurationError("OTPGATE_REDIS_URL is not a usable Redis URL") from exc
        return cls(storage, concurrent=True)

    def _item(self, counter: RateCounter) -> RateLimitItem:
        shape = (counter.limit, counter.window_seconds)
        item = self._items.get(shape)
        if item is None:
            item = self._items[shape] = RateLimitItemPerSecond(*shape)
        return item

    async def acquire(self, counters: Sequence[RateCounter]) -> RateRefusal | None:
        items = [self._item(counter) for counter in counters]
        try:
            # 1. Read every window: a counter without room refuses, and nothing is counted.
            windows = await self._each(
                self._strategy.get_window_stats,
                [(item, c.key) for c, item in zip(counters, items, strict=True)],
            )
            for counter, window in zip(counters, windows, strict=True):
                if window.remaining < 1:
                    return RateRefusal(counter, max(0.0, window.reset_time - time.time()))
            # 2. Count on every counter; each count is atomic, so under a race the store
            #    refuses a counter that filled up since the read.
            counted = await self._each(
                self._strategy.hit, [(item, c.key) for c, item in zip(counters, items, strict=True)]
            )
            for counter, item, ok in zip(counters, items, counted, strict=True):
                if not ok:
                    window = await self._strategy.get_window_stats(item, counter.key)
                    return RateRefusal(counter, max(0.0, window.reset_time - time.time()))
        except (StorageError, RedisError, OSError) as exc:
            log.warning("rate-limit store failed: %s", type(exc).__name__)
            raise Unavailable(_DOWN, retry_after=1) from exc
        return None

    async def _each(
        self,
        call: Callable[[RateLimitItem, str], Awaitable[T]],
        arguments: Sequence[tuple[RateLimitItem, str]],
    ) -> list[T]:
        if self._concurrent:
            return list(await asyncio.gather(*(call(*args) for args in arguments)))
        return [await call(*args) for args in arguments]

    async def aclose(self) -> None:
        if isinstance(self._storage, RedisStorage):
            bridge = self._storage.bridge
            client = getattr(bridge, "storage", None)
            if client is not None:
                await client.aclose()
