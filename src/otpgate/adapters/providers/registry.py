"""The provider registry: provider *types* (``labsmobile``, ``smpp``, …) and their typed options.

Each provider module registers one factory per type with :func:`register`, together with the
pydantic model of its options. A provider *instance* is a name (used in routes, metrics, stored
messages and receipt URLs), a type and options; it comes either from the environment (one
provider, ``OTPGATE_SMS_PROVIDER`` naming the type and ``OTPGATE_<TYPE>_<OPTION>`` the options)
or from a ``[providers.NAME]`` table of the TOML file named by ``OTPGATE_CONFIG`` (see
:mod:`otpgate.adapters.providers.config`).

Options are checked twice, both at start-up: by the model (types, ranges, unknown keys refused)
and by the factory (what only it knows). Either failure raises ``ConfigurationError`` naming the
setting the way the operator wrote it (``OTPGATE_SMPP_URL``, or ``providers.main.url in
otpgate.toml``) and never its value, since options hold credentials.

Adding a provider is adding a module (and its import in this package's ``__init__``), not
editing a chain of ``if`` statements.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from otpgate.domain.ports import Sender
from otpgate.errors import ConfigurationError
from otpgate.settings import Settings

__all__ = [
    "PROVIDER_NAME",
    "ProviderContext",
    "ProviderOptions",
    "ProviderType",
    "create_env_provider",
    "create_provider",
    "create_sender",
    "env_options",
    "known_providers",
    "option_names",
    "provider_type",
    "register",
]

#: A provider name appears in URLs (``/v1/receipts/<name>``), metrics labels and stored rows.
PROVIDER_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class ProviderOptions(BaseModel):
    """Options every provider takes; each provider type subclasses this with its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The longest one send may take; unset: ``OTPGATE_PROVIDER_TIMEOUT_SECONDS``.
    timeout_seconds: float | None = Field(default=None, gt=0, le=120)
    #: How long the circuit breaker skips this provider once it has opened.
    cooloff_seconds: float = Field(default=30.0, gt=0, le=3600)
    #: Consecutive failed sends that open the circuit.
    failure_threshold: int = Field(default=5, ge=1, le=1000)


OptionsT = TypeVar("OptionsT", bound=ProviderOptions)


