"""The provider registry: a name → factory map, filled by the provider modules themselves.

Each provider module decorates one factory with :func:`register`. A factory takes the
:class:`~otpgate.settings.Settings` that ``bootstrap`` was given, reads its own typed options
from them (credentials are ``SecretStr``), checks them and returns a ready
:class:`~otpgate.domain.ports.Sender`. A missing or bad option raises ``ConfigurationError``
naming its setting, never showing a secret's value, so a bad configuration stops the server at
start-up instead of at the first send.

``bootstrap`` only calls :func:`create_sender`: adding a provider is adding a module (and its
import in this package's ``__init__``), not editing a chain of ``if`` statements.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, TypeVar

from otpgate.domain.ports import Sender
from otpgate.errors import ConfigurationError
from otpgate.settings import Settings

__all__ = ["ProviderFactory", "create_sender", "known_providers", "register"]

#: Builds a sender from the settings, or raises ``ConfigurationError`` naming the bad setting.
ProviderFactory = Callable[[Settings], Sender]

F = TypeVar("F", bound=ProviderFactory)

#: A provider name appears in URLs (``/v1/receipts/<name>``), metrics labels and stored rows.
PROVIDER_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}")

_FACTORIES: dict[str, ProviderFactory] = {}


def register(name: str) -> Callable[[F], F]:
    """Register the decorated factory under ``name``. A name that is malformed or taken by
    another factory is a programming error (``ValueError``), raised when the module loads."""
    if not PROVIDER_NAME.fullmatch(name):
        raise ValueError(f"provider name {name!r} must match {PROVIDER_NAME.pattern}")

    def decorate(factory: F) -> F:
        registered = _FACTORIES.get(name)
        if registered is not None and registered is not factory:
            raise ValueError(f"provider {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory

    return decorate


def known_providers() -> tuple[str, ...]:
    """The registered provider names, sorted."""
    return tuple(sorted(_FACTORIES))


def create_sender(name: str, settings: Settings) -> Sender:
    """The sender the factory registered as ``name`` makes from ``settings``.

    An unknown name raises ``ConfigurationError`` naming ``OTPGATE_SMS_PROVIDER`` and listing
    the known names; the factory's own checks raise it for its options."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ConfigurationError(
            f"OTPGATE_SMS_PROVIDER={name!r} is not a provider; "
            f"known providers: {', '.join(known_providers())}"
        )
    return factory(settings)
