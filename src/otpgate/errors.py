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
│   │   └── SpendCapReached         402 insufficient_credit: a daily spend cap
    │   ├── CountryNotAllowed           403 country_not_allowed
    │   ├── ChannelNotAllowed           403 channel_not_allowed
    │   ├── DestinationBlocked          403 destination_blocked (retry_after when temporary)
    │   ├── Forbidden                   403 forbidden (an admin-only operation)
    │   ├── NotFound                    404 not_found
    │   ├── MethodNotAllowed            405 method_not_allowed (with an Allow header)
    │   ├── IdempotencyInProgress       409 idempotency_in_progress
    │   ├── PayloadTooLarge             413 payload_too_large
    │   ├── UnsupportedMediaType        415 unsupported_media_type
    │   ├── IdempotencyKeyMismatch      422 idempotency_key_mismatch
    │   ├── RateLimited                 429 rate_limited (retry_after)
    │   ├── ResendTooSoon               429 resend_too_soon (retry_after)
    │   └── MaxSendAttemptsReached      429 max_send_attempts_reached
    ├── InternalError                   500 internal_error: a bug; the log has the traceback
    ├── Unavailable                     503 unavailable: storage or a dependency is down
    ├── ConfigurationError              bad settings, raised at start-up, never at request time
    ├── DeliveryError                   a provider could not take a message
    │   ├── TransientDeliveryError      not sent: retry later or fail over (5xx, throttling)
    │   │   └── DeliveryTimeout         no answer in time: the provider may have sent it
    │   └── PermanentDeliveryError      never retry this message on this route (invalid number)
    └── OutboundError                   a call to a URL a caller gave (ack URL, webhook) failed
        ├── TransientOutboundError      retry later: timeout, connection error, 408, 429, 5xx
        └── PermanentOutboundError      the same call will fail again: 3xx, other 4xx
            └── OutboundRefused         the URL may not be called: bad scheme, refused address

A refusal carries its reason (``code``) and, where a later retry can succeed, the number of
seconds to wait (``retry_after``), so the API can answer with ``Retry-After``.

The docstring of each class in :data:`PUBLIC_ERRORS` is the guidance for its code, written in
Markdown: what it means, then a paragraph starting ``Client:`` that says what to do. The page
at ``/errors/{code}`` is rendered from it and ``docs/errors.md`` carries the same text (a test
compares them), so there is one source for both.
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
    """**400**. The request is malformed or a value is out of range; `param` names the first
    offending field or parameter. Raised for:

    - a body that is not JSON, or JSON that is not an object (no `param`);
    - an unknown field (`param` is its name);
    - a missing required field, or a wrong type;
    - a string that cannot be stored: a lone UTF-16 surrogate (such as `"\\ud800"`) or a NUL
      character, in any field, object key, path or query parameter; and a number JSON cannot
      carry (`NaN`, `Infinity`, or one too large for a double); and a body nested more than
      32 levels deep;
    - a `Content-Length` header that is not a number;
    - a service field outside its range or format, including templates that do not fit one
      segment (`param` is `templates`; for the built-in templates it is `webotp_domain` or
      `android_app_hash` when the autofill lines alone overflow, otherwise `name`);
    - `name: null` in a PATCH;
    - a bad `locale`, `context`, `metadata`, `custom_code` or `channel`;
    - a start whose `context` would make the message need more than one SMS segment
      (`param: "context"`);
    - a check `code` that cannot be the code of any service: longer than 64 characters as sent,
      or, once spaces and dashes are dropped, empty, holding characters other than digits (of
      any script) and the letters A–Z, or shorter than 4 or longer than 10; no attempt is
      counted;
    - an unknown `status` filter, a `limit` outside 1–200, a cursor otpgate could not have
      issued, or a `to` filter that starts with a space (an unencoded `+`: write it as `%2B`);
    - an `Idempotency-Key` that is not 1–255 printable characters;
    - a resend of a verification that is not pending (`param: "id"`), or of a pending one whose
      sealed code no longer opens because the master key changed (`param: "id"`; the
      verification is closed as `failed`);
    - an account name or key name that is empty or longer than 200, a bad username, or a
      username already taken.

    Client: fix the request; retrying it unchanged fails again.
    """

    status, code, title = 400, "invalid_request", "Invalid request"


class InvalidPhoneNumber(RequestRefused):
    """**400**, `param: "to"`. The number cannot be parsed, or it is national without
    `country`, or it is not a valid number (for example an unassigned range). Raised by start,
    check by destination, and the `to` filter of the list.

    Client: ask the user for the number again. Send E.164 (`+34600000000`), or a national
    number together with `country`.
    """

    status, code, title = 400, "invalid_phone_number", "Invalid phone number"


