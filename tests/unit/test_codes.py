"""Codes: generation (S1), normalisation (S3), keyed digests bound to id and context (S2, S5),
sealed copies."""

from __future__ import annotations

import collections
import doctest
import secrets

import pytest

from otpgate.domain import codes
from otpgate.domain.codes import (
    ALPHANUMERIC_ALPHABET,
    CodeVault,
    generate_code,
    normalize_code,
    presented_code,
    validate_custom_code,
)
from otpgate.domain.model import CodeType
from otpgate.errors import InvalidRequest


def vault() -> CodeVault:
    return CodeVault(digest_key=b"d" * 32, sealing_key=b"s" * 32)


def test_doctests() -> None:
    assert doctest.testmod(codes).failed == 0


def test_numeric_codes_are_uniform_and_keep_leading_zeros() -> None:
    samples = [generate_code(6) for _ in range(100_000)]
    assert all(len(c) == 6 and c.isdigit() for c in samples)
    assert any(c.startswith("0") for c in samples)
    digits = collections.Counter("".join(samples))
    expected = 600_000 / 10
    chi_square = sum((digits[d] - expected) ** 2 / expected for d in "0123456789")
    # 9 degrees of freedom: a fair source exceeds 45 about once in a million runs, while a
    # biased one (a modulo bias, a digit left out) lands in the hundreds over 600,000 digits.
    assert chi_square < 45, digits
    # Every position is uniform too, not just the total.
    for position in range(6):
        column = collections.Counter(c[position] for c in samples)
        assert min(column.values()) > 9_000 and max(column.values()) < 11_000


def test_alphanumeric_codes_avoid_look_alikes() -> None:
    samples = "".join(generate_code(10, CodeType.ALPHANUMERIC) for _ in range(5_000))
    assert set(samples) == set(ALPHANUMERIC_ALPHABET)
    assert not set(samples) & set("01OI")


@pytest.mark.parametrize("length", [3, 11, 0, -1])
def test_code_length_outside_4_to_10_is_refused(length: int) -> None:
    with pytest.raises(InvalidRequest):
        generate_code(length)


@pytest.mark.parametrize(
    ("typed", "code_type", "expected"),
    [
        ("123 456", CodeType.NUMERIC, "123456"),
        ("123-456", CodeType.NUMERIC, "123456"),
        ("\t123456 ", CodeType.NUMERIC, "123456"),
        ("ab-cd 23", CodeType.ALPHANUMERIC, "ABCD23"),
    ],
)
def test_normalize(typed: str, code_type: CodeType, expected: str) -> None:
    assert normalize_code(typed, code_type) == expected


@pytest.mark.parametrize(
    "typed",
    [
        "٤٠٧٢١٥",  # Arabic-Indic
        "۴۰۷۲۱۵",  # Extended Arabic-Indic (Persian)
        "४०७२१५",  # Devanagari
        "৪০৭২১৫",  # Bengali
        "４０７２１５",  # full-width
        "407\u00a0215",  # no-break space
        "407\u202f215",  # narrow no-break space
        "407\u2009215",  # thin space
        "407\u200b215",  # zero-width space
        "\ufeff407215",  # byte-order mark
        "407\u2013215",  # en dash
        "407\u2014215",  # em dash
        "407\u2212215",  # minus sign
        "407\u2010215",  # hyphen
        "407\uff0d215",  # full-width hyphen-minus
        "407\n215\r",
        "４0७-٢1５",  # all at once
    ],
)
def test_digits_of_any_script_spaces_and_dashes_of_any_kind(typed: str) -> None:
    assert normalize_code(typed, CodeType.NUMERIC) == "407215"
    assert presented_code(typed) == "407215"


