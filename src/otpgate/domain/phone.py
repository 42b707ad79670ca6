"""Destination numbers: parsing, validity and number type (SECURITY.md S12), with phonenumbers.

``is_valid_number`` is the test, never ``is_possible_number``: a possible number may be unassigned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

from otpgate.domain.ascii import ascii_upper
from otpgate.errors import CountryNotAllowed, InvalidPhoneNumber, UnsupportedNumberType

#: Number types that can receive an SMS code by default.
SMS_CAPABLE_TYPES = frozenset({PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE})

_TYPE_NAMES = {
    PhoneNumberType.FIXED_LINE: "fixed line",
    PhoneNumberType.TOLL_FREE: "toll free",
    PhoneNumberType.PREMIUM_RATE: "premium rate",
    PhoneNumberType.SHARED_COST: "shared cost",
    PhoneNumberType.VOIP: "VoIP",
    PhoneNumberType.PERSONAL_NUMBER: "personal number",
    PhoneNumberType.PAGER: "pager",
    PhoneNumberType.UAN: "UAN",
    PhoneNumberType.VOICEMAIL: "voicemail",
    PhoneNumberType.UNKNOWN: "unknown type",
}


@dataclass(frozen=True, slots=True)
class Destination:
    """A valid phone number: E.164 text and its ISO 3166-1 alpha-2 region."""

    e164: str
    country: str
    #: The parsed number, kept so that the type check does not parse it again.
    number: phonenumbers.PhoneNumber | None = field(default=None, compare=False, repr=False)

    @property
    def msisdn(self) -> str:
        """Digits with the country code and no ``+`` (the LabsMobile convention)."""
        return self.e164[1:]


def parse_phone(raw: str, country: str | None = None) -> Destination:
    """Parse E.164 (``+34600000000``) or a national number with ``country``.

    Raises ``InvalidPhoneNumber`` (param ``to``) unless the number is valid and assigned.

    >>> parse_phone("+34 600 00 00 00").e164
    '+34600000000'
    >>> parse_phone("612345678", "ES").country
    'ES'
    """
    text = raw.strip()
    region = ascii_upper(country) if country else None
    if not text.startswith("+") and region is None:
        raise InvalidPhoneNumber(
            "a number without '+' needs 'country' (ISO 3166-1 alpha-2)", param="to"
        )
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        raise InvalidPhoneNumber(f"not a phone number: {exc.args[0]}", param="to") from exc
    if not phonenumbers.is_valid_number(number):
        raise InvalidPhoneNumber("not a valid, assigned phone number", param="to")
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Destination(
        e164=e164, country=phonenumbers.region_code_for_number(number) or "ZZ", number=number
    )


def require_sms_capable(destination: Destination, *, allow_voip: bool = False) -> None:
    """Refuse numbers that cannot (or should not) receive an SMS code: fixed lines, premium
    rate, shared cost, toll free, UAN, pager, voicemail; VoIP only when ``allow_voip``."""
    number = destination.number or phonenumbers.parse(destination.e164)
    number_type = phonenumbers.number_type(number)
    if number_type in SMS_CAPABLE_TYPES or (allow_voip and number_type == PhoneNumberType.VOIP):
        return
    kind = _TYPE_NAMES.get(number_type, "unsupported type")
    raise UnsupportedNumberType(f"{kind} numbers cannot receive SMS codes", param="to")


#: Number types a call can reach with a spoken code.
VOICE_CAPABLE_TYPES = SMS_CAPABLE_TYPES | {PhoneNumberType.FIXED_LINE}


def require_voice_capable(destination: Destination) -> None:
    """Refuse numbers a code call should not ring: premium rate, shared cost, toll free,
    pagers, voicemail, VoIP (S12); mobiles and fixed lines are called."""
    number = destination.number or phonenumbers.parse(destination.e164)
    number_type = phonenumbers.number_type(number)
    if number_type in VOICE_CAPABLE_TYPES:
        return
    kind = _TYPE_NAMES.get(number_type, "unsupported type")
    raise UnsupportedNumberType(f"{kind} numbers cannot receive code calls", param="to")


def require_allowed_country(destination: Destination, allowed: tuple[str, ...] | None) -> None:
    """Geo permissions: ``None`` allows every country."""
    if allowed is not None and destination.country not in allowed:
        raise CountryNotAllowed(
            f"destination country {destination.country} is not allowed for this service",
            param="to",
        )


def country_of(e164: str) -> str | None:
    """The ISO 3166-1 alpha-2 region of a stored E.164 number, or None when it has none (an
    e-mail address, a non-geographic number).

    >>> country_of("+34600000000")
    'ES'
    """
    try:
        number = phonenumbers.parse(e164, None)
    except NumberParseException:
        return None
    region = phonenumbers.region_code_for_number(number)
    return region if region and region != "001" else None


def is_region(code: str) -> bool:
    """Whether ``code`` (upper-case ISO 3166-1 alpha-2) is a region libphonenumber numbers
    belong to: assigned codes such as ``ES``, not ``XX`` or ``ZZ``.

    >>> is_region("ES"), is_region("XX"), is_region("es")
    (True, False, False)
    """
    return code in phonenumbers.SUPPORTED_REGIONS


def mask(e164: str) -> str:
    """A destination fit for logs: country code and last three digits only.

    >>> mask("+34600123456")
    '+34******456'
    """
    if "@" in e164:  # an e-mail address: its first character and its domain
        local, _, domain = e164.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if len(e164) < 7:
        return "***"
    return e164[:3] + "*" * (len(e164) - 6) + e164[-3:]


def calling_code_of(destination: Destination) -> str:
    """The number's country calling code with its ``+`` (``+63``); the whole +1 plan for
    every NANP country.

    >>> calling_code_of(parse_phone("+63 917 555 1234"))
    '+63'
    """
    number = destination.number or phonenumbers.parse(destination.e164)
    return f"+{number.country_code}"
