"""Table tests for otpgate.domain.sms, with the vectors of reference/sms.md."""

from __future__ import annotations

import doctest
from typing import Any

import pytest

from otpgate.domain import sms
from otpgate.domain.sms import (
    BUILTIN_TEMPLATES,
    CONTEXT_KEYS,
    CONTEXT_VALUE_MAX_LENGTH,
    GSM7,
    MAX_BRAND_LENGTH,
    UCS2,
    SmsShape,
    is_gsm7,
    measure,
    render_message,
    select_template,
    validate_android_app_hash,
    validate_sender_id,
    validate_template,
    validate_webotp_domain,
)
from otpgate.errors import InvalidRequest

EMOJI = "\U0001f600"  # outside the BMP: a surrogate pair in UTF-16


def test_doctests() -> None:
    result = doctest.testmod(sms, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0


# --- measure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "encoding", "units", "segments"),
    [
        # reference/sms.md vectors
        ("a" * 160, GSM7, 160, 1),
        ("a" * 161, GSM7, 161, 2),
        ("a" * 306, GSM7, 306, 2),
        ("a" * 307, GSM7, 307, 3),
        ("Ж" * 70, UCS2, 70, 1),
        ("Ж" * 71, UCS2, 71, 2),
        ("Ж" * 134, UCS2, 134, 2),
        ("Ж" * 135, UCS2, 135, 3),
        ("€", GSM7, 2, 1),
        ("{a}", GSM7, 5, 1),
        ("a" * 100 + "—", UCS2, 101, 2),
        # edges
        ("", GSM7, 0, 1),
        ("€" * 80, GSM7, 160, 1),
        ("€" * 81, GSM7, 162, 2),
        # an escape pair at a part boundary moves whole to the next part: 152 | 2+151 | 1
        ("a" * 152 + "€" + "a" * 152, GSM7, 306, 3),
        ("a" * 152 + "€" + "a" * 10, GSM7, 164, 2),
        ("a" * 159 + "€", GSM7, 161, 2),  # 153 | 6 + 2
        # a surrogate pair counts 2 units and is never split: 66 | 2+65 | 1
        (EMOJI, UCS2, 2, 1),
        (EMOJI * 35, UCS2, 70, 1),
        (EMOJI * 36, UCS2, 72, 2),
        ("a" * 66 + EMOJI + "a" * 66, UCS2, 134, 3),
        ("a" * 67 + EMOJI, UCS2, 69, 1),
        # in UCS-2 the GSM extension characters are one unit each
        ("Ж€{", UCS2, 3, 1),
    ],
)
def test_measure(text: str, encoding: str, units: int, segments: int) -> None:
    assert measure(text) == SmsShape(encoding, units, segments)


@pytest.mark.parametrize("char", list("\f^{}\\[~]|€"))
def test_extension_characters_cost_two_septets(char: str) -> None:
    assert measure(char) == SmsShape(GSM7, 2, 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@£$¥èéùìòÇ\nØø\rÅå", True),
        ("ΔΦΓΛΩΠΨΣΘΞ_ÆæßÉ", True),
        (" !\"#¤%&'()*+,-./0123456789:;<=>?", True),
        ("¡ABCXYZÄÖÑÜ§¿abcxyzäöñüà", True),
        ("\f^{}\\[~]|€", True),
        ("Hola, tu codigo es 1234", True),
        ("Código", False),  # ó is not in GSM 03.38
        ("ç", False),  # only the capital Ç is
        ("`", False),
        ("\x1b", False),  # the escape itself is not a character
        ("\u2014", False),  # em dash
        ("\u201cquoted\u201d", False),  # curly quotes
        ("Ж", False),
        (EMOJI, False),
        ("\u0391", False),  # Greek capital alpha, a Latin look-alike outside the table
    ],
)
def test_is_gsm7(text: str, expected: bool) -> None:
    assert is_gsm7(text) is expected


# --- render_message ----------------------------------------------------------------------------


