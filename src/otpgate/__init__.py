"""otpgate: self-hosted one-time-code verification."""

__version__ = "0.1.0"
