"""otpgate.services."""
