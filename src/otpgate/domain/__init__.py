"""otpgate.domain."""