class UnsupportedNumberType(RequestRefused):
    """**400**, `param: "to"`. The number is valid but cannot receive an SMS code. Only mobile
    numbers (and numbers that may be fixed line or mobile) are accepted. Fixed line, toll free,
    premium rate, shared cost, VoIP, personal number, pager, UAN, voicemail and unknown types are
    refused. There is no per-service VoIP option yet.

    Client: ask the user for a mobile number.
    """

    status, code, title = 400, "unsupported_number_type", "Unsupported number type"


class Unauthorized(RequestRefused):
    """**401**, with `WWW-Authenticate: Bearer, Basic realm="otpgate"`. Raised when the
    `Authorization` header is missing or its scheme is neither Bearer nor Basic; when Basic
    credentials are malformed; when the key is unknown or revoked; or when the Basic username is
    not the key's account's. LabsMobile's OTP API (`/otp/*`) takes Basic only: there a Bearer key
    is refused too, and the header is `WWW-Authenticate: Basic realm="otpgate"`.

    Client: check the credentials; do not retry blindly.
    """

    status, code, title = 401, "unauthorized", "Unauthorized"


class InsufficientCredit(RequestRefused):
    """**402**. The account is prepaid and its balance does not cover the message's price
    (its SMS parts times the destination country's price; for a batch, the sum of every message),
    or the send would take the account's or the service's daily spend cap past its limit (the
    detail names the cap, its limit and what was spent today, UTC). Nothing is stored, sent or
    debited: a batch is refused whole. `GET /v1/account` shows the balance and
    `GET /v1/prices` the prices.

    Client: treat it as "top up the account" (`otpgate credit add`), not as a retryable error;
    a spend cap allows sends again on the next UTC day, or when an operator raises it.
    """

    status, code, title = 402, "insufficient_credit", "Insufficient credit"


class SpendCapReached(InsufficientCredit):
    """An ``insufficient_credit`` refusal by a daily spend cap: which cap (``scope``
    ``account`` or ``service``, and its owner's id), its limit and what the day (UTC) had
    spent, in credit units."""

    def __init__(self, *, scope: str, owner_id: str, limit: int, spent: int, day: str) -> None:
        self.scope, self.owner_id, self.limit, self.spent, self.day = (
            scope,
            owner_id,
            limit,
            spent,
            day,
        )
        super().__init__(
            f"the {scope}'s daily spend cap of {_credits(limit)} credits is reached: "
            f"{_credits(spent)} spent on {day} (UTC); sends resume the next UTC day or when "
            "the cap is raised"
        )


def _credits(units: int) -> str:
    """Units as decimal credits (``domain.billing.credits_text``, which errors cannot import)."""
    whole, fraction = divmod(units, 10_000)
    digits = f"{fraction:04d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


class CountryNotAllowed(RequestRefused):
    """**403**, `param: "to"`. The destination's country is not in the service's
    `allowed_countries`, or, for a prepaid account, the price table has no price for it (and no
    `*` row), so the message could not be billed. Nothing is stored or sent, and the provider is
    never called.

    Client: tell the user the country is not supported, or widen the service's
    `allowed_countries`.
    """

    status, code, title = 403, "country_not_allowed", "Country not allowed"


class ChannelNotAllowed(RequestRefused):
    """**403**, `param: "channel"`. The requested channel is not in the service's `channels`,
    or no sender for it is configured on this server. Only `sms` has a sender today.

    Client: use a channel the service enables (omit `channel` to use its first one).
    """

    status, code, title = 403, "channel_not_allowed", "Channel not allowed"


class DestinationBlocked(RequestRefused):
    """**403**. Nothing was stored or sent, for one of three reasons:

    - with `retry_after`: the destination has had too many consecutive failed checks in this
      service (`OTPGATE_LOCKOUT_THRESHOLD`, 100 by default); it is locked until `retry_after`
      seconds from now (`OTPGATE_LOCKOUT_SECONDS`, a day by default). Checks during the lockout
      answer `valid: false` rather than this error. An operator lifts it with
      `otpgate lockouts clear --service svc_… --to +34…`;
    - with `retry_after`: the number's prefix or country is blocked on this server by the
      SMS-pumping defence (`GET /v1/blocks`; an admin lifts it with `DELETE /v1/blocks/{id}`,
      and a number on the account's safe list is never blocked);
    - without `retry_after`: the number's prefix is on the account's deny list.

    Client: do not retry before `retry_after`; without it, waiting does not help.
    """

    status, code, title = 403, "destination_blocked", "Destination blocked"


