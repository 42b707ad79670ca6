"""Provider adapters: one module per provider, each implementing ``domain.ports.Sender``,
registering its factory by name in :mod:`.registry` and passing the contract suite in
``tests/contract/test_sms_senders.py``.

Importing this package imports every provider module, so every factory is registered before
``bootstrap`` looks a name up.
"""

from otpgate.adapters.providers import console, labsmobile, smtp
from otpgate.adapters.providers.registry import create_sender, known_providers, register

__all__ = ["console", "create_sender", "known_providers", "labsmobile", "register", "smtp"]
