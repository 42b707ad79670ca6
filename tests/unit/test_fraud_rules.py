"""The SMS-pumping rules of ``domain.fraud``: prefixes, the verdict, block durations, lists."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from otpgate.domain.fraud import (
    LEVELS,
    AccountLists,
    Block,
    BlockKind,
    Conversion,
    EntryKind,
    GuardLevel,
    ListEntry,
    ListName,
    automatic_duration,
    prefix_of,
    suspicious,
    too_low,
    validate_prefix,
)
from otpgate.errors import InvalidRequest

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_a_prefix_is_the_number_without_its_last_three_digits() -> None:
    assert prefix_of("+63917555123") == "+63917555"
    assert validate_prefix(" +63917555 ") == "+63917555"
    for bad in ("63917555", "+639", "+0123456", "+63 917", "+6391755512345678", 6391):
        with pytest.raises(InvalidRequest):
            validate_prefix(bad)


def test_the_verdict_needs_volume_and_low_conversion() -> None:
    standard = LEVELS[GuardLevel.STANDARD]
    assert not too_low(Conversion(standard.min_volume - 1, 0), standard)
    assert too_low(Conversion(standard.min_volume, 0), standard)
    assert too_low(Conversion(10, 2), standard)  # 20 %: at the limit
    assert not too_low(Conversion(10, 3), standard)
    assert suspicious(Conversion(4, 0), standard) and not too_low(Conversion(4, 0), standard)
    # Stricter levels need less volume and tolerate more conversion.
    levels = [LEVELS[GuardLevel.BASIC], standard, LEVELS[GuardLevel.STRICT]]
    assert [lv.min_volume for lv in levels] == sorted(
        (lv.min_volume for lv in levels), reverse=True
    )
    assert [lv.max_conversion for lv in levels] == sorted(lv.max_conversion for lv in levels)


def _block(days_ago: float) -> Block:
    created = NOW - timedelta(days=days_ago)
    return Block(
        id="blk_x",
        kind=BlockKind.PREFIX,
        value="+63917555",
        country="PH",
        reason="r",
        created_at=created,
        expires_at=created + timedelta(hours=12),
        seq=1,
        automatic=True,
    )


def test_blocks_last_12_hours_doubled_per_recent_repeat_up_to_30_days() -> None:
    assert automatic_duration([], NOW) == timedelta(hours=12)
    assert automatic_duration([_block(1)], NOW) == timedelta(hours=24)
    assert automatic_duration([_block(1), _block(2)], NOW) == timedelta(hours=48)
    assert automatic_duration([_block(40)], NOW) == timedelta(hours=12)  # forgotten
    assert automatic_duration([_block(1)] * 12, NOW) == timedelta(days=30)


def test_account_lists_match_numbers_and_prefixes() -> None:
    def entry(name: ListName, kind: EntryKind, value: str) -> ListEntry:
        return ListEntry("e", "acc", name, kind, value, NOW)

    lists = AccountLists.of(
        [
            entry(ListName.SAFE, EntryKind.NUMBER, "+34600000001"),
            entry(ListName.SAFE, EntryKind.PREFIX, "+63917555"),
            entry(ListName.DENY, EntryKind.COUNTRY, "IT"),
            entry(ListName.DENY, EntryKind.PREFIX, "+3461"),
        ]
    )
    assert lists.is_safe("+34600000001") and not lists.is_safe("+34600000002")
    assert lists.is_safe("+63917555123") and not lists.is_safe("+63917556123")
    assert lists.denied_prefix("+34612345678") and not lists.denied_prefix("+34622345678")
    assert lists.denied_countries == {"IT"}
    assert not AccountLists().is_safe("+34600000001")
