"""The one exception tree of otpgate.

Every error that crosses a layer boundary is one of these. Adapters translate library errors
into them (``raise ... from exc``); only the HTTP layer turns them into problem+json responses,
using the ``status``, ``code`` and ``title`` each class carries.

::

    OtpgateError
    ├── RequestRefused                  the caller asked for something that is not allowed
    │   ├── InvalidRequest              400 invalid_request (names the offending ``param``)
    │   ├── InvalidPhoneNumber          400 invalid_phone_number
    │   ├── UnsupportedNumberType       400 unsupported_number_type
    │   ├── Unauthorized                401 unauthorized
    │   ├── InsufficientCredit          402 insufficient_credit
    │   ├── CountryNotAllowed           403 country_not_allowed
    │   ├── ChannelNotAllowed           403 channel_not_allowed
    │   ├── DestinationBlocked          403 destination_blocked (retry_after when temporary)
    │   ├── Forbidden                   403 forbidden (an admin-only operation)
    │   ├── NotFound                    404 not_found
    │   ├── IdempotencyInProgress       409 idempotency_in_progress
    │   ├── IdempotencyKeyMismatch      422 idempotency_key_mismatch
    │   ├── RateLimited                 429 rate_limited (retry_after)
    │   ├── ResendTooSoon               429 resend_too_soon (retry_after)
    │   └── MaxSendAttemptsReached      429 max_send_attempts_reached
    ├── Unavailable                     503 unavailable: storage or a dependency is down
    ├── ConfigurationError              bad settings, raised at start-up, never at request time
    └── DeliveryError                   a provider could not take a message
        ├── TransientDeliveryError      not sent: retry later or fail over (5xx, throttling)
        │   └── DeliveryTimeout         no answer in time: the provider may have sent it
        └── PermanentDeliveryError      never retry this message on this route (invalid number)

A refusal carries its reason (``code``) and, where a later retry can succeed, the number of
seconds to wait (``retry_after``), so the API can answer with ``Retry-After``.
"""

from __future__ import annotations

import math


class OtpgateError(Exception):
    """Base of every otpgate error; ``code`` is stable and machine-readable."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.detail = detail or self.title
        self.param = param
        # Whole seconds, rounded up: a client that waits this long is never early.
        self.retry_after = None if retry_after is None else max(1, math.ceil(retry_after))
        super().__init__(self.detail)


class RequestRefused(OtpgateError):
    """The request is understood and refused; nothing was stored or sent."""


class InvalidRequest(RequestRefused):
    status, code, title = 400, "invalid_request", "Invalid request"


class InvalidPhoneNumber(RequestRefused):
    status, code, title = 400, "invalid_phone_number", "Invalid phone number"


class UnsupportedNumberType(RequestRefused):
    status, code, title = 400, "unsupported_number_type", "Unsupported number type"


class Unauthorized(RequestRefused):
    status, code, title = 401, "unauthorized", "Unauthorized"


class InsufficientCredit(RequestRefused):
    status, code, title = 402, "insufficient_credit", "Insufficient credit"


class CountryNotAllowed(RequestRefused):
    status, code, title = 403, "country_not_allowed", "Country not allowed"


class ChannelNotAllowed(RequestRefused):
    status, code, title = 403, "channel_not_allowed", "Channel not allowed"


class DestinationBlocked(RequestRefused):
    status, code, title = 403, "destination_blocked", "Destination blocked"


class Forbidden(RequestRefused):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(RequestRefused):
    status, code, title = 404, "not_found", "Not found"


class IdempotencyInProgress(RequestRefused):
    status, code, title = 409, "idempotency_in_progress", "Idempotent request in progress"


class IdempotencyKeyMismatch(RequestRefused):
    status, code, title = 422, "idempotency_key_mismatch", "Idempotency key reused"


class RateLimited(RequestRefused):
    status, code, title = 429, "rate_limited", "Too many requests"


class ResendTooSoon(RequestRefused):
    status, code, title = 429, "resend_too_soon", "Resend too soon"


class MaxSendAttemptsReached(RequestRefused):
    status, code, title = 429, "max_send_attempts_reached", "Maximum send attempts reached"


class Unavailable(OtpgateError):
    status, code, title = 503, "unavailable", "Service unavailable"


class ConfigurationError(OtpgateError):
    """Settings that cannot work; raised while starting, with a message naming the setting."""

    code, title = "configuration_error", "Configuration error"


class DeliveryError(OtpgateError):
    """A provider did not take a message."""

    code, title = "delivery_error", "Delivery error"


class TransientDeliveryError(DeliveryError):
    """Worth retrying later or on another route: 5xx, throttling, no credit, connection refused.
    The message was not sent, except for the subclass :class:`DeliveryTimeout`."""

    code, title = "delivery_transient", "Transient delivery error"


class DeliveryTimeout(TransientDeliveryError):
    """The request went out and no answer came back in time (or the connection dropped before
    it did): the provider may have sent the message. The dispatcher sends such a message at
    most once more through the same provider, so a hanging provider cannot multiply codes."""

    code, title = "delivery_timeout", "Delivery timeout"


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help this message on this route: invalid number, malformed request."""

    code, title = "delivery_permanent", "Permanent delivery error"


#: Every error the API may answer with, for the docs page at ``/errors/{code}``.
PUBLIC_ERRORS: tuple[type[OtpgateError], ...] = (
    InvalidRequest,
    InvalidPhoneNumber,
    UnsupportedNumberType,
    Unauthorized,
    InsufficientCredit,
    CountryNotAllowed,
    ChannelNotAllowed,
    DestinationBlocked,
    Forbidden,
    NotFound,
    IdempotencyInProgress,
    IdempotencyKeyMismatch,
    RateLimited,
    ResendTooSoon,
    MaxSendAttemptsReached,
    Unavailable,
)