def test_render_plain() -> None:
    text = render_message(
        "{brand} code {code}, {minutes} min", brand="Acme", code="123456", minutes=10
    )
    assert text == "Acme code 123456, 10 min"


def test_render_appends_hash_then_webotp_line_last() -> None:
    text = render_message(
        "{brand}: {code}",
        brand="Acme",
        code="042042",
        minutes=5,
        webotp_domain="login.acme.com",
        android_app_hash="FA+9qCX9VSu",
    )
    assert text.split("\n") == ["Acme: 042042", "FA+9qCX9VSu", "@login.acme.com #042042"]
    assert text.rsplit("\n", 1)[-1] == "@login.acme.com #042042"


@pytest.mark.parametrize(
    ("webotp_domain", "android_app_hash", "last_lines"),
    [
        (None, None, ["X 1234"]),
        ("acme.com", None, ["X 1234", "@acme.com #1234"]),
        (None, "FA+9qCX9VSu", ["X 1234", "FA+9qCX9VSu"]),
    ],
)
def test_render_autofill_lines(
    webotp_domain: str | None, android_app_hash: str | None, last_lines: list[str]
) -> None:
    text = render_message(
        "X {code}",
        brand="B",
        code="1234",
        minutes=1,
        webotp_domain=webotp_domain,
        android_app_hash=android_app_hash,
    )
    assert text.split("\n") == last_lines


def test_render_context_and_literal_braces() -> None:
    text = render_message(
        "{{{code}}} {amount} to {payee}",
        brand="B",
        code="1234",
        minutes=1,
        context={"amount": "12.50 EUR", "payee": "Tienda SL"},
    )
    assert text == "{1234} 12.50 EUR to Tienda SL"


def test_render_missing_context_is_empty_and_values_are_not_reparsed() -> None:
    text = render_message("{brand}|{code}|{amount}|{payee}", brand="{code}", code="9", minutes=1)
    assert text == "{code}|9||"


# --- select_template ---------------------------------------------------------------------------

EN, ES = BUILTIN_TEMPLATES["en"], BUILTIN_TEMPLATES["es"]


@pytest.mark.parametrize(
    ("overrides", "locale", "default_locale", "with_context", "expected"),
    [
        ({}, "en", "en", False, EN["default"]),
        ({}, "en", "en", True, EN["transaction"]),
        ({}, "es", "en", False, ES["default"]),
        ({}, "es-MX", "en", False, ES["default"]),  # language part
        ({}, "es_mx", "en", True, ES["transaction"]),
        ({}, "sv", "es", False, ES["default"]),  # default locale's built-in
        ({}, "sv", "es-AR", True, ES["transaction"]),  # default locale's language
        ({}, "sv", "ja", False, EN["default"]),  # finally English
        ({}, "pt-BR", "en", False, BUILTIN_TEMPLATES["pt"]["default"]),
        ({}, "nl_BE", "en", True, BUILTIN_TEMPLATES["nl"]["transaction"]),
        ({"es": "O {code}"}, "es", "en", False, "O {code}"),
        ({"es": "O {code}"}, "es-MX", "en", False, "O {code}"),
        ({"es-MX": "MX {code}", "es": "O {code}"}, "es-MX", "en", False, "MX {code}"),
        ({"es-mx": "MX {code}"}, "ES-MX", "en", False, "MX {code}"),
        ({"es": "O {code}"}, "es", "en", True, ES["transaction"]),  # plain override not used
        ({"es.transaction": "T {code}"}, "es", "en", True, "T {code}"),
        ({"es.transaction": "T {code}"}, "es", "en", False, ES["default"]),
        ({"es.transaction": "T {code}"}, "es-CL", "en", True, "T {code}"),
        ({"fr": "F {code}"}, "sv", "fr", False, "F {code}"),  # default locale's override
        ({"fr": "F {code}"}, "es", "fr", False, ES["default"]),  # built-in for locale first
    ],
)
def test_select_template(
    overrides: dict[str, str],
    locale: str,
    default_locale: str,
    with_context: bool,
    expected: str,
) -> None:
    assert (
        select_template(
            overrides=overrides,
            locale=locale,
            default_locale=default_locale,
            with_context=with_context,
        )
        == expected
    )