@dataclass(frozen=True, slots=True)
class ProviderContext:
    """What a factory knows besides its options: the provider's name, the server's settings
    (environment, public URL), the send timeout that applies, and how the operator wrote each
    option (for error messages)."""

    name: str
    settings: Settings
    timeout_seconds: float
    #: option → how the operator named it, e.g. ``OTPGATE_SMPP_URL``.
    setting_names: Mapping[str, str] = field(default_factory=dict)

    def setting(self, option: str) -> str:
        """The operator's name for ``option``, for an error message."""
        return self.setting_names.get(option, f"provider {self.name!r} option {option!r}")

    def http_url(self, option: str, url: str) -> str:
        """``url`` (the value of ``option``) without a trailing ``/``, or ``ConfigurationError``
        naming the setting, never the value: an http(s) URL with a host, a TCP port if it
        names one, and no credentials or fragment (an HTTP provider's credentials are options
        of their own, which the adapter sends as its API requires)."""
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port  # raises for a port past 65535 or not a number
        except ValueError:
            raise ConfigurationError(f"{self.setting(option)} is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
            raise ConfigurationError(
                f"{self.setting(option)} must be an http:// or https:// URL with a host"
            )
        if parts.username is not None or parts.password is not None or parts.fragment:
            raise ConfigurationError(
                f"{self.setting(option)} must not carry credentials or a fragment: give them "
                "as the provider's own options"
            )
        return url.rstrip("/")


Factory = Callable[[Any, ProviderContext], Sender]
F = TypeVar("F", bound=Factory)


@dataclass(frozen=True, slots=True)
class ProviderType(Generic[OptionsT]):
    """A registered provider type: its options model, its factory and, for the environment
    form, which ``Settings`` field holds each option."""

    kind: str
    options: type[OptionsT]
    factory: Callable[[OptionsT, ProviderContext], Sender]
    env: Mapping[str, str]

    def env_setting(self, option: str) -> str:
        """The environment variable that sets ``option`` in the one-provider form."""
        return f"OTPGATE_{self.env.get(option, f'{self.kind}_{option}').upper()}"


_TYPES: dict[str, ProviderType[Any]] = {}


def register(
    type_: str, *, options: type[ProviderOptions] = ProviderOptions, env: Mapping[str, str] = {}
) -> Callable[[F], F]:
    """Register the decorated factory as provider type ``type_`` with its ``options`` model.

    ``env`` maps an option to the ``Settings`` field that holds it in the environment form when
    that is not ``<type>_<option>`` (``{"from": "email_from"}``). A malformed type, or one taken
    by another factory, is a programming error (``ValueError``) raised when the module loads."""
    if not PROVIDER_NAME.fullmatch(type_):
        raise ValueError(f"provider type {type_!r} must match {PROVIDER_NAME.pattern}")

    def decorate(factory: F) -> F:
        registered = _TYPES.get(type_)
        if registered is not None and registered.factory is not factory:
            raise ValueError(f"provider {type_!r} is registered twice")
        _TYPES[type_] = ProviderType(type_, options, factory, dict(env))
        return factory

    return decorate


def known_providers() -> tuple[str, ...]:
    """The registered provider types, sorted."""
    return tuple(sorted(_TYPES))


def provider_type(type_: str, *, setting: str) -> ProviderType[Any]:
    """The registered type, or ``ConfigurationError`` naming ``setting`` and the known types."""
    registered = _TYPES.get(type_)
    if registered is None:
        raise ConfigurationError(
            f"{setting}={type_!r} is not a provider; known providers: "
            f"{', '.join(known_providers())}"
        )
    return registered


def option_names(options: type[ProviderOptions]) -> tuple[str, ...]:
    """The options as the operator writes them: a field's alias where it has one (an option
    named ``from`` is the field ``from_``, a Python keyword being no attribute name)."""
    return tuple(info.alias or name for name, info in options.model_fields.items())


def env_options(registered: ProviderType[Any], settings: Settings) -> dict[str, Any]:
    """The options of ``registered`` that the environment sets: every option whose ``Settings``
    field exists and was given (or has a non-empty default, such as a provider's public URL)."""
    values: dict[str, Any] = {}
    for option in option_names(registered.options):
        field_name = registered.env.get(option, f"{registered.kind}_{option}")
        if field_name not in Settings.model_fields:
            continue
        value = getattr(settings, field_name)
        empty = value == "" or (isinstance(value, SecretStr) and not value.get_secret_value())
        if value is not None and not empty:
            values[option] = value
    return values


def create_provider(
    name: str,
    type_: str,
    raw_options: Mapping[str, Any],
    settings: Settings,
    *,
    setting_names: Mapping[str, str],
    type_setting: str,
) -> tuple[Sender, ProviderOptions]:
    """Validate ``raw_options`` against the type's model and build the sender, named ``name``.

    ``setting_names`` says how the operator wrote each option (for errors); ``type_setting``
    how they wrote the type. Raises ``ConfigurationError`` without any option's value."""
    registered = provider_type(type_, setting=type_setting)
    try:
        options = registered.options.model_validate(dict(raw_options))
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc, setting_names, name)) from None
    timeout = options.timeout_seconds or settings.provider_timeout_seconds
    if timeout >= settings.delivery_lease_seconds:
        # A send must end before its lease does, or another worker may send it again.
        raise ConfigurationError(
            f"{setting_names.get('timeout_seconds', f'provider {name!r} timeout_seconds')} "
            "must be shorter than OTPGATE_DELIVERY_LEASE_SECONDS"
        )
    context = ProviderContext(
        name=name,
        settings=settings,
        timeout_seconds=timeout,
        setting_names=setting_names,
    )
    sender = registered.factory(options, context)
    if sender.name != name:
        raise ConfigurationError(f"provider {name!r}: its sender calls itself {sender.name!r}")
    return sender, options


def create_env_provider(type_: str, settings: Settings) -> tuple[Sender, ProviderOptions]:
    """A provider of the environment form: type ``type_`` with its options from
    ``OTPGATE_<TYPE>_<OPTION>``, named after its type."""
    registered = provider_type(type_, setting="OTPGATE_SMS_PROVIDER")
    names = {option: registered.env_setting(option) for option in option_names(registered.options)}
    return create_provider(
        type_,
        type_,
        env_options(registered, settings),
        settings,
        setting_names=names,
        type_setting="OTPGATE_SMS_PROVIDER",
    )


def create_sender(type_: str, settings: Settings) -> Sender:
    """The sender of :func:`create_env_provider` (``OTPGATE_SMS_PROVIDER=type_``)."""
    return create_env_provider(type_, settings)[0]


def _describe(exc: ValidationError, setting_names: Mapping[str, str], name: str) -> str:
    """The validation errors, each naming its setting and never the value given."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        location = error["loc"]
        option = str(location[0]) if location else ""
        where = setting_names.get(option, f"provider {name!r} option {option!r}")
        if error["type"] == "extra_forbidden":
            problems.append(f"{where} is not an option of this provider")
        elif error["type"] == "missing":
            problems.append(f"{where} is required")
        else:
            problems.append(f"{where}: {error['msg']}")
    return "; ".join(problems)
