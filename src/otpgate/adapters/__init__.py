"""Adapters: storage, providers and metrics behind the ports of ``otpgate.domain.ports``."""