# --- built-in templates ------------------------------------------------------------------------

BUILTINS = [
    pytest.param(template, kind, id=f"{locale}-{kind}")
    for locale, kinds in BUILTIN_TEMPLATES.items()
    for kind, template in kinds.items()
]


def test_builtin_locales_and_kinds() -> None:
    assert BUILTIN_TEMPLATES.keys() == {"en", "es", "fr", "de", "it", "pt", "ca", "nl"}
    for kinds in BUILTIN_TEMPLATES.values():
        assert kinds.keys() == {"default", "transaction"}


@pytest.mark.parametrize(("template", "kind"), BUILTINS)
def test_builtin_is_gsm7_and_fits_one_segment_in_the_worst_case(template: str, kind: str) -> None:
    assert is_gsm7(template)
    if kind == "transaction":
        assert "{amount}" in template
        assert "{payee}" in template
    # Longest brand, 10-char code, 4-digit minutes (1440), 32-char context values, both autofill
    # lines with a 40-character host: all at once.
    validate_template(
        template,
        brand="W" * MAX_BRAND_LENGTH,
        code_length=10,
        max_minutes=1440,
        webotp_domain="h" * 36 + ".com",
        android_app_hash="FA+9qCX9VSu",
    )
    worst = render_message(
        template,
        brand="W" * MAX_BRAND_LENGTH,
        code="W" * 10,
        minutes=1440,
        context=dict.fromkeys(CONTEXT_KEYS, "W" * CONTEXT_VALUE_MAX_LENGTH),
        webotp_domain="h" * 36 + ".com",
        android_app_hash="FA+9qCX9VSu",
    )
    assert measure(worst).segments == 1
    assert measure(worst).encoding == GSM7


WORST_HOST = "h" * 36 + ".com"  # 40 characters: the longest host the built-ins are proven with


@pytest.mark.parametrize(("template", "kind"), BUILTINS)
@pytest.mark.parametrize("brand_length", [30, MAX_BRAND_LENGTH])
@pytest.mark.parametrize(
    ("webotp_domain", "android_app_hash"),
    [(None, None), (WORST_HOST, None), (None, "FA+9qCX9VSu"), (WORST_HOST, "FA+9qCX9VSu")],
)
def test_builtin_fits_one_gsm7_segment_with_each_autofill_combination(
    template: str,
    kind: str,
    brand_length: int,
    webotp_domain: str | None,
    android_app_hash: str | None,
) -> None:
    # A 10-character code of the widest alphabet, the brand at 30 and at the longest name a
    # service may have, 4-digit minutes, 32-character context values.
    text = render_message(
        template,
        brand="W" * brand_length,
        code="W" * 10,
        minutes=1440,
        context=dict.fromkeys(CONTEXT_KEYS, "W" * CONTEXT_VALUE_MAX_LENGTH),
        webotp_domain=webotp_domain,
        android_app_hash=android_app_hash,
    )
    shape = measure(text)
    assert shape.encoding == GSM7
    assert shape.units <= 160
    assert shape.segments == 1
    if webotp_domain:
        assert text.endswith(f"\n@{webotp_domain} #WWWWWWWWWW")


def test_builtin_worst_case_is_within_one_segment_by_a_measured_margin() -> None:
    # The figure docs/api.md quotes: the fullest built-in in the worst case, in septets.
    worst = max(
        measure(
            render_message(
                template,
                brand="W" * MAX_BRAND_LENGTH,
                code="W" * 10,
                minutes=1440,
                context=dict.fromkeys(CONTEXT_KEYS, "W" * CONTEXT_VALUE_MAX_LENGTH),
                webotp_domain=WORST_HOST,
                android_app_hash="FA+9qCX9VSu",
            )
        ).units
        for kinds in BUILTIN_TEMPLATES.values()
        for template in kinds.values()
    )
    assert worst == 160


