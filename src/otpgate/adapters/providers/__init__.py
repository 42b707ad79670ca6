"""Provider adapters: one module per provider type, each implementing ``domain.ports.Sender``,
registering its factory and typed options in :mod:`.registry` and passing the shared contract
suite (``tests/contract/sender_contract.py``) in its own test module.

Importing this package imports every provider module, so every type is registered before
``bootstrap`` looks one up.
"""

from otpgate.adapters.providers import console, kannel, labsmobile, smpp, smtp, twilio, vonage
from otpgate.adapters.providers.registry import create_sender, known_providers, register

__all__ = [
    "console",
    "create_sender",
    "kannel",
    "known_providers",
    "labsmobile",
    "register",
    "smpp",
    "smtp",
    "twilio",
    "vonage",
]
