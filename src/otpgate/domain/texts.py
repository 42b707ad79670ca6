"""What a call says and what an e-mail shows: the code message on the voice and e-mail channels.

Both come in the languages of the built-in SMS templates (en, es, fr, de, it, pt, ca, nl),
chosen the way :func:`otpgate.domain.sms.select_template` chooses: the asked locale exactly,
its language part (``pt-BR`` → ``pt``), then the default locale the same two ways, then English.

* :func:`voice_text` is the sentence a text-to-speech engine speaks: the code read one
  character at a time (``"4, 0, 7, 2, 1, 5"``: the commas make the engine pause and say each
  digit or letter on its own instead of "four hundred seven thousand…"), said twice.
* :func:`email_content` is a subject, a plain-text body and its HTML alternative. The HTML is
  self-contained: no image, stylesheet, font or link to fetch, so opening it tells nobody
  anything (no tracking), and every value in it is HTML-escaped (a brand may contain ``<``).
  The code is not in the subject, which notifications and mail logs show widely.

Values that end up in a header or a spoken sentence have their control characters (line
breaks included) turned into spaces, so a brand can never add a header line.

Everything here is pure: no I/O, no clock, no settings.
"""

from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

from otpgate.domain.sms import locale_chain

__all__ = ["EMAIL_LOCALES", "EmailText", "email_content", "spell_code", "voice_text"]

_FALLBACK_LOCALE = "en"


@dataclass(frozen=True, slots=True)
class _Phrases:
    #: ends with the colon before the code; ``{brand}`` is the service's name
    intro: str
    #: said before the code the second time
    repeat: str
    subject: str
    #: ``{minutes}`` in the plural form, and the form for exactly one minute
    valid_many: str
    valid_one: str
    no_share: str
    not_asked: str


_PHRASES: dict[str, _Phrases] = {
    "en": _Phrases(
        intro="Your {brand} verification code is:",
        repeat="I repeat:",
        subject="Your {brand} verification code",
        valid_many="It is valid for {minutes} minutes.",
        valid_one="It is valid for 1 minute.",
        no_share="Do not share this code with anyone.",
        not_asked="If you did not ask for it, you can ignore this e-mail.",
    ),
    "es": _Phrases(
        intro="Tu código de verificación de {brand} es:",
        repeat="Repito:",
        subject="Tu código de verificación de {brand}",
        valid_many="Es válido durante {minutes} minutos.",
        valid_one="Es válido durante 1 minuto.",
        no_share="No compartas este código con nadie.",
        not_asked="Si no lo has pedido, puedes ignorar este correo.",
    ),
    "fr": _Phrases(
        intro="Votre code de vérification {brand} est :",
        repeat="Je répète :",
        subject="Votre code de vérification {brand}",
        valid_many="Il est valable {minutes} minutes.",
        valid_one="Il est valable 1 minute.",
        no_share="Ne communiquez ce code à personne.",
        not_asked="Si vous ne l'avez pas demandé, vous pouvez ignorer cet e-mail.",
    ),
    "de": _Phrases(
        intro="Ihr Bestätigungscode für {brand} lautet:",
        repeat="Ich wiederhole:",
        subject="Ihr Bestätigungscode für {brand}",
        valid_many="Er ist {minutes} Minuten gültig.",
        valid_one="Er ist 1 Minute gültig.",
        no_share="Geben Sie diesen Code an niemanden weiter.",
        not_asked="Wenn Sie ihn nicht angefordert haben, können Sie diese E-Mail ignorieren.",
    ),
    "it": _Phrases(
        intro="Il tuo codice di verifica {brand} è:",
        repeat="Ripeto:",
        subject="Il tuo codice di verifica {brand}",
        valid_many="È valido per {minutes} minuti.",
        valid_one="È valido per 1 minuto.",
        no_share="Non condividere questo codice con nessuno.",
        not_asked="Se non l'hai richiesto, puoi ignorare questa e-mail.",
    ),
    "pt": _Phrases(
        intro="O seu código de verificação {brand} é:",
        repeat="Repito:",
        subject="O seu código de verificação {brand}",
        valid_many="É válido durante {minutes} minutos.",
        valid_one="É válido durante 1 minuto.",
        no_share="Não compartilhe este código com ninguém.",
        not_asked="Se não o pediu, pode ignorar este e-mail.",
    ),
    "ca": _Phrases(
        intro="El teu codi de verificació de {brand} és:",
        repeat="Repeteixo:",
        subject="El teu codi de verificació de {brand}",
        valid_many="És vàlid durant {minutes} minuts.",
        valid_one="És vàlid durant 1 minut.",
        no_share="No comparteixis aquest codi amb ningú.",
        not_asked="Si no l'has demanat, pots ignorar aquest correu.",
    ),
    "nl": _Phrases(
        intro="Uw verificatiecode voor {brand} is:",
        repeat="Ik herhaal:",
        subject="Uw verificatiecode voor {brand}",
        valid_many="Deze code is {minutes} minuten geldig.",
        valid_one="Deze code is 1 minuut geldig.",
        no_share="Deel deze code met niemand.",
        not_asked="Hebt u hem niet aangevraagd, dan kunt u deze e-mail negeren.",
    ),
}