@pytest.mark.parametrize(("template", "kind"), BUILTINS)
def test_builtin_keeps_every_placeholder_it_needs(template: str, kind: str) -> None:
    assert "{code}" in template
    if kind == "default":
        assert "{brand}" in template
        assert "{minutes}" in template
    rendered = render_message(
        template,
        brand="Acme",
        code="407215",
        minutes=10,
        context={"amount": "5 EUR", "payee": "Bob"},
    )
    assert "{" not in rendered and "}" not in rendered
    assert "407215" in rendered


@pytest.mark.parametrize(
    ("word_in_gsm7", "word_outside"),
    [("codigo", "código"), ("Valido", "Válido"), ("Nao", "Não"), ("Vàlid", "Vâlid")],
)
def test_one_accent_outside_gsm7_would_make_a_builtin_ucs2_and_two_segments(
    word_in_gsm7: str, word_outside: str
) -> None:
    # Why the built-ins drop some accents: the same worst case in UCS-2 needs several parts.
    (template,) = [
        t for kinds in BUILTIN_TEMPLATES.values() for t in kinds.values() if word_in_gsm7 in t
    ][:1]
    accented = template.replace(word_in_gsm7, word_outside, 1)
    text = render_message(accented, brand="W" * 30, code="W" * 10, minutes=10)
    assert measure(text).encoding == UCS2
    assert measure(text).segments >= 2


# --- validate_template -------------------------------------------------------------------------


def _validate(
    template: str,
    *,
    brand: str = "Acme",
    code_length: int = 6,
    max_minutes: int = 10,
    webotp_domain: str | None = None,
    android_app_hash: str | None = None,
    param: str = "templates",
) -> None:
    validate_template(
        template,
        brand=brand,
        code_length=code_length,
        max_minutes=max_minutes,
        webotp_domain=webotp_domain,
        android_app_hash=android_app_hash,
        param=param,
    )


@pytest.mark.parametrize(
    "template",
    [
        "{code}",
        "{brand}: {code}, {minutes} min",
        "{code} {amount} {payee}",
        "{{literal}} {code}",
        "Код {code}",
        "{code} " + "a" * 153,  # 6 + 1 + 153 = 160
    ],
)
def test_validate_template_accepts(template: str) -> None:
    _validate(template)


@pytest.mark.parametrize(
    ("template", "overrides", "detail_part"),
    [
        ("Your verification code", {}, "{code}"),
        ("{{code}}", {}, "{code}"),  # a literal, not the placeholder
        ("{code} {name}", {}, "unknown placeholder {name}"),
        ("{code} {Code}", {}, "unknown placeholder"),
        ("{code} {code:>8}", {}, "unknown placeholder"),
        ("{code} {}", {}, "brace"),
        ("{code} {", {}, "brace"),
        ("{code} }", {}, "brace"),
        ("{code} {brand", {}, "brace"),
        # too long for one GSM-7 part
        ("{code} " + "a" * 154, {}, "too long"),
        ("{code} " + "a" * 150, {"code_length": 10}, "too long"),
        ("{code} {minutes} " + "a" * 149, {"max_minutes": 1440}, "too long"),
        ("{code} {amount} {payee} " + "a" * 88, {}, "too long"),  # 6+1+32+1+32+1+88 = 161
        ("{brand} {code} " + "a" * 110, {"brand": "B" * 50}, "too long"),
        ("{code} " + "a" * 100, {"webotp_domain": "h" * 50 + ".com"}, "autofill"),
        ("{code} " + "a" * 145, {"android_app_hash": "FA+9qCX9VSu"}, "too long"),
        # UCS-2: one part is 70 units
        ("Код {code} " + "Ж" * 60, {}, "UCS-2"),
        ("Код {code} {amount}" + "Ж" * 28, {}, "UCS-2"),  # UCS-2 filler: 4+6+1+32+28
        ("{brand}: {code} " + "a" * 60, {"brand": "Щит"}, "UCS-2"),  # a UCS-2 brand
        ("{code} " + "a" * 62 + EMOJI, {}, "UCS-2"),  # 6+1+62+2
    ],
)
def test_validate_template_refuses(
    template: str, overrides: dict[str, Any], detail_part: str
) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        _validate(template, **overrides)
    assert excinfo.value.param == "templates"
    assert detail_part in excinfo.value.detail


