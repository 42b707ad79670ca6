"""SMS text: GSM-7 / UCS-2 encoding, segment counting, templates and autofill lines.

Facts (reference/sms.md, 3GPP TS 23.038):

* GSM-7 has 128 base characters at one septet each and an extension table reached by an escape
  (form feed, ``^ { } \\ [ ~ ] |`` and ``€``) at **two** septets each.
* One character outside GSM-7 makes the whole message UCS-2, counted in UTF-16 code units
  (a character outside the BMP, such as an emoji, is two units).
* One SMS holds 160 septets or 70 units; a longer message is split into parts of 153 septets or
  67 units, and an escape pair or a surrogate pair is never split across parts.

Templates use the placeholders ``{code}``, ``{brand}``, ``{minutes}``, ``{amount}`` and ``{payee}``;
``{{`` and ``}}`` stand for literal braces. A service's template is refused unless it fits one part
with the longest values substituted and the autofill lines (Android hash, ``@host #code``) appended.

Everything here is pure: no I/O, no clock, no settings.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from otpgate.errors import InvalidRequest

GSM7 = "GSM-7"
UCS2 = "UCS-2"

#: Longest accepted value of a context placeholder ({amount}, {payee}); used for fit checks.
CONTEXT_VALUE_MAX_LENGTH = 32
#: The context keys that templates may use.
CONTEXT_KEYS = ("amount", "payee")
#: Longest service name, i.e. the longest ``{brand}`` the built-in templates are proven against.
MAX_BRAND_LENGTH = 40
#: The most parts a template may need in the worst case when the service allows multipart.
MAX_MULTIPART_SEGMENTS = 10

# GSM 03.38 default alphabet, in code-point order 0x00-0x7F. 0x1B is the escape to the extension
# table, not a character, so it is left out of the set (written here as a placeholder and removed).
_GSM_BASIC_TABLE = (
    "@£$¥èéùìòÇ\nØø\rÅå"  # 0x00-0x0F
    "\u0394_\u03a6\u0393\u039b\u03a9\u03a0\u03a8\u03a3\u0398\u039e\x1bÆæßÉ"  # 0x10-0x1F (Greek)
    " !\"#¤%&'()*+,-./"  # 0x20-0x2F (0x24 is the currency sign, not the dollar)
    "0123456789:;<=>?"  # 0x30-0x3F
    "¡ABCDEFGHIJKLMNO"  # 0x40-0x4F
    "PQRSTUVWXYZÄÖÑÜ§"  # 0x50-0x5F
    "¿abcdefghijklmno"  # 0x60-0x6F
    "pqrstuvwxyzäöñüà"  # 0x70-0x7F
)
_GSM_BASIC = frozenset(_GSM_BASIC_TABLE) - {"\x1b"}
# Extension table: each costs the escape septet plus its own.
_GSM_EXTENSION = frozenset("\f^{}\\[~]|€")

_SINGLE_PART = {GSM7: 160, UCS2: 70}
_MULTI_PART = {GSM7: 153, UCS2: 67}

_PLACEHOLDERS = ("code", "brand", "minutes", *CONTEXT_KEYS)
# One token of a template: a literal brace pair, a {name}, or a stray brace.
_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

_SENDER_ALPHANUMERIC = re.compile(r"[A-Za-z0-9 ]{1,11}")
_SENDER_NUMERIC = re.compile(r"\+?([0-9]{1,15})")
_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ANDROID_APP_HASH = re.compile(r"[A-Za-z0-9+/]{11}")


@dataclass(frozen=True, slots=True)
class SmsShape:
    """How a text travels as SMS.

    ``units`` are septets for GSM-7 (an extension character counts 2) and UTF-16 code units for
    UCS-2; ``segments`` is the number of billed parts (an empty text is one part).
    """

    encoding: str
    units: int
    segments: int


def is_gsm7(text: str) -> bool:
    """True when every character is in the GSM-7 basic or extension table.

    >>> is_gsm7("Niño 1234 €"), is_gsm7("Código 1234"), is_gsm7("code — 1234")
    (True, False, False)
    """
    return all(ch in _GSM_BASIC or ch in _GSM_EXTENSION for ch in text)


def measure(text: str) -> SmsShape:
    """Encoding, length in units and number of parts of ``text``.

    >>> measure("a" * 160)
    SmsShape(encoding='GSM-7', units=160, segments=1)
    >>> measure("{a}")
    SmsShape(encoding='GSM-7', units=5, segments=1)
    >>> measure("a" * 100 + "—")
    SmsShape(encoding='UCS-2', units=101, segments=2)
    """
    if is_gsm7(text):
        encoding = GSM7
        costs = [2 if ch in _GSM_EXTENSION else 1 for ch in text]
    else:
        encoding = UCS2
        costs = [2 if ord(ch) > 0xFFFF else 1 for ch in text]
    units = sum(costs)
    if units <= _SINGLE_PART[encoding]:
        return SmsShape(encoding, units, 1)
    # Fill parts greedily; a two-unit character that does not fit whole starts the next part,
    # because a handset cannot rejoin an escape or surrogate pair cut in two.
    limit = _MULTI_PART[encoding]
    segments, used = 1, 0
    for cost in costs:
        if used + cost > limit:
            segments, used = segments + 1, 0
        used += cost
    return SmsShape(encoding, units, segments)


def _packed_bytes(shape: SmsShape) -> int:
    """Octets on the air: septets packed 8 to 7 bytes for GSM-7, two bytes per unit for UCS-2.

    >>> _packed_bytes(SmsShape(GSM7, 160, 1)), _packed_bytes(SmsShape(UCS2, 70, 1))
    (140, 140)
    """
    return math.ceil(shape.units * 7 / 8) if shape.encoding == GSM7 else shape.units * 2


# Built-in templates. Each one is GSM-7 only and fits one part in the worst case: a brand of
# MAX_BRAND_LENGTH, a 10-character code, 4-digit minutes, 32-character context values, an Android
# hash line and the WebOTP line for a 40-character host (tests/unit/test_sms.py proves it). That
# leaves 94 septets for the text, too few for brand + code + amount + payee (114), so the
# transaction templates leave the brand to the sender id and the WebOTP line. They are written
# in GSM-7 on purpose: one accent outside it (Spanish ó, Portuguese ã, French ê) would turn the
# message into UCS-2, where one part holds 70 characters, so those words go without it; the
# accents GSM-7 has (à è é ì ò ù ä ö ü ñ) are kept.
BUILTIN_TEMPLATES: dict[str, dict[str, str]] = {
    "en": {
        "default": "{brand} code: {code}. Valid {minutes} min. Do not share it.",
        "transaction": "Code {code} confirms {amount} to {payee}",
    },
    "es": {
        "default": "{brand}: codigo {code}. Valido {minutes} min. No lo compartas.",
        "transaction": "Codigo {code} autoriza {amount} a {payee}",
    },
    "fr": {
        "default": "Code {brand}: {code}. Valable {minutes} min. Ne pas partager.",
        "transaction": "Code {code} confirme {amount} à {payee}",
    },
    "de": {
        "default": "{brand} Code: {code}. Gültig {minutes} Min. Nicht weitergeben.",
        "transaction": "Code {code} bestätigt {amount} an {payee}",
    },
    "it": {
        "default": "{brand}: codice {code}. Valido {minutes} min. Non condividere.",
        "transaction": "Codice {code} conferma {amount} a {payee}",
    },
    "pt": {
        "default": "{brand} codigo: {code}. Valido {minutes} min. Nao compartilhe.",
        "transaction": "Codigo {code} confirma {amount} a {payee}",
    },
    "ca": {
        "default": "{brand} codi: {code}. Vàlid {minutes} min. No el comparteixis.",
        "transaction": "Codi {code} autoritza {amount} a {payee}",
    },
    "nl": {
        "default": "{brand} code: {code}. Geldig {minutes} min. Deel hem niet.",
        "transaction": "Code {code} voor {amount} aan {payee}",
    },
}

_FALLBACK_LOCALE = "en"
_TRANSACTION_SUFFIX = ".transaction"


def _normalize_locale(locale: str) -> str:
    return locale.strip().lower().replace("_", "-")


def locale_chain(locale: str, default_locale: str) -> list[str]:
    """Locales to try, best first: exact, then language part, for the asked and default locale."""
    chain: list[str] = []
    for loc in (locale, default_locale):
        exact = _normalize_locale(loc)
        for candidate in (exact, exact.split("-", 1)[0]):
            if candidate and candidate not in chain:
                chain.append(candidate)
    return chain


def select_template(
    *, overrides: Mapping[str, str], locale: str, default_locale: str, with_context: bool
) -> str:
    """The template for one message.

    Locales are tried in this order: ``locale`` exactly, its language part (``es-MX`` → ``es``),
    then ``default_locale`` the same two ways, and finally ``en``. For each locale the service's
    override wins over the built-in. Overrides are keyed by locale (case and ``_``/``-``
    insensitive); when ``with_context`` is true only ``<locale>.transaction`` overrides and the
    built-in ``transaction`` templates are considered, since only they carry ``{amount}`` and
    ``{payee}``.

    >>> select_template(overrides={}, locale="es-MX", default_locale="en", with_context=False)
    '{brand}: codigo {code}. Valido {minutes} min. No lo compartas.'
    >>> select_template(overrides={"fr": "X {code}"}, locale="fr-CA", default_locale="en",
    ...                 with_context=False)
    'X {code}'
    """
    kind = "transaction" if with_context else "default"
    suffix = _TRANSACTION_SUFFIX if with_context else ""
    normalized = {_normalize_locale(key): value for key, value in overrides.items()}
    for candidate in locale_chain(locale, default_locale):
        override = normalized.get(candidate + suffix)
        if override is not None:
            return override
        builtin = BUILTIN_TEMPLATES.get(candidate)
        if builtin is not None:
            return builtin[kind]
    return BUILTIN_TEMPLATES[_FALLBACK_LOCALE][kind]


def _tokens(template: str) -> Iterator[tuple[str, str | None]]:
    """Split a template into ``(literal, None)`` and ``(raw, name)`` pieces.

    A placeholder gives its name (possibly unknown); ``{{``/``}}`` give a literal brace; a stray
    brace gives ``(brace, "")`` so that validation can refuse it and rendering can keep it.
    """
    position = 0
    for match in _TOKEN.finditer(template):
        if match.start() > position:
            yield template[position : match.start()], None
        raw = match.group(0)
        if raw in ("{{", "}}"):
            yield raw[0], None
        elif match.group(1) is not None:
            yield raw, match.group(1)
        else:
            yield raw, ""
        position = match.end()
    if position < len(template):
        yield template[position:], None


@functools.lru_cache(maxsize=1024)
def _parsed(template: str) -> tuple[tuple[str, str | None], ...]:
    # Templates are few and rendered for every message: tokenise each once.
    return tuple(_tokens(template))


def _substitute(template: str, values: Mapping[str, str]) -> str:
    # One pass: values are never re-read as template text, so a brand or payee with braces
    # cannot inject placeholders.
    return "".join(
        piece if name is None or name not in values else values[name]
        for piece, name in _parsed(template)
    )


def _autofill_lines(
    code: str, *, webotp_domain: str | None, android_app_hash: str | None
) -> list[str]:
    # The Android hash goes on a line before the WebOTP line, which must be the last one.
    lines: list[str] = []
    if android_app_hash:
        lines.append(android_app_hash)
    if webotp_domain:
        lines.append(f"@{webotp_domain} #{code}")
    return lines


def render_message(
    template: str,
    *,
    brand: str,
    code: str,
    minutes: int,
    context: Mapping[str, str] | None = None,
    webotp_domain: str | None = None,
    android_app_hash: str | None = None,
) -> str:
    """The SMS text: placeholders substituted, then the autofill lines.

    Known placeholders are replaced (a context key missing from ``context`` becomes empty);
    ``{{``/``}}`` become braces; anything else is kept as written, since refusing bad templates
    is :func:`validate_template`'s job. Then the Android hash is appended on its own line if set,
    and, if ``webotp_domain`` is set, a last line exactly ``@<host> #<code>``.

    >>> print(render_message("{brand} code {code} ({minutes} min) {{x}}", brand="Acme",
    ...                      code="123456", minutes=10, webotp_domain="acme.com",
    ...                      android_app_hash="FA+9qCX9VSu"))
    Acme code 123456 (10 min) {x}
    FA+9qCX9VSu
    @acme.com #123456
    """
    values = {"code": code, "brand": brand, "minutes": str(minutes)}
    for key in CONTEXT_KEYS:
        values[key] = (context or {}).get(key, "")
    body = _substitute(template, values)
    lines = _autofill_lines(code, webotp_domain=webotp_domain, android_app_hash=android_app_hash)
    return "\n".join([body, *lines])


def _check_syntax(template: str, param: str) -> None:
    has_code = False
    known = ", ".join("{" + name + "}" for name in _PLACEHOLDERS)
    for piece, name in _tokens(template):
        if name == "":
            raise InvalidRequest(
                f"template has an unmatched or empty brace {piece!r}; "
                "write {{ or }} for a literal brace",
                param=param,
            )
        if name is not None and name not in _PLACEHOLDERS:
            raise InvalidRequest(
                f"template uses an unknown placeholder {piece}; known ones are {known}",
                param=param,
            )
        has_code = has_code or name == "code"
    if not has_code:
        raise InvalidRequest("template must contain the {code} placeholder", param=param)


def validate_template(
    template: str,
    *,
    brand: str,
    code_length: int,
    max_minutes: int,
    webotp_domain: str | None,
    android_app_hash: str | None,
    param: str = "templates",
    allow_multipart: bool = False,
) -> None:
    """Refuse, with ``InvalidRequest(param=param)``, a template that cannot be sent as one part
    (or, with ``allow_multipart``, as at most :data:`MAX_MULTIPART_SEGMENTS` parts).

    Refused: no ``{code}``; an unknown placeholder or a stray brace; or a worst-case rendering that
    needs more parts than allowed. The worst case is ``brand`` as given, a code of ``code_length``
    characters, ``{minutes}`` with as many digits as ``max_minutes``, context values of
    :data:`CONTEXT_VALUE_MAX_LENGTH` characters (one-septet ``W``, or ``Ж`` if the template is
    UCS-2 anyway), plus the autofill lines. With an Android hash the message must also be at most
    140 bytes (SMS Retriever's limit).

    >>> validate_template("{brand}: {code}", brand="Acme", code_length=6, max_minutes=10,
    ...                   webotp_domain="acme.com", android_app_hash=None)
    >>> validate_template("{brand}: {cod}", brand="Acme", code_length=6, max_minutes=10,
    ...                   webotp_domain=None, android_app_hash=None)
    Traceback (most recent call last):
    ...
    otpgate.errors.InvalidRequest: template uses an unknown placeholder {cod}; ...
    """
    _check_syntax(template, param)
    filler = "W" if is_gsm7(template) else "Ж"
    longest_code = "W" * code_length
    message = render_message(
        template,
        brand=brand,
        code=longest_code,
        minutes=int("9" * len(str(max_minutes))),
        context=dict.fromkeys(CONTEXT_KEYS, filler * CONTEXT_VALUE_MAX_LENGTH),
        webotp_domain=webotp_domain,
        android_app_hash=android_app_hash,
    )
    shape = measure(message)
    extra = " including the autofill lines" if webotp_domain or android_app_hash else ""
    if allow_multipart and shape.segments > MAX_MULTIPART_SEGMENTS:
        raise InvalidRequest(
            f"template is too long: with the longest values{extra} it needs {shape.segments} "
            f"SMS parts, and at most {MAX_MULTIPART_SEGMENTS} are allowed",
            param=param,
        )
    if not allow_multipart and shape.segments > 1:
        limit = _SINGLE_PART[shape.encoding]
        raise InvalidRequest(
            f"template is too long: with the longest values{extra} it needs {shape.units} "
            f"{shape.encoding} units, and one SMS holds {limit}; set allow_multipart to "
            "accept longer messages sent (and billed) as several parts",
            param=param,
        )
    if android_app_hash and _packed_bytes(shape) > 140:
        raise InvalidRequest(
            f"template is too long for Android SMS Retriever: with the longest values it needs "
            f"{_packed_bytes(shape)} bytes, the limit is 140",
            param=param,
        )


def validate_sender_id(sender_id: str) -> str:
    """The sender id to use, or ``InvalidRequest(param="sender_id")``.

    Alphanumeric: 1 to 11 characters of ``[A-Za-z0-9 ]`` with at least one letter, kept as given.
    Numeric: an optional ``+`` then 1 to 15 digits, returned without the ``+``.

    >>> validate_sender_id("Acme Bank"), validate_sender_id("+34600000000")
    ('Acme Bank', '34600000000')
    """
    if _SENDER_ALPHANUMERIC.fullmatch(sender_id) and any(ch.isalpha() for ch in sender_id):
        return sender_id
    numeric = _SENDER_NUMERIC.fullmatch(sender_id)
    if numeric:
        return numeric.group(1)
    raise InvalidRequest(
        "sender_id must be 1-11 letters, digits or spaces with at least one letter, "
        "or a number of at most 15 digits",
        param="sender_id",
    )


def validate_webotp_domain(host: str) -> str:
    """The bare host for the ``@host #code`` line, lower-cased, or
    ``InvalidRequest(param="webotp_domain")``.

    No scheme, port, path or trailing dot; ASCII DNS labels only (an internationalised name must
    be given in its ``xn--`` form, which also keeps the SMS in GSM-7).

    >>> validate_webotp_domain("Login.Example.COM")
    'login.example.com'
    """
    candidate = host.strip().lower()
    labels = candidate.split(".")
    if (
        not candidate
        or len(candidate) > 253
        or not candidate.isascii()
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
    ):
        raise InvalidRequest(
            "webotp_domain must be a bare host name such as login.example.com: "
            "no scheme, port or path",
            param="webotp_domain",
        )
    return candidate


def validate_android_app_hash(value: str) -> str:
    """The 11-character SMS Retriever app hash, or ``InvalidRequest(param="android_app_hash")``.

    >>> validate_android_app_hash("FA+9qCX9VSu")
    'FA+9qCX9VSu'
    """
    if not _ANDROID_APP_HASH.fullmatch(value):
        raise InvalidRequest(
            "android_app_hash must be exactly 11 characters of A-Z, a-z, 0-9, + and /",
            param="android_app_hash",
        )
    return value
