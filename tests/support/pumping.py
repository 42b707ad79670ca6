"""The SMS-pumping scenario of issue 9, shared by tests/integration/test_pumping.py and
benchmarks/pumping.py.

500 starts to numbers of two prefixes of one country (the Philippines), never checked,
interleaved with 200 legitimate verifications to numbers of six other countries, each checked
with the right code ``check_delay`` seconds after its start; about 5 starts a second (the frozen
clock moves 0.2 s per start) from 4 concurrent clients. Delivery is drained after every start,
so "reached the provider" is exactly what the recording sender was given.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from tests.conftest import Api, code_in

BAD_PREFIXES = ("+639175551", "+639178881")
BAD_STARTS = 500
GOOD_STARTS = 200
CLIENTS = 4
SECONDS_PER_START = 0.2
#: Where the legitimate users are: a mobile range of each country and how many digits follow.
GOOD_RANGES = (
    ("+346", 8),  # ES
    ("+49151", 8),  # DE
    ("+336", 8),  # FR
    ("+393", 9),  # IT
    ("+8190", 8),  # JP
    ("+614", 8),  # AU
)


def good_numbers(count: int) -> list[str]:
    """``count`` valid mobile numbers spread over many prefixes of six countries."""
    numbers: list[str] = []
    step = 7_919_111
    index = 0
    while len(numbers) < count:
        start, digits = GOOD_RANGES[index % len(GOOD_RANGES)]
        tail = str((index * step + 12_345_678) % 10**digits).zfill(digits)
        candidate = start + tail
        index += 1
        if phonenumbers.is_valid_number(phonenumbers.parse(candidate)):
            numbers.append(candidate)
    return numbers


def bad_numbers(count: int) -> list[str]:
    """Numbers walked through the two bad prefixes in turn (``+639175551000`` …)."""
    return [f"{BAD_PREFIXES[i % 2]}{(i // 2) % 1000:03d}" for i in range(count)]


def plan() -> list[tuple[str, str]]:
    """The order of the starts: in every 7, 5 bad and 2 good."""
    bad, good = iter(bad_numbers(BAD_STARTS)), iter(good_numbers(GOOD_STARTS))
    order: list[tuple[str, str]] = []
    for i in range(BAD_STARTS + GOOD_STARTS):
        kind = "good" if i % 7 in (2, 5) else "bad"
        source = good if kind == "good" else bad
        number = next(source, None)
        if number is None:
            kind, number = ("bad", next(bad)) if kind == "good" else ("good", next(good))
        order.append((kind, number))
    return order


@dataclass
class Outcome:
    bad_sent_before_block: dict[str, int] = field(default_factory=dict)
    bad_sent_total: int = 0
    bad_refusals: dict[str, int] = field(default_factory=dict)
    bad_blocked_at: dict[str, int] = field(default_factory=dict)
    good_refused: list[tuple[str, int, str]] = field(default_factory=list)
    good_approved: int = 0
    blocks: list[dict[str, Any]] = field(default_factory=list)
    start_seconds: list[float] = field(default_factory=list)
    simulated_seconds: float = 0.0


async def run(api: Api, *, check_delay: float = 5.0) -> Outcome:
    """Play the scenario against a running app; returns what happened."""
    order = plan()
    queue: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
    for index, (kind, number) in enumerate(order):
        queue.put_nowait((index, kind, number))
    outcome = Outcome()
    begin = api.clock.now()
    due: list[tuple[Any, str, str]] = []  # (when, verification id, number) to check
    lock = asyncio.Lock()

    async def check_due() -> None:
        now = api.clock.now()
        ready = [d for d in due if d[0] <= now]
        for item in ready:
            due.remove(item)
        for _, verification_id, number in ready:
            codes = api.sender.codes_to(number)
            response = await api.check(verification_id, codes[-1])
            if response.status_code == 200 and response.json()["valid"]:
                outcome.good_approved += 1
            else:
                outcome.good_refused.append((number, response.status_code, "check"))

    async def client() -> None:
        while True:
            try:
                index, kind, number = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            async with lock:
                api.clock.advance(SECONDS_PER_START)
            started = time.perf_counter()
            response = await api.start(number)
            outcome.start_seconds.append(time.perf_counter() - started)
            await api.deliver()
            if kind == "good":
                if response.status_code in (200, 201):
                    when = api.clock.now() + _seconds(check_delay)
                    due.append((when, response.json()["id"], number))
                else:
                    outcome.good_refused.append(
                        (number, response.status_code, response.json().get("code", ""))
                    )
            else:
                prefix = number[:-3]
                if response.status_code == 403:
                    outcome.bad_refusals[prefix] = outcome.bad_refusals.get(prefix, 0) + 1
                    if response.json()["code"] == "destination_blocked":
                        outcome.bad_blocked_at.setdefault(prefix, index)
            await check_due()

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    # The last legitimate users type their codes.
    api.clock.advance(check_delay)
    await check_due()
    outcome.simulated_seconds = (api.clock.now() - begin).total_seconds()
    bad_sent = [m for m in api.sender.sent if m.to[:-3] in BAD_PREFIXES]
    outcome.bad_sent_total = len(bad_sent)
    for prefix in BAD_PREFIXES:
        outcome.bad_sent_before_block[prefix] = sum(1 for m in bad_sent if m.to[:-3] == prefix)
    listed = await api.http.get("/v1/blocks", headers=api.auth())
    assert listed.status_code == 200, listed.text
    outcome.blocks = listed.json()["data"]
    return outcome


def _seconds(value: float) -> Any:
    from datetime import timedelta

    return timedelta(seconds=value)


__all__ = ["BAD_PREFIXES", "Outcome", "code_in", "plan", "run"]