def test_full_width_letters_are_letters() -> None:
    assert normalize_code("ａｂ２ｃ", CodeType.ALPHANUMERIC) == "AB2C"


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "-",
        " – ",
        "\u00a0",
        "\u200b\u200b",
        "12.34",
        "1234!",
        "12\x0034",
        "１２٣",
        "123",
        "1" * 11,
        # Look-alikes that compatibility folding would have turned into a code:
        "²²⁹¹⁶⁴",  # superscript digits
        "①②③④⑤⑥",  # circled digits
        "Ⅻ1234",  # a Roman numeral
        "ﬁ1234",  # a ligature ("FI" once upper-cased by Unicode's rules)
        "ßß1234",  # "SSSS" by Unicode's rules
        "ı12345",  # a dotless i ("I")
    ],
)
def test_what_cannot_be_any_code_is_refused(presented: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        presented_code(presented)
    assert refused.value.param == "code"


@pytest.mark.parametrize("presented", [None, 123456, ["123456"], "1" * 65])
def test_what_is_not_a_short_string_is_refused(presented: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        presented_code(presented)
    assert refused.value.param == "code"


def test_normalising_twice_changes_nothing() -> None:
    once = presented_code(" ４٠७-ab ")
    assert once == "407AB" and presented_code(once) == once


@pytest.mark.parametrize(
    ("code", "length", "code_type", "ok"),
    [
        ("123456", 6, CodeType.NUMERIC, True),
        ("12345", 6, CodeType.NUMERIC, False),
        ("12345A", 6, CodeType.NUMERIC, False),
        ("abcd2345", 8, CodeType.ALPHANUMERIC, True),
        ("ABCD0345", 8, CodeType.ALPHANUMERIC, False),  # 0 is a look-alike
        ("ABCDI345", 8, CodeType.ALPHANUMERIC, False),
    ],
)
def test_custom_codes_follow_the_service_rules(
    code: str, length: int, code_type: CodeType, ok: bool
) -> None:
    if ok:
        assert validate_custom_code(code, length=length, code_type=code_type) == code.upper()
    else:
        with pytest.raises(InvalidRequest) as refused:
            validate_custom_code(code, length=length, code_type=code_type)
        assert refused.value.param == "custom_code"


def test_digest_is_bound_to_verification_code_and_context() -> None:
    v = vault()
    base = v.digest("ver_a", "123456", {"amount": "1.00", "payee": "Shop"})
    assert len(base) == 32
    assert v.matches(base, "ver_a", "123456", {"payee": "Shop", "amount": "1.00"})
    assert not v.matches(base, "ver_b", "123456", {"amount": "1.00", "payee": "Shop"})
    assert not v.matches(base, "ver_a", "123457", {"amount": "1.00", "payee": "Shop"})
    assert not v.matches(base, "ver_a", "123456", {"amount": "1.01", "payee": "Shop"})
    assert not v.matches(base, "ver_a", "123456", None)
    other_key = CodeVault(digest_key=b"e" * 32, sealing_key=b"s" * 32)
    assert not other_key.matches(base, "ver_a", "123456", {"amount": "1.00", "payee": "Shop"})


def test_digest_fields_cannot_run_into_each_other() -> None:
    v = vault()
    assert v.digest("ver_a1", "23456") != v.digest("ver_a", "123456")


def test_sealed_code_round_trips_and_resists_tampering_and_moves() -> None:
    v = vault()
    sealed = v.seal("ver_a", "123456")
    assert b"123456" not in sealed
    assert v.seal("ver_a", "123456") != sealed  # fresh nonce each time
    assert v.unseal("ver_a", sealed) == "123456"
    with pytest.raises(ValueError, match="authenticate"):
        v.unseal("ver_b", sealed)  # moved to another row
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(ValueError, match="authenticate"):
        v.unseal("ver_a", bytes(flipped))
    other = CodeVault(digest_key=b"d" * 32, sealing_key=secrets.token_bytes(32))
    with pytest.raises(ValueError, match="authenticate"):
        other.unseal("ver_a", sealed)


def test_vault_refuses_short_keys_and_hides_them() -> None:
    with pytest.raises(ValueError, match="digest_key"):
        CodeVault(digest_key=b"short", sealing_key=b"s" * 32)
    assert "d" * 8 not in repr(vault())
