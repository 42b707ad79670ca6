"""The voice and e-mail texts of otpgate.domain.texts: languages, spelling, escaping, no
external resources."""

from __future__ import annotations

import doctest
import re
from html.parser import HTMLParser

import pytest

from otpgate.domain import texts
from otpgate.domain.sms import BUILTIN_TEMPLATES
from otpgate.domain.texts import EMAIL_LOCALES, email_content, spell_code, voice_text

LOCALES = ("en", "es", "fr", "de", "it", "pt", "ca", "nl")


def test_doctests() -> None:
    result = doctest.testmod(texts)
    assert result.failed == 0
    assert result.attempted > 0


def test_the_same_languages_as_the_sms_templates() -> None:
    assert set(EMAIL_LOCALES) == set(LOCALES) == set(BUILTIN_TEMPLATES)


# --- voice -------------------------------------------------------------------------------------


@pytest.mark.parametrize("locale", LOCALES)
def test_voice_reads_the_code_digit_by_digit_twice(locale: str) -> None:
    said = voice_text("407215", "Acme", locale)

    assert said.count("4, 0, 7, 2, 1, 5") == 2
    assert "407215" not in said  # never as one number
    assert "Acme" in said
    # the second reading comes after the first sentence ends
    first = said.index("4, 0, 7, 2, 1, 5")
    assert said.index("4, 0, 7, 2, 1, 5", first + 1) > said.index(".", first)


def test_voice_texts_differ_per_language() -> None:
    assert len({voice_text("1234", "Acme", locale) for locale in LOCALES}) == len(LOCALES)


@pytest.mark.parametrize(
    ("locale", "start"),
    [
        ("en", "Your Acme verification code is: 1, 2"),
        ("es", "Tu código de verificación de Acme es: 1, 2"),
        ("fr", "Votre code de vérification Acme est : 1, 2"),
        ("de", "Ihr Bestätigungscode für Acme lautet: 1, 2"),
        ("it", "Il tuo codice di verifica Acme è: 1, 2"),
        ("pt", "O seu código de verificação Acme é: 1, 2"),
        ("ca", "El teu codi de verificació d'Acme és: 1, 2"),
        ("nl", "Uw verificatiecode voor Acme is: 1, 2"),
    ],
)
def test_voice_language(locale: str, start: str) -> None:
    assert voice_text("12", "Acme", locale).startswith(start)


@pytest.mark.parametrize(
    ("locale", "default_locale", "language_of"),
    [
        ("es-MX", "en", "es"),
        ("PT_br", "en", "pt"),
        ("sv", "de", "de"),  # no Swedish: the service's default locale
        ("sv", "nl-BE", "nl"),  # its language part
        ("sv", "ja", "en"),  # neither: English
    ],
)
def test_voice_locale_chain(locale: str, default_locale: str, language_of: str) -> None:
    assert voice_text("12", "Acme", locale, default_locale=default_locale) == voice_text(
        "12", "Acme", language_of
    )


def test_alphanumeric_codes_are_read_letter_by_letter() -> None:
    assert spell_code("K7M2PX") == "K, 7, M, 2, P, X"
    assert voice_text("k7m2", "Acme", "en").count("K, 7, M, 2") == 2


def test_voice_brand_cannot_break_the_line() -> None:
    said = voice_text("12", "Acme\nBank\r\x00", "en")
    assert "\n" not in said and "\r" not in said and "\x00" not in said
    assert "Acme Bank" in said


# --- e-mail ------------------------------------------------------------------------------------


class _Page(HTMLParser):
    """Collects what would make a mail client fetch anything or follow a link."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.data: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "background", "action", "srcset") and value:
                self.urls.append(value)
            if name == "style" and value and "url(" in value:
                self.urls.append(value)

    def handle_data(self, data: str) -> None:
        self.data.append(data)


@pytest.mark.parametrize("locale", LOCALES)
@pytest.mark.parametrize("minutes", [1, 10])
def test_email_content_in_each_language(locale: str, minutes: int) -> None:
    subject, text, page = email_content("407215", "Acme", minutes, locale)

    assert "Acme" in subject
    assert "407215" not in subject  # notifications and mail logs show subjects
    assert "\n" not in subject
    assert "407215" in text and "407215" in page
    assert str(minutes) in text
    assert f'<html lang="{locale}">' in page
    parsed = _Page()
    parsed.feed(page)
    assert "407215" in "".join(parsed.data)


def test_email_texts_differ_per_language() -> None:
    subjects = {email_content("1", "Acme", 10, locale).subject for locale in LOCALES}
    bodies = {email_content("1", "Acme", 10, locale).text for locale in LOCALES}
    assert len(subjects) == len(bodies) == len(LOCALES)


@pytest.mark.parametrize("locale", LOCALES)
def test_one_minute_is_singular(locale: str) -> None:
    one = email_content("407215", "Acme", 1, locale).text
    many = email_content("407215", "Acme", 2, locale).text
    assert one != many.replace(" 2 ", " 1 ")  # not the plural with 1 put in


@pytest.mark.parametrize("locale", LOCALES)
def test_email_html_has_no_external_resource_link_or_script(locale: str) -> None:
    _, _, page = email_content("407215", "Acme", 10, locale)
    parsed = _Page()
    parsed.feed(page)

    assert parsed.urls == []
    assert not {"img", "a", "script", "link", "iframe", "object", "form", "style"} & set(
        parsed.tags
    )
    assert not re.search(r"https?:|//|@import|url\(", page)


def test_email_brand_is_escaped_in_html_and_kept_in_text() -> None:
    brand = '<img src="https://t.example/p.gif">&Co'
    subject, text, page = email_content("407215", brand, 10, "en")

    parsed = _Page()
    parsed.feed(page)
    assert parsed.urls == []
    assert "img" not in parsed.tags
    assert "&lt;img src=&quot;https://t.example/p.gif&quot;&gt;&amp;Co" in page
    assert brand in subject and brand in text  # plain text needs no escaping


def test_email_brand_cannot_add_a_header_line() -> None:
    subject, _, _ = email_content("407215", "Acme\r\nBcc: victim@example.com", 10, "en")
    assert "\r" not in subject and "\n" not in subject


@pytest.mark.parametrize(
    ("locale", "default_locale", "language_of"),
    [("es-AR", "en", "es"), ("sv", "fr-CA", "fr"), ("zz", "yy", "en")],
)
def test_email_locale_chain(locale: str, default_locale: str, language_of: str) -> None:
    assert email_content("1", "Acme", 10, locale, default_locale=default_locale) == email_content(
        "1", "Acme", 10, language_of
    )


@pytest.mark.parametrize(
    ("brand", "said"),
    [
        ("Acme", "d'Acme"),
        ("Òmnium", "d'Òmnium"),
        ("Hotel Sol", "d'Hotel Sol"),
        ("Banc Nou", "de Banc Nou"),
        ("Hyatt", "de Hyatt"),
        ("4Bank", "de 4Bank"),
    ],
)
def test_catalan_elides_de_before_a_vowel_sound(brand: str, said: str) -> None:
    assert f"verificació {said} és" in voice_text("12", brand, "ca")
    subject, text, _ = email_content("12", brand, 10, "ca")
    assert subject == f"El teu codi de verificació {said}"
    assert text.startswith(f"El teu codi de verificació {said} és:")
    # Elsewhere "de" stays: Spanish does not elide.
    assert "verificación de " + brand in voice_text("12", brand, "es")
