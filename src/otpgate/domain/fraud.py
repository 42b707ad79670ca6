"""SMS-pumping defence, the rules: number prefixes, sensitivity levels, the detector's verdict,
block durations, and the account's safe and deny lists (SECURITY.md S13–S15).

Pumping ("artificially inflated traffic") sends codes to ranges of numbers whose operators share
the termination revenue; nobody ever types those codes. So the signal is *conversion*: of the
verifications started to a number range, how many were approved. The range is the **prefix**:
the E.164 number without its last three digits (``+63917555123`` → ``+63917555``), a block of a
thousand numbers, which is how operators allocate them and how pumpers walk them.

A start converts only when its code is checked, which takes a person some seconds (the SMS
arrives, is read, is typed). A verification therefore counts in the verdict only once it is
*decided*: approved, closed for another reason, or older than the level's ``grace_seconds``
and still pending. A legitimate burst of starts whose users have not typed their code yet is
not "unconverted"; it is not counted at all.

Nothing here knows about HTTP or SQL; ``services.fraud`` asks storage for the counts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from otpgate.domain.ascii import ascii_upper
from otpgate.domain.phone import is_region
from otpgate.errors import InvalidRequest

#: How many trailing digits a prefix leaves out: a block of 1,000 numbers.
PREFIX_HIDDEN_DIGITS = 3
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_PREFIX = re.compile(r"^\+[1-9][0-9]{3,12}$")

#: The first automatic block of a prefix lasts this long; each repeat doubles it.
FIRST_BLOCK = timedelta(hours=12)
#: Earlier blocks of a prefix count as repeats for this long.
REPEAT_MEMORY = timedelta(days=30)
#: The longest automatic block (12 h doubled six times would be 32 days).
LONGEST_BLOCK = timedelta(days=30)
#: An operator's block lasts this long unless the request says otherwise.
MANUAL_BLOCK_DEFAULT = timedelta(days=30)
MANUAL_BLOCK_MAX = timedelta(days=365)


def prefix_of(e164: str) -> str:
    """The number's prefix: its E.164 form without the last three digits.

    >>> prefix_of("+63917555123")
    '+63917555'
    """
    return e164[:-PREFIX_HIDDEN_DIGITS]


def validate_prefix(value: object, *, param: str = "prefix") -> str:
    """A prefix as written in the API: ``+``, country code and at least three more digits."""
    if not isinstance(value, str) or not _PREFIX.match(value.strip()):
        raise InvalidRequest(
            "prefix must be + and 4 to 13 digits, such as +63917555 (a number without its "
            "last three digits)",
            param=param,
        )
    return value.strip()


def validate_number(value: object, *, param: str = "number") -> str:
    """A whole number in E.164 (its validity as an assigned number is not required: a safe
    list may name a number before it is used)."""
    if not isinstance(value, str) or not _E164.match(value.strip()):
        raise InvalidRequest("number must be E.164, such as +34600000000", param=param)
    return value.strip()


def validate_country(value: object, *, param: str = "country") -> str:
    if not isinstance(value, str) or not is_region(ascii_upper(value.strip())):
        raise InvalidRequest(
            "country must be an assigned ISO 3166-1 alpha-2 code, such as PH", param=param
        )
    return ascii_upper(value.strip())


class GuardLevel(enum.StrEnum):
    """A service's sensitivity (its ``fraud_guard`` field)."""

    OFF = "off"
    BASIC = "basic"
    STANDARD = "standard"
    STRICT = "strict"


@dataclass(frozen=True, slots=True)
class Sensitivity:
    """When a prefix is blocked: at least ``min_volume`` decided verifications in the last
    ``window_seconds``, of which at most ``max_conversion`` were approved. A start is decided
    when approved, closed, or pending for longer than ``grace_seconds``."""

    min_volume: int
    max_conversion: float
    window_seconds: int
    grace_seconds: int


#: The figures per level; docs/security.md says what they were tuned on.
LEVELS: dict[GuardLevel, Sensitivity] = {
    GuardLevel.BASIC: Sensitivity(
        min_volume=20, max_conversion=0.10, window_seconds=3_600, grace_seconds=30
    ),
    GuardLevel.STANDARD: Sensitivity(
        min_volume=8, max_conversion=0.20, window_seconds=3_600, grace_seconds=8
    ),
    GuardLevel.STRICT: Sensitivity(
        min_volume=5, max_conversion=0.34, window_seconds=3_600, grace_seconds=8
    ),
}