class Forbidden(RequestRefused):
    """**403**. Raised in three cases:

    - an admin-only operation with a non-admin key: `GET`/`POST /v1/accounts`, or
      `POST /v1/keys` with another account's `account_id`;
    - a delivery receipt whose `token` is missing or wrong; nothing changes;
    - a start with `custom_code` in a service whose `custom_code_enabled` is false
      (`param: "custom_code"`); nothing is stored or sent.

    Client: use an admin key; for receipts, check `OTPGATE_PUBLIC_URL` and that the master
    secret has not changed.
    """

    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(RequestRefused):
    """**404**. No such resource exists for this account; another account's ids are reported
    the same way. Also raised for:

    - an unknown `service_id` in a start (`param: "service_id"`);
    - a check by destination when that destination never had a verification in the service;
    - revoking a key that is not live;
    - a deleted service;
    - an unknown route, or an error code with no page;
    - a receipt URL for a provider that takes no receipts.

    Client: check the id and the key's account; retrying does not help.
    """

    status, code, title = 404, "not_found", "Not found"


class MethodNotAllowed(RequestRefused):
    """**405**, with an `Allow` header listing the methods the path takes. The path exists but
    not with this method (for example `DELETE /v1/verifications`).

    Client: use one of the methods in `Allow`.
    """

    status, code, title = 405, "method_not_allowed", "Method not allowed"


class IdempotencyInProgress(RequestRefused):
    """**409**, `retry_after: 1`. Another request with the same `Idempotency-Key` is still
    running, or the key is contended. A key left in progress for 5 minutes is taken over by the
    next request with that key. This happens when the first request's process died, or storage
    failed before the key could be released.

    Client: retry after `retry_after` with the same key and body. You get the first request's
    answer, or run it if it failed.
    """

    status, code, title = 409, "idempotency_in_progress", "Idempotent request in progress"


class PayloadTooLarge(RequestRefused):
    """**413**. The request body is larger than `OTPGATE_MAX_BODY_BYTES` (65536 bytes, 64 KiB,
    by default). The limit is checked against `Content-Length` before anything is read, and
    counted while a chunked body streams in; either way the request is refused before its body
    is read whole and before its credentials are checked, and nothing changes. LabsMobile's
    `POST /json/send` has a limit of its own: `OTPGATE_MAX_BODY_BYTES` plus 64 bytes for each
    recipient `OTPGATE_JSON_SEND_MAX_RECIPIENTS` allows.

    Client: send a smaller body. No otpgate request needs more than a few kilobytes, but for a
    large `/json/send` batch; `metadata` is capped at 4096 bytes.
    """

    status, code, title = 413, "payload_too_large", "Payload too large"


class UnsupportedMediaType(RequestRefused):
    """**415**. A request body came with a `Content-Type` other than JSON (`application/json`,
    or a type ending in `+json`), for example a form or plain text. Nothing is read from it and
    nothing changes. A body without any `Content-Type` is refused the same way.

    Client: send the body as JSON with `Content-Type: application/json`.
    """

    status, code, title = 415, "unsupported_media_type", "Unsupported media type"


class IdempotencyKeyMismatch(RequestRefused):
    """**422**, `param: "Idempotency-Key"`. The key was used in the last 24 hours, in this
    account, with a different method, path or body. Bodies are compared byte for byte.

    Client: use a new key for a new request, or resend the original body exactly.
    """

    status, code, title = 422, "idempotency_key_mismatch", "Idempotency key reused"


class RateLimited(RequestRefused):
    """**429**, with `retry_after`. A rate limit has no room: a send of a code (a start, a start
    that sends a pending verification's code again, a resend, LabsMobile's `sendCode` or
    `resendCode`) past one of the service's `rate_limits` (`per_number`, `per_prefix`,
    `per_country`, `per_ip`, `per_service`) or the account's (`per_account`), or a check of a code
    past `per_destination_checks`. `detail` names the limit. `retry_after` is the time until the
    oldest event in that limit's window leaves it. Nothing was stored or sent, no limit was
    consumed, and a refused check counts no attempt.

    Client: wait `retry_after` seconds before trying again; tell the user to wait. Do not retry in
    a loop: every refusal is logged.
    """

    status, code, title = 429, "rate_limited", "Too many requests"


class ResendTooSoon(RequestRefused):
    """**429**, with `retry_after`. A start (for a destination with a pending verification,
    including one that would supersede it with a new `context` or `custom_code`) or a resend
    came before `resend_interval_seconds` had passed since the last send. `retry_after` is the
    remaining time, rounded up. It is also answered with `retry_after: 1` when a concurrent
    start for the same destination is still being written.

    Client: show a countdown and offer "send again" after `retry_after` seconds.
    """

    status, code, title = 429, "resend_too_soon", "Resend too soon"


