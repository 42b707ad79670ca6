"""SMS provider adapters: one module per provider, each implementing ``domain.ports.SmsSender``
and passing the contract suite in ``tests/contract/test_sms_senders.py``."""
