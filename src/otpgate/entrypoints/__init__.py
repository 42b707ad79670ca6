"""otpgate.entrypoints."""