def test_validate_template_names_the_given_param() -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        _validate("no code", param="templates.es")
    assert excinfo.value.param == "templates.es"


def test_validate_template_exact_fit_with_autofill() -> None:
    # Pad the body so that, with the hash line and the WebOTP line, the message is exactly
    # 160 septets (140 bytes packed); one more character is refused.
    lines = 1 + 11 + 1 + len("@acme.com #") + 6
    template = "{code} " + "a" * (160 - lines - 7)
    _validate(template, webotp_domain="acme.com", android_app_hash="FA+9qCX9VSu")
    with pytest.raises(InvalidRequest):
        _validate(template + "a", webotp_domain="acme.com", android_app_hash="FA+9qCX9VSu")


# --- sender ids, WebOTP host, Android hash -----------------------------------------------------


@pytest.mark.parametrize(
    ("sender_id", "expected"),
    [
        ("A", "A"),
        ("Acme", "Acme"),
        ("Acme Bank", "Acme Bank"),
        ("ACME2FA", "ACME2FA"),
        ("Abcdefghijk", "Abcdefghijk"),  # 11 characters
        ("1Bank", "1Bank"),
        ("34600000000", "34600000000"),
        ("+34600000000", "34600000000"),
        ("+123456789012345", "123456789012345"),  # 15 digits
        ("123456789012345", "123456789012345"),
        ("1", "1"),
    ],
)
def test_sender_id_accepted(sender_id: str, expected: str) -> None:
    assert validate_sender_id(sender_id) == expected


@pytest.mark.parametrize(
    "sender_id",
    [
        "",
        " ",
        "+",
        "Abcdefghijkl",  # 12 characters
        "Acme-Bank",
        "Acme_Bank",
        "Acmé",
        "Acme!",
        "+1234567890123456",  # 16 digits
        "1234567890123456",
        "+34 600 000 000",
        "++34600",
        "+Acme",
        "١٢٣",  # Arabic-Indic digits
        "Acme\n",
    ],
)
def test_sender_id_refused(sender_id: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        validate_sender_id(sender_id)
    assert excinfo.value.param == "sender_id"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "example.com"),
        ("Login.Example.COM", "login.example.com"),
        ("a-b.c0.example", "a-b.c0.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("localhost", "localhost"),
        (" example.com ", "example.com"),
    ],
)
def test_webotp_domain_accepted(host: str, expected: str) -> None:
    assert validate_webotp_domain(host) == expected


@pytest.mark.parametrize(
    "host",
    [
        "https://x.com",
        "x.com:443",
        "x.com/path",
        "x.com?q=1",
        "user@x.com",
        "",
        "x.com.",
        ".x.com",
        "x..com",
        "-x.com",
        "x-.com",
        "x_y.com",
        "bücher.example",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 4),  # 255 characters
        "x .com",
    ],
)
def test_webotp_domain_refused(host: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        validate_webotp_domain(host)
    assert excinfo.value.param == "webotp_domain"


@pytest.mark.parametrize("value", ["FA+9qCX9VSu", "abcdefghijk", "00000000000", "a/b+c/d+e/f"])
def test_android_app_hash_accepted(value: str) -> None:
    assert validate_android_app_hash(value) == value


@pytest.mark.parametrize(
    "value",
    ["", "FA+9qCX9VS", "FA+9qCX9VSuX", "FA+9qCX9VS=", "FA+9qCX9VS-", "FA+9qCX9VS ", "ÅA+9qCX9VSu"],
)
def test_android_app_hash_refused(value: str) -> None:
    with pytest.raises(InvalidRequest) as excinfo:
        validate_android_app_hash(value)
    assert excinfo.value.param == "android_app_hash"
