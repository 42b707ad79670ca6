"""Idempotency-Key handling for creates (API.md §1, SECURITY.md S15, IETF draft).

The same key and body return the first response and do nothing new; the same key with another
body is ``422 idempotency_key_mismatch``; a retry while the first is running is
``409 idempotency_in_progress``. Only successful responses are kept; a refused request frees
its key so it can be retried. Keys are scoped per account and kept 24 hours.

A kept response is stored as its action's ``redact`` makes it: a response that shows a secret
once (a new API key) is kept without it, so no secret can be read back from storage, and a
replay answers without it too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from otpgate.domain.ports import Clock, IdempotencyStore
from otpgate.errors import InvalidRequest

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    body: Any
    replayed: bool


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """What makes two requests "the same": method, path and exact body bytes."""
    digest = hashlib.sha256()
    for part in (method.encode(), path.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class Idempotency:
    def __init__(self, *, store: IdempotencyStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def run(
        self,
        account_id: str,
        key: str,
        fingerprint: str,
        action: Callable[[], Awaitable[tuple[int, Any]]],
        *,
        redact: Callable[[Any], Any] | None = None,
    ) -> Outcome:
        """Run ``action`` once per key and request; ``redact`` turns its response body into
        what may be stored and replayed (the identity when None)."""
        if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters",
                param="Idempotency-Key",
            )
        state, status, body = await self._store.begin(
            account_id, key, fingerprint, self._clock.now()
        )
        if state == "done":
            assert status is not None
            return Outcome(status, body, replayed=True)
        try:
            status, body = await action()
        except BaseException:
            await self._store.abandon(account_id, key)
            raise
        if 200 <= status < 300:
            await self._store.finish(
                account_id, key, status, body if redact is None else redact(body)
            )
        else:
            await self._store.abandon(account_id, key)
        return Outcome(status, body, replayed=False)
