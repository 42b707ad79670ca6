"""Prices and prepaid credit: what a message costs, the operator's price table, top-ups and
the ledger.

A price applies once the operator has loaded a price table (``otpgate prices import``): every
message then costs its segments × its destination country's price (or the ``*`` row's), is
debited from a prepaid account atomically with its insert, and is recorded in the ledger of
every account. Without a price table messages carry no price and nothing is debited. A prepaid
account cannot send to a country the table has no price for (it could not be billed); an
unlimited one can, unpriced.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import phonenumbers
import pycountry

from otpgate.domain.ascii import ascii_upper
from otpgate.domain.billing import (
    DEFAULT_COUNTRY,
    BillingMode,
    LedgerEntry,
    message_price,
    parse_credits,
    price_for_country,
)
from otpgate.domain.model import Account, Principal
from otpgate.domain.ports import BillingStore, Clock, Page, PriceStore
from otpgate.errors import CountryNotAllowed, InvalidRequest, NotFound
from otpgate.services.cache import TtlCache

_TABLE_KEY = "prices"
MAX_NOTE_LENGTH = 200


@dataclass(frozen=True, slots=True)
class CountryPrice:
    """A row of the price list as the API shows it."""

    country: str
    prefix: str | None
    name: str
    unit_price: int


def country_name(code: str) -> str:
    """The English short name of an ISO 3166-1 alpha-2 code (``*``: every other country)."""
    if code == DEFAULT_COUNTRY:
        return "Every other country"
    found = pycountry.countries.get(alpha_2=code)
    return code if found is None else str(getattr(found, "common_name", found.name))


def calling_code(code: str) -> str | None:
    """The country's calling code without ``+`` (None for ``*``)."""
    if code == DEFAULT_COUNTRY:
        return None
    number = phonenumbers.country_code_for_region(code)
    return str(number) if number else None


def known_country(code: str) -> bool:
    """A country otpgate can send to: a region phonenumbers knows, with an ISO 3166 entry."""
    return (
        code in phonenumbers.SUPPORTED_REGIONS and pycountry.countries.get(alpha_2=code) is not None
    )


def parse_price_file(text: str) -> dict[str, int]:
    """A price table from CSV text with the header ``country,credits``; ``InvalidRequest``
    naming the line for an unknown country, a negative or malformed price, a repeated country
    or a missing header. The whole file is checked before anything is replaced."""
    reader = csv.reader(io.StringIO(text))
    rows = [row for row in reader]
    if not rows or [cell.strip().lower() for cell in rows[0]] != ["country", "credits"]:
        raise InvalidRequest("the first line must be the header country,credits", param="line 1")
    table: dict[str, int] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"line {number}"
        if len(row) != 2:
            raise InvalidRequest(f"{where}: expected two fields, country and credits", param=where)
        country, credits = ascii_upper(row[0].strip()), row[1].strip()
        if country != DEFAULT_COUNTRY and not known_country(country):
            raise InvalidRequest(
                f"{where}: {country!r} is not an ISO 3166-1 alpha-2 country code otpgate knows",
                param=where,
            )
        if credits.startswith("-"):
            raise InvalidRequest(f"{where}: a price cannot be negative", param=where)
        try:
            units = parse_credits(credits, param="the price")
        except InvalidRequest as exc:
            raise InvalidRequest(f"{where}: {exc.detail}", param=where) from None
        if country in table:
            raise InvalidRequest(f"{where}: {country} appears twice", param=where)
        table[country] = units
    return table


class Billing:
    def __init__(
        self,
        *,
        prices: PriceStore,
        credit: BillingStore,
        clock: Clock,
        cache: TtlCache[dict[str, int]] | None = None,
    ) -> None:
        self._prices = prices
        self._credit = credit
        self._clock = clock
        # Every send reads the table; the operator changes it rarely. An import through this
        # process applies at once, one through another within the cache's lifetime.
        self._cache = cache or TtlCache(0)

    # --- prices ------------------------------------------------------------------------------

    async def _table(self) -> dict[str, int]:
        table = await self._cache.get(_TABLE_KEY, self._prices.price_table)
        return table or {}

    async def price(self, account: Account, *, country: str, segments: int) -> int | None:
        """What a message of ``segments`` to ``country`` costs ``account``, in units; None when
        no price table is loaded, or when the country has no price and the account is
        unlimited. ``CountryNotAllowed`` for a prepaid account and a country without a price
        (it could not be billed)."""
        table = await self._table()
        if not table:
            return None
        unit_price = price_for_country(table, country)
        if unit_price is None:
            if account.billing is BillingMode.PREPAID:
                raise CountryNotAllowed(
                    f"there is no price for {country}, so this account cannot send there",
                    param="to",
                )
            return None
        return message_price(segments=segments, unit_price=unit_price)

    async def import_prices(self, text: str) -> dict[str, int]:
        """Replace the whole price table with the CSV ``text`` (see ``parse_price_file``)."""
        table = parse_price_file(text)
        await self._prices.replace_prices(table, self._clock.now())
        self._cache.forget()
        return table

    async def list_prices(self, countries: Iterable[str] | None = None) -> list[CountryPrice]:
        """The price list, by country code; only ``countries`` when given (a country without a
        row of its own shows the ``*`` price when there is one, and is left out otherwise)."""
        table = await self._table()
        if countries is None:
            codes: Sequence[str] = sorted(table)
        else:
            codes = []
            for raw in countries:
                code = ascii_upper(raw.strip())
                if not (code == DEFAULT_COUNTRY or known_country(code)):
                    raise InvalidRequest(f"{raw!r} is not a country code", param="country")
                codes.append(code)
        listed = []
        for code in codes:
            unit_price = price_for_country(table, code)
            if unit_price is not None:
                listed.append(
                    CountryPrice(code, calling_code(code), country_name(code), unit_price)
                )
        return listed

    # --- credit ------------------------------------------------------------------------------

    async def add_credit(self, account_id: str, credits: str, *, note: str | None) -> LedgerEntry:
        """Top an account up by ``credits`` (decimal text, more than 0)."""
        amount = parse_credits(credits, param="credits", allow_zero=False)
        if note is not None and (len(note) > MAX_NOTE_LENGTH or not note.isprintable()):
            raise InvalidRequest(
                f"note must be at most {MAX_NOTE_LENGTH} printable characters", param="note"
            )
        entry = await self._credit.add_credit(account_id, amount, note=note, now=self._clock.now())
        if entry is None:
            raise NotFound("no such account", param="account")
        return entry

    async def ledger(
        self, principal: Principal, *, limit: int, cursor: str | None
    ) -> Page[LedgerEntry]:
        return await self._credit.list_ledger(principal.account.id, limit=limit, cursor=cursor)


def price_rows(table: Mapping[str, int]) -> list[CountryPrice]:
    """A whole table as price-list rows, by country code."""
    return [CountryPrice(c, calling_code(c), country_name(c), table[c]) for c in sorted(table)]
