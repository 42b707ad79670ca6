"""Credits, prices and billing modes: pure arithmetic, no I/O.

Credits are what a message costs and what a prepaid account holds (LabsMobile's unit: a
price such as ``0.07`` per SMS segment, a balance such as ``123.45``). otpgate counts them in
whole *units* of 1/10,000 credit, so that every sum, debit and refund is exact integer
arithmetic, in Python and in SQL alike, and renders them as decimal text.

>>> parse_credits("1.5", param="credits")
15000
>>> credits_text(15000), credits_text(700), credits_text(0), credits_text(-2500)
('1.5', '0.07', '0', '-0.25')
>>> message_price(segments=2, unit_price=15000)
30000
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from otpgate.errors import InvalidRequest

#: Units in one credit: prices and balances keep four decimals.
UNITS_PER_CREDIT = 10_000
#: The largest amount one operation may carry (a top-up, a price): 10^9 credits.
MAX_CREDITS_UNITS = 10**9 * UNITS_PER_CREDIT
_DECIMAL = re.compile(r"^(?P<int>[0-9]{1,10})(?:\.(?P<frac>[0-9]{1,4}))?$")
#: The key of the price that applies to countries without a row of their own.
DEFAULT_COUNTRY = "*"


class BillingMode(enum.StrEnum):
    """``prepaid``: sends are refused when the balance cannot cover them. ``unlimited``: never
    refused for credit; the ledger still records what each message cost."""

    PREPAID = "prepaid"
    UNLIMITED = "unlimited"


class LedgerKind(enum.StrEnum):
    TOPUP = "topup"
    DEBIT = "debit"
    REFUND = "refund"


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One movement of an account's credit. ``amount`` is signed (a debit is negative);
    ``balance`` is the account's balance right after it (unchanged for unlimited accounts)."""

    id: str
    account_id: str
    kind: LedgerKind
    amount: int
    balance: int
    created_at: datetime
    message_id: str | None = None
    note: str | None = None


def parse_credits(text: str, *, param: str, allow_zero: bool = True) -> int:
    """Units from a non-negative decimal with at most four decimals; ``InvalidRequest`` naming
    ``param`` for anything else (a sign, an exponent, five decimals, a huge number)."""
    match = _DECIMAL.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise InvalidRequest(
            f"{param} must be a number of credits such as 1 or 0.0725 (at most 4 decimals)",
            param=param,
        )
    units = int(match["int"]) * UNITS_PER_CREDIT + int((match["frac"] or "").ljust(4, "0"))
    if units > MAX_CREDITS_UNITS:
        raise InvalidRequest(
            f"{param} is larger than {MAX_CREDITS_UNITS // UNITS_PER_CREDIT}", param=param
        )
    if units == 0 and not allow_zero:
        raise InvalidRequest(f"{param} must be more than 0", param=param)
    return units


def credits_text(units: int) -> str:
    """Units as the shortest exact decimal text."""
    sign = "-" if units < 0 else ""
    whole, fraction = divmod(abs(units), UNITS_PER_CREDIT)
    digits = f"{fraction:04d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"


def cap_text(units: int | None) -> str | None:
    """A spend cap as decimal credits, or None for no cap."""
    return None if units is None else credits_text(units)


def message_price(*, segments: int, unit_price: int) -> int:
    """What a message costs: every SMS segment is charged at the destination's price."""
    return segments * unit_price


def price_for_country(prices: dict[str, int], country: str) -> int | None:
    """The destination's price per segment: its own row, else the default row (``*``), else
    None (the country cannot be billed)."""
    found = prices.get(country)
    return found if found is not None else prices.get(DEFAULT_COUNTRY)