#: The languages of the voice and e-mail texts (the same as the built-in SMS templates').
EMAIL_LOCALES = tuple(_PHRASES)


class EmailText(NamedTuple):
    """An e-mail's subject (one line), plain-text body and HTML alternative."""

    subject: str
    text: str
    html: str


def _language(locale: str, default_locale: str) -> str:
    """The first locale of the chain that has texts, else English."""
    for candidate in locale_chain(locale, default_locale):
        if candidate in _PHRASES:
            return candidate
    return _FALLBACK_LOCALE


def _one_line(value: str) -> str:
    """``value`` with every control or separator character other than a space (line and
    paragraph breaks, tabs, NUL) turned into a space, and the result trimmed."""
    cleaned = "".join(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch for ch in value)
    return " ".join(cleaned.split())


def spell_code(code: str) -> str:
    """The code one character at a time, for a speech engine; letters upper-cased so that each
    is read as a letter name.

    >>> spell_code("407215"), spell_code("a7k2")
    ('4, 0, 7, 2, 1, 5', 'A, 7, K, 2')
    """
    return ", ".join(ch.upper() for ch in _one_line(code) if not ch.isspace())


def _with_brand(template: str, brand: str, language: str) -> str:
    """``template`` with the brand in place of ``{brand}``. Catalan elides "de" before a vowel
    or an h and a vowel ("d'Acme", "d'Hola", but "de Banc", "de Hyatt" stays as is).

    >>> _with_brand("codi de {brand}", "Òmnium", "ca"), _with_brand("codi de {brand}", "Banc", "ca")
    ("codi d'Òmnium", 'codi de Banc')
    """
    if language == "ca" and _starts_with_vowel_sound(brand):
        template = template.replace("de {brand}", "d'{brand}")
    return template.replace("{brand}", brand)


def _starts_with_vowel_sound(word: str) -> bool:
    """True when ``word`` begins with a vowel, or an h and a vowel (accents ignored)."""
    bare = "".join(
        ch for ch in unicodedata.normalize("NFD", word[:2].lower()) if not unicodedata.combining(ch)
    )
    vowels = ("a", "e", "i", "o", "u")
    return bare[:1] in vowels or (bare[:1] == "h" and bare[1:2] in vowels)


def voice_text(code: str, brand: str, locale: str, *, default_locale: str = "en") -> str:
    """What a call says: the code spelled out, twice, in the locale's language.

    >>> voice_text("4072", "Acme", "es-MX")
    'Tu código de verificación de Acme es: 4, 0, 7, 2. Repito: 4, 0, 7, 2.'
    >>> voice_text("4072", "Acme", "sv", default_locale="de")
    'Ihr Bestätigungscode für Acme lautet: 4, 0, 7, 2. Ich wiederhole: 4, 0, 7, 2.'
    """
    language = _language(locale, default_locale)
    phrases = _PHRASES[language]
    spelled = spell_code(code)
    intro = _with_brand(phrases.intro, _one_line(brand), language)
    return f"{intro} {spelled}. {phrases.repeat} {spelled}."


def email_content(
    code: str, brand: str, minutes: int, locale: str, *, default_locale: str = "en"
) -> EmailText:
    """The subject, text and HTML of a code e-mail in the locale's language.

    ``brand`` is the service's name, ``minutes`` how long the code stays valid. The subject
    does not carry the code; the HTML has no external resource and escapes every value.

    >>> subject, text, page = email_content("407215", "A<b>", 10, "en")
    >>> subject
    'Your A<b> verification code'
    >>> "A&lt;b&gt;" in page and "<b>" not in page and "407215" in text
    True
    """
    language = _language(locale, default_locale)
    phrases = _PHRASES[language]
    brand = _one_line(brand)
    code = _one_line(code)
    subject = _with_brand(phrases.subject, brand, language)
    intro = _with_brand(phrases.intro, brand, language)
    validity = (
        phrases.valid_one if minutes == 1 else phrases.valid_many.replace("{minutes}", str(minutes))
    )
    text = f"{intro}\n\n{code}\n\n{validity}\n{phrases.no_share}\n\n{phrases.not_asked}\n"

    def e(value: str) -> str:
        return html.escape(value, quote=True)

    page = (
        "<!DOCTYPE html>\n"
        f'<html lang="{e(language)}">\n'
        '<head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(subject)}</title></head>\n"
        '<body style="margin:0;padding:24px;background:#ffffff;color:#1f2328;'
        'font-family:Arial,Helvetica,sans-serif;font-size:16px;line-height:1.5">\n'
        f'<p style="margin:0 0 12px">{e(intro)}</p>\n'
        "<p style=\"margin:0 0 16px;font-family:'Courier New',Courier,monospace;"
        f'font-size:28px;font-weight:bold;letter-spacing:4px">{e(code)}</p>\n'
        f'<p style="margin:0 0 12px">{e(validity)}<br>{e(phrases.no_share)}</p>\n'
        f'<p style="margin:0;color:#57606a;font-size:13px">{e(phrases.not_asked)}</p>\n'
        "</body>\n"
        "</html>\n"
    )
    return EmailText(subject, text, page)
