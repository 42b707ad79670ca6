"""A small time-bounded cache for lookups on every request's path (API keys, services).

Entries live ``ttl_seconds`` at most, measured on a monotonic clock; a change made through
this process drops its entry at once (``forget``), and a change made by another process is
seen within ``ttl_seconds``. ``ttl_seconds = 0`` turns caching off.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class TtlCache(Generic[V]):
    def __init__(
        self,
        ttl_seconds: float,
        *,
        max_entries: int = 10_000,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_seconds
        self._max = max_entries
        self._monotonic = monotonic
        self._entries: dict[Hashable, tuple[float, V]] = {}

    async def get(self, key: Hashable, load: Callable[[], Awaitable[V | None]]) -> V | None:
        """The cached value for ``key``, or ``load()``'s (cached only when not None, so a
        lookup that finds nothing is asked again next time)."""
        if self._ttl <= 0:
            return await load()
        now = self._monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = await load()
        if value is not None:
            if len(self._entries) >= self._max:
                self._entries.clear()  # crude but bounded; a full cache simply starts over
            self._entries[key] = (now + self._ttl, value)
        else:
            self._entries.pop(key, None)
        return value

    def forget(self, key: Hashable | None = None) -> None:
        """Drop one entry, or all with no key."""
        if key is None:
            self._entries.clear()
        else:
            self._entries.pop(key, None)