class MaxSendAttemptsReached(RequestRefused):
    """**429**, no `retry_after`. The pending verification has used all its
    `max_send_attempts` sends. A start that would supersede it gets this answer too, because
    superseding carries the send count over. It wins over `resend_too_soon` when both apply. The
    code already sent stays valid until the verification closes. This error is also answered
    when the verification closed (approved, expired) between the read and the conditional update
    that counts the send.

    Client: let the user enter the code already sent. A new verification for this destination
    can start once this one is closed (expired or canceled).
    """

    status, code, title = 429, "max_send_attempts_reached", "Maximum send attempts reached"


class InternalError(OtpgateError):
    """**500**. An unexpected error. The body is a generic problem with no stack trace; the
    traceback goes to the log together with the request id, and the response carries the same
    id in `X-Request-ID`.

    Client: retry later if the request is safe to repeat (with the same `Idempotency-Key` for a
    create), and report the `X-Request-ID` to the operator.
    """

    status, code, title = 500, "internal_error", "Internal error"


class Unavailable(OtpgateError):
    """**503**, `retry_after: 1` for storage failures. The database is unreachable, does not answer
    within `OTPGATE_DATABASE_TIMEOUT_SECONDS` (1 s by default: a PostgreSQL connection or answer, a
    SQLite write lock held by another process), or cannot write (a full disk, an I/O error).
    `GET /readyz` answers this too while it lasts. The request fails fast instead of hanging, and
    the server serves other requests meanwhile. A verification and its outbox row are written
    together, so a start either happened completely or not at all. Also answered when the
    rate-limit store (`OTPGATE_REDIS_URL`) cannot answer within
    `OTPGATE_REDIS_TIMEOUT_SECONDS`: always for a check, and for a start or resend unless the
    service sets `rate_limits.fail_open`.

    Client: retry with backoff, with the same `Idempotency-Key` if you sent one. A start may
    have committed before the failure. If so, the retry finds the pending verification and
    becomes a resend of it, subject to `resend_interval_seconds`: no second code, and no second
    SMS inside that interval.
    """

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


class NotConnected(TransientDeliveryError):
    """The provider could not be reached at all (no SMPP bind is up): nothing was attempted,
    so the attempt is not counted against the message."""

    code, title = "delivery_not_connected", "Provider not connected"


class DeliveryTimeout(TransientDeliveryError):
    """The request went out and no answer came back in time (or the connection dropped before
    it did): the provider may have sent the message. The dispatcher sends such a message at
    most once more through the same provider, so a hanging provider cannot multiply codes."""

    code, title = "delivery_timeout", "Delivery timeout"


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help this message on this route: invalid number, malformed request."""

    code, title = "delivery_permanent", "Permanent delivery error"


class OutboundError(OtpgateError):
    """A call to a URL that a caller supplied (a LabsMobile ``ackurl``, a webhook) did not get
    a 2xx answer. ``answer_status`` is the HTTP status of the answer, ``None`` when there was
    none. Details name the URL's origin only, never its path, query or credentials."""

    code, title = "outbound_error", "Outbound call failed"

    answer_status: int | None = None


class TransientOutboundError(OutboundError):
    """Worth calling again later: a timeout, a name that does not resolve, a connection or TLS
    failure, HTTP 408, 429 or 5xx (``retry_after`` from a 429's or 503's ``Retry-After``)."""

    code, title = "outbound_transient", "Transient outbound error"


class PermanentOutboundError(OutboundError):
    """Calling the same URL again will not change the answer: a redirect (never followed) or
    a 4xx other than 408 and 429."""

    code, title = "outbound_permanent", "Permanent outbound error"


class OutboundRefused(PermanentOutboundError):
    """The URL may not be called at all, and nothing was connected: a scheme other than http
    or https, no host, a malformed address, or a host that is (or resolves to) a loopback,
    private, link-local, metadata, multicast or reserved address outside the operator's
    allowed ranges."""

    code, title = "outbound_refused", "Outbound call refused"


#: Every error the API may answer with, in the order of ``docs/errors.md``; each has a page at
#: ``/errors/{code}`` rendered from its docstring, which is also that code's section of the docs.
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
    MethodNotAllowed,
    IdempotencyInProgress,
    PayloadTooLarge,
    UnsupportedMediaType,
    IdempotencyKeyMismatch,
    RateLimited,
    ResendTooSoon,
    MaxSendAttemptsReached,
    InternalError,
    Unavailable,
)