#: A whole country counts as failing when at least this many of its verifications are decided
#: in the window and its conversion is at most the level's: then its prefixes need only half
#: the volume (an attack spread thinly over many prefixes of one country).
COUNTRY_MIN_VOLUME = 40


@dataclass(frozen=True, slots=True)
class Conversion:
    """Decided verifications and how many of them were approved."""

    decided: int
    approved: int

    @property
    def rate(self) -> float:
        return self.approved / self.decided if self.decided else 1.0

    def text(self) -> str:
        return f"{self.approved} of {self.decided} approved"


def too_low(counts: Conversion, level: Sensitivity, *, min_volume: int | None = None) -> bool:
    """The detector's verdict on one prefix: enough volume and too little conversion."""
    volume = level.min_volume if min_volume is None else min_volume
    return counts.decided >= volume and counts.rate <= level.max_conversion


def suspicious(counts: Conversion, level: Sensitivity) -> bool:
    """Half-way to :func:`too_low`: worth asking how the whole country converts."""
    return too_low(counts, level, min_volume=max(2, (level.min_volume + 1) // 2))


def country_failing(counts: Conversion, level: Sensitivity) -> bool:
    return counts.decided >= COUNTRY_MIN_VOLUME and counts.rate <= level.max_conversion


class BlockKind(enum.StrEnum):
    PREFIX = "prefix"
    COUNTRY = "country"


@dataclass(frozen=True, slots=True)
class Block:
    """A deployment-wide refusal of a prefix or a whole country, until ``expires_at`` or until
    an operator lifts it (``lifted_at``). ``seq`` numbers the blocks of one ``value``: the
    repeat count, and what makes two processes that detect at once create one block."""

    id: str
    kind: BlockKind
    value: str
    country: str | None
    reason: str
    created_at: datetime
    expires_at: datetime
    seq: int
    automatic: bool
    lifted_at: datetime | None = None

    def in_force(self, now: datetime) -> bool:
        return self.lifted_at is None and self.expires_at > now

    def ended_at(self) -> datetime:
        """When it stopped (or will stop) applying."""
        return self.lifted_at if self.lifted_at is not None else self.expires_at


def automatic_duration(history: list[Block], now: datetime) -> timedelta:
    """12 h for a prefix's first block; doubled for each earlier block of it within
    :data:`REPEAT_MEMORY`; never more than :data:`LONGEST_BLOCK`."""
    repeats = sum(1 for b in history if b.created_at > now - REPEAT_MEMORY)
    doubled: timedelta = FIRST_BLOCK * 2 ** min(repeats, 10)
    return min(doubled, LONGEST_BLOCK)


class ListName(enum.StrEnum):
    """An account's destination lists: numbers and prefixes that bypass the detector and the
    blocks (``safe``), and countries and prefixes it never sends to (``deny``)."""

    SAFE = "safe"
    DENY = "deny"


class EntryKind(enum.StrEnum):
    NUMBER = "number"
    PREFIX = "prefix"
    COUNTRY = "country"


@dataclass(frozen=True, slots=True)
class ListEntry:
    id: str
    account_id: str
    list: ListName
    kind: EntryKind
    value: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class AccountLists:
    """An account's safe and deny lists, as sets to test a destination against."""

    safe_numbers: frozenset[str] = frozenset()
    safe_prefixes: frozenset[str] = frozenset()
    denied_countries: frozenset[str] = frozenset()
    denied_prefixes: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: list[ListEntry]) -> AccountLists:
        def pick(name: ListName, kind: EntryKind) -> frozenset[str]:
            return frozenset(e.value for e in entries if e.list is name and e.kind is kind)

        return cls(
            safe_numbers=pick(ListName.SAFE, EntryKind.NUMBER),
            safe_prefixes=pick(ListName.SAFE, EntryKind.PREFIX),
            denied_countries=pick(ListName.DENY, EntryKind.COUNTRY),
            denied_prefixes=pick(ListName.DENY, EntryKind.PREFIX),
        )

    def is_safe(self, e164: str) -> bool:
        return e164 in self.safe_numbers or _under(e164, self.safe_prefixes)

    def denied_prefix(self, e164: str) -> bool:
        return _under(e164, self.denied_prefixes)


def _under(e164: str, prefixes: frozenset[str]) -> bool:
    """Whether the number starts with one of ``prefixes`` (any length a caller listed)."""
    return any(e164.startswith(p) for p in prefixes) if prefixes else False
