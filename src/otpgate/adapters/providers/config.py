"""The delivery configuration: which providers exist, with their options, and the routes.

Two forms, read once at start-up:

* **Environment** (one provider): ``OTPGATE_SMS_PROVIDER`` names the type and
  ``OTPGATE_<TYPE>_<OPTION>`` its options; the provider is named after its type and carries
  every message on one default route. When ``OTPGATE_SMTP_URL`` is set (and the SMS provider is
  not SMTP itself), an ``smtp`` provider is added for the e-mail channel.
* **File** (``OTPGATE_CONFIG``, TOML): ``[providers.NAME]`` tables with ``type`` and the flat
  options of that type, and ``[[routes]]`` with ``countries`` (ISO 3166-1 alpha-2 codes or
  ``"*"``) and an ordered ``providers`` list. The file is then the whole delivery
  configuration. Without any ``[[routes]]``, one default route takes the providers in the
  order of the file::

      [providers.primary]
      type = "smpp"
      url = "smpp://otpgate:secret@smsc.example.net:2775?window=20"

      [providers.backup]
      type = "labsmobile"
      username = "ops@example.com"
      token = "…"

      [[routes]]
      countries = ["ES", "PT"]
      providers = ["primary", "backup"]

      [[routes]]
      countries = ["*"]
      providers = ["backup"]

Every mistake raises ``ConfigurationError`` naming the file and the key (and the line, for a
TOML syntax error), never a value.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pycountry

from otpgate.adapters.providers.registry import (
    PROVIDER_NAME,
    ProviderOptions,
    create_env_provider,
    create_provider,
    option_names,
    provider_type,
)
from otpgate.domain.ascii import ascii_upper
from otpgate.domain.ports import Sender
from otpgate.domain.routing import ANY_COUNTRY, Route
from otpgate.errors import ConfigurationError
from otpgate.settings import Settings

__all__ = ["Delivery", "Provider", "load_delivery"]


@dataclass(frozen=True, slots=True)
class Provider:
    """A configured provider: its name, its type, its validated options and its sender."""

    name: str
    type: str
    options: ProviderOptions
    sender: Sender


@dataclass(frozen=True, slots=True)
class Delivery:
    """Providers in the order of the configuration, and routes."""

    providers: tuple[Provider, ...]
    routes: tuple[Route, ...]
    #: ``environment`` or the file's path, for messages.
    source: str


def load_delivery(settings: Settings) -> Delivery:
    """The delivery configuration of ``settings``: the file when ``OTPGATE_CONFIG`` is set,
    else the environment form. Builds (but does not connect) every sender."""
    if settings.config is not None:
        return _from_file(settings.config, settings)
    return _from_environment(settings)


def _from_environment(settings: Settings) -> Delivery:
    providers = [_env_provider(settings.sms_provider, settings)]
    if settings.smtp_url.get_secret_value() and settings.sms_provider != "smtp":
        providers.append(_env_provider("smtp", settings))
    names = tuple(p.name for p in providers)
    return Delivery(tuple(providers), (Route(frozenset(), names),), "environment")


def _env_provider(type_: str, settings: Settings) -> Provider:
    sender, options = create_env_provider(type_, settings)
    return Provider(type_, type_, options, sender)


def _from_file(path: Path, settings: Settings) -> Delivery:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"OTPGATE_CONFIG: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigurationError(f"OTPGATE_CONFIG: {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        # The decoder's message names the line and column, never the value.
        raise ConfigurationError(f"OTPGATE_CONFIG: {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigurationError(
            f"OTPGATE_CONFIG: {path} nests arrays or tables too deeply to be read"
        ) from None
    unknown = sorted(set(document) - {"providers", "routes"})
    if unknown:
        raise ConfigurationError(f"{path}: unknown top-level keys: {', '.join(unknown)}")
    tables = document.get("providers")
    if not isinstance(tables, dict) or not tables:
        raise ConfigurationError(f"{path}: at least one [providers.NAME] table is required")
    # Senders connect lazily, so one built before a later mistake holds nothing to close.
    providers = [_file_provider(path, name, table, settings) for name, table in tables.items()]
    routes = _routes(path, document.get("routes"), [p.name for p in providers])
    return Delivery(tuple(providers), routes, str(path))


def _file_provider(path: Path, name: str, table: Any, settings: Settings) -> Provider:
    where = f"providers.{name}"
    if not PROVIDER_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{path}: [{where}]: a provider name must match {PROVIDER_NAME.pattern}"
        )
    if not isinstance(table, dict):
        raise ConfigurationError(f"{path}: {where} must be a table")
    type_ = table.get("type")
    if not isinstance(type_, str):
        raise ConfigurationError(f"{path}: {where}.type is required (a provider type)")
    options: Mapping[str, Any] = {k: v for k, v in table.items() if k != "type"}
    names = {option: f"{where}.{option} in {path}" for option in options}
    registered = provider_type(type_, setting=f"{where}.type in {path}")
    for option in option_names(registered.options):
        names.setdefault(option, f"{where}.{option} in {path}")
    sender, validated = create_provider(
        name,
        type_,
        options,
        settings,
        setting_names=names,
        type_setting=f"{where}.type in {path}",
    )
    return Provider(name, type_, validated, sender)


def _routes(path: Path, raw: Any, names: list[str]) -> tuple[Route, ...]:
    if raw is None:
        return (Route(frozenset(), tuple(names)),)
    if not isinstance(raw, list) or not raw:
        raise ConfigurationError(f"{path}: routes must be one or more [[routes]] tables")
    routes = []
    for index, entry in enumerate(raw, start=1):
        where = f"{path}: routes #{index}"
        if not isinstance(entry, dict):
            raise ConfigurationError(f"{where} must be a table")
        unknown = sorted(set(entry) - {"countries", "providers"})
        if unknown:
            raise ConfigurationError(f"{where}: unknown keys: {', '.join(unknown)}")
        countries = entry.get("countries")
        if not isinstance(countries, list) or not countries:
            raise ConfigurationError(f'{where}: countries must list ISO codes or "*"')
        codes: set[str] = set()
        for country in countries:
            if not isinstance(country, str):
                raise ConfigurationError(f"{where}: countries must be strings")
            if country == ANY_COUNTRY:
                continue
            code = ascii_upper(country.strip())
            if len(code) != 2 or pycountry.countries.get(alpha_2=code) is None:
                raise ConfigurationError(f"{where}: {country!r} is not an ISO 3166-1 code")
            codes.add(code)
        if ANY_COUNTRY in countries and codes:
            raise ConfigurationError(f'{where}: "*" stands alone; list it in its own route')
        chosen = entry.get("providers")
        if (
            not isinstance(chosen, list)
            or not chosen
            or not all(isinstance(n, str) for n in chosen)
        ):
            raise ConfigurationError(f"{where}: providers must list provider names")
        missing = [n for n in chosen if n not in names]
        if missing:
            raise ConfigurationError(f"{where}: unknown providers: {', '.join(missing)}")
        if len(set(chosen)) != len(chosen):
            raise ConfigurationError(f"{where}: a provider is listed twice")
        routes.append(Route(frozenset(codes), tuple(chosen)))
    return tuple(routes)
