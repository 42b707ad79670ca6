"""otpgate.entrypoints.api."""
