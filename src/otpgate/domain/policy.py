"""Policy as functions of state and ``now``: service settings, expiry, resends, contexts.

Every refusal is an ``otpgate.errors`` exception carrying its reason and, where waiting helps,
``retry_after`` (DESIGN.md habit 7).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from otpgate.domain import sms, texts
from otpgate.domain.ascii import ascii_upper
from otpgate.domain.billing import parse_credits
from otpgate.domain.codes import MAX_CODE_LENGTH, MIN_CODE_LENGTH, validate_custom_code
from otpgate.domain.fraud import GuardLevel
from otpgate.domain.model import (
    DEFAULT_START_LIMITS,
    Channel,
    CodeType,
    EmailContent,
    Limit,
    Message,
    MessageStatus,
    RateLimits,
    ServicePolicy,
    Verification,
)
from otpgate.domain.phone import is_region, parse_phone
from otpgate.errors import InvalidRequest, MaxSendAttemptsReached, RequestRefused, ResendTooSoon

log = logging.getLogger(__name__)

#: SECURITY.md S8 (NIST SP 800-63B rev 4): consecutive failures per (service, destination).
LOCKOUT_THRESHOLD = 100

_RANGES: dict[str, tuple[int, int]] = {
    "code_length": (MIN_CODE_LENGTH, MAX_CODE_LENGTH),
    "ttl_seconds": (60, 86_400),
    "max_check_attempts": (1, 20),
    "max_send_attempts": (1, 10),
    "resend_interval_seconds": (0, 3_600),
}
_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")
_URL = re.compile(r"^https?://[^\s/?#]+[^\s]*$")
_METADATA_MAX_BYTES = 4_096
#: The most test numbers one service may have.
MAX_TEST_NUMBERS = 100

POLICY_FIELDS = frozenset(
    {
        "name",
        "code_length",
        "code_type",
        "ttl_seconds",
        "max_check_attempts",
        "max_send_attempts",
        "resend_interval_seconds",
        "channels",
        "allowed_countries",
        "sender_id",
        "templates",
        "default_locale",
        "webotp_domain",
        "android_app_hash",
        "webhook_url",
        "allow_multipart",
        "fallback_after_seconds",
        "test_numbers",
        "daily_spend_cap",
        "rate_limits",
        "fraud_guard",
        "allow_voip",
        "custom_code_enabled",
    }
)


def build_policy(fields: Mapping[str, Any], base: ServicePolicy | None = None) -> ServicePolicy:
    """A validated policy from API fields (all optional but ``name`` when ``base`` is None).

    Raises ``InvalidRequest`` naming the first offending field. ``None`` for a field means its
    default (for nullable fields: no value).
    """
    unknown = set(fields) - POLICY_FIELDS
    if unknown:
        raise InvalidRequest(f"unknown field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
    if base is None:
        if not isinstance(fields.get("name"), str):
            raise InvalidRequest("name is required", param="name")
        base = ServicePolicy(name=fields["name"])
    defaults = ServicePolicy(name=base.name)
    changes = {
        # null means "the default": no value for nullable fields, the documented one otherwise
        key: getattr(defaults, key) if value is None and key != "name" else _field(key, value)
        for key, value in fields.items()
    }
    policy = replace(base, **changes)
    _check_templates(policy)
    policy = _check_test_codes(policy)
    if (
        policy.fallback_after_seconds is not None
        and policy.fallback_after_seconds >= policy.ttl_seconds
    ):
        raise InvalidRequest(
            "fallback_after_seconds must be shorter than ttl_seconds: a fallback after the "
            "code expired could never be used",
            param="fallback_after_seconds",
        )
    if policy.code_length < 6:
        # NIST SP 800-63B wants at least six digits; allowed, but it must not pass unnoticed.
        log.warning(
            "service %r uses %d-character codes (fewer than 6)", policy.name, policy.code_length
        )
    return policy


def _field(key: str, value: Any) -> Any:  # one table of fields, checked in order
    if key == "name":
        if not isinstance(value, str) or not 1 <= len(value.strip()) <= sms.MAX_BRAND_LENGTH:
            raise InvalidRequest(
                f"name must be 1 to {sms.MAX_BRAND_LENGTH} characters", param="name"
            )
        return value.strip()
    if key in _RANGES:
        low, high = _RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequest(f"{key} must be an integer from {low} to {high}", param=key)
        return value
    if key == "fallback_after_seconds":
        if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 3_600:
            raise InvalidRequest(
                "fallback_after_seconds must be an integer from 10 to 3600, or null", param=key
            )
        return value
    if key == "code_type":
        try:
            return CodeType(value)
        except ValueError:
            raise InvalidRequest("code_type must be numeric or alphanumeric", param=key) from None
    if key == "channels":
        if not isinstance(value, list | tuple) or not value:
            raise InvalidRequest("channels must be a non-empty list", param=key)
        try:
            channels = tuple(Channel(c) for c in value)
        except ValueError:
            raise InvalidRequest("channels may hold sms, voice and email", param=key) from None
        if len(set(channels)) != len(channels):
            raise InvalidRequest("channels must not repeat", param=key)
        return channels
    if key == "allowed_countries":
        if not isinstance(value, list | tuple) or not all(
            isinstance(c, str) and is_region(ascii_upper(c)) for c in value
        ):
            raise InvalidRequest(
                "allowed_countries must be assigned ISO 3166-1 alpha-2 codes (such as ES) or null",
                param=key,
            )
        return tuple(sorted({ascii_upper(c) for c in value}))
    if key == "sender_id":
        return sms.validate_sender_id(_text(key, value))
    if key == "templates":
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise InvalidRequest("templates must map locales to template strings", param=key)
        for locale in value:
            if not _LOCALE.match(locale.removesuffix(".transaction")):
                raise InvalidRequest(f"{locale!r} is not a locale such as en or es-MX", param=key)
        return dict(value)
    if key == "default_locale":
        if not isinstance(value, str) or not _LOCALE.match(value):
            raise InvalidRequest("default_locale must be a locale such as en or es-MX", param=key)
        return value
    if key == "webotp_domain":
        return sms.validate_webotp_domain(_text(key, value))
    if key == "android_app_hash":
        return sms.validate_android_app_hash(_text(key, value))
    if key in ("allow_multipart", "allow_voip", "custom_code_enabled"):
        if not isinstance(value, bool):
            raise InvalidRequest(f"{key} must be true or false", param=key)
        return value
    if key == "test_numbers":
        return _test_numbers(value)
    if key == "daily_spend_cap":
        if not isinstance(value, str):
            raise InvalidRequest(
                'daily_spend_cap must be a number of credits as a string, such as "25" or '
                '"12.5", or null',
                param=key,
            )
        return parse_credits(value, param=key)
    if key == "rate_limits":
        return rate_limits(value)
    if key == "fraud_guard":
        try:
            return GuardLevel(value)
        except ValueError:
            raise InvalidRequest(
                "fraud_guard must be off, basic, standard or strict", param=key
            ) from None
    if key == "webhook_url":
        url = _text(key, value)
        if not _URL.match(url) or len(url) > 2_048 or not _has_valid_port(url):
            raise InvalidRequest(
                "webhook_url must be an http(s) URL with a port from 1 to 65535, if any",
                param=key,
            )
        return url
    raise InvalidRequest(f"unknown field {key!r}", param=key)  # pragma: no cover


def _test_numbers(value: Any) -> dict[str, str]:
    """Test numbers as given: at most ``MAX_TEST_NUMBERS`` valid numbers written in E.164,
    each mapped to a code string (checked against the code rules by ``_check_test_codes``)."""
    if not isinstance(value, dict):
        raise InvalidRequest(
            "test_numbers must map E.164 numbers to their fixed codes", param="test_numbers"
        )
    if len(value) > MAX_TEST_NUMBERS:
        raise InvalidRequest(
            f"test_numbers may hold at most {MAX_TEST_NUMBERS} numbers", param="test_numbers"
        )
    numbers: dict[str, str] = {}
    for number, code in value.items():
        try:
            e164 = parse_phone(number).e164 if isinstance(number, str) else None
        except RequestRefused:
            e164 = None
        if e164 is None or e164 != number:
            raise InvalidRequest(
                f"test_numbers: {str(number)[:32]!r} is not a valid number written in E.164 "
                "(such as +34600000000)",
                param="test_numbers",
            )
        if not isinstance(code, str):
            raise InvalidRequest(
                f"test_numbers: the code of {number} must be a string", param="test_numbers"
            )
        numbers[number] = code
    return numbers


def _check_test_codes(policy: ServicePolicy) -> ServicePolicy:
    """The policy with every test number's code checked against the service's code rules
    (length and alphabet), so it is a code the service could have sent, and normalised."""
    fixed_codes: dict[str, str] = {}
    for number, code in policy.test_numbers.items():
        try:
            fixed = validate_custom_code(
                code, length=policy.code_length, code_type=policy.code_type
            )
        except InvalidRequest:
            kind = "digits" if policy.code_type is CodeType.NUMERIC else "letters and digits"
            raise InvalidRequest(
                f"test_numbers: the code of {number} must be {policy.code_length} {kind}, as "
                "the service's code rules say",
                param="test_numbers",
            ) from None
        fixed_codes[number] = fixed
    return replace(policy, test_numbers=fixed_codes) if policy.test_numbers else policy


#: The range of a rate limit's ``limit`` and ``window_seconds`` (a moving window keeps one
#: timestamp per event, so ``limit`` bounds the memory of each counter).
LIMIT_RANGE = (1, 100_000)
WINDOW_RANGE = (1, 86_400)


def rate_limits(value: Any) -> RateLimits:
    """A service's ``rate_limits`` object: any of ``per_number``, ``per_prefix``,
    ``per_country``, ``per_ip`` and ``per_service``, each ``{"limit", "window_seconds"}``,
    and ``fail_open`` (a boolean); what it leaves out keeps its default. ``InvalidRequest``
    naming ``rate_limits`` for any other shape."""
    names = ", ".join(DEFAULT_START_LIMITS)
    if not isinstance(value, dict):
        raise InvalidRequest("rate_limits must be an object or null", param="rate_limits")
    overrides: list[tuple[str, Limit]] = []
    fail_open = False
    for name, entry in value.items():
        if name == "fail_open":
            if not isinstance(entry, bool):
                raise InvalidRequest(
                    "rate_limits.fail_open must be true or false", param="rate_limits"
                )
            fail_open = entry
            continue
        if name not in DEFAULT_START_LIMITS:
            raise InvalidRequest(
                f"rate_limits takes {names} and fail_open; {name!r} is not one",
                param="rate_limits",
            )
        if not isinstance(entry, dict) or set(entry) != {"limit", "window_seconds"}:
            raise InvalidRequest(
                f"rate_limits.{name} must be an object of limit and window_seconds",
                param="rate_limits",
            )
        for member, (low, high) in (("limit", LIMIT_RANGE), ("window_seconds", WINDOW_RANGE)):
            number = entry[member]
            if isinstance(number, bool) or not isinstance(number, int) or not low <= number <= high:
                raise InvalidRequest(
                    f"rate_limits.{name}.{member} must be an integer from {low} to {high}",
                    param="rate_limits",
                )
        overrides.append((name, Limit(entry["limit"], entry["window_seconds"])))
    overrides.sort(key=lambda pair: pair[0])
    return RateLimits(overrides=tuple(overrides), fail_open=fail_open)


def checked_code_length(value: Any, *, param: str) -> int:
    """A code length a verification may use: an integer from 4 to 10."""
    low, high = _RANGES["code_length"]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{param} must be an integer from {low} to {high}", param=param)
    return value


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} must be a string or null", param=key)
    return value


def _check_templates(policy: ServicePolicy) -> None:
    """Every template the service may use must fit one SMS segment with the longest values: the
    service's name as ``{brand}``, a code of the longest length a verification may ask for
    (``MAX_CODE_LENGTH``, not only the service's own), its validity, and its autofill lines.
    With ``allow_multipart`` a template may need up to ``sms.MAX_MULTIPART_SEGMENTS`` parts."""

    def fits(template: str, param: str, brand: str = policy.name) -> None:
        sms.validate_template(
            template,
            brand=brand,
            code_length=MAX_CODE_LENGTH,
            max_minutes=minutes_of(policy),
            webotp_domain=policy.webotp_domain,
            android_app_hash=policy.android_app_hash,
            param=param,
            allow_multipart=policy.allow_multipart,
        )

    for locale, template in policy.templates.items():
        fits(template, "templates")
        if locale.endswith(".transaction") and not all(
            "{" + key + "}" in template for key in sms.CONTEXT_KEYS
        ):
            raise InvalidRequest(
                f"templates[{locale!r}] must show {{amount}} and {{payee}}: the user must see"
                " what the code confirms",
                param="templates",
            )
    # The built-ins are checked too: the autofill lines or a long brand can push them past one
    # segment; the error names whichever of them does.
    autofill = "android_app_hash" if policy.android_app_hash else "webotp_domain"
    for locale_templates in sms.BUILTIN_TEMPLATES.values():
        for template in locale_templates.values():
            fits(template, autofill, brand="")
            fits(template, "name")


def expires_at(policy: ServicePolicy, now: datetime) -> datetime:
    return now + timedelta(seconds=policy.ttl_seconds)


def minutes_of(policy: ServicePolicy) -> int:
    """Validity in whole minutes for the ``{minutes}`` placeholder (never shown as 0)."""
    return max(1, round(policy.ttl_seconds / 60))


def refuse_resend(verification: Verification, *, interval_seconds: int, now: datetime) -> None:
    """Raise why a pending verification may not be sent again now; return if it may.

    When both limits refuse, ``max_send_attempts_reached`` wins (API.md §4.1).
    """
    if verification.send_attempts >= verification.max_send_attempts:
        raise MaxSendAttemptsReached(
            f"this verification has used all {verification.max_send_attempts} sends"
        )
    ready_at = verification.last_sent_at + timedelta(seconds=interval_seconds)
    if now < ready_at:
        raise ResendTooSoon(
            "wait before sending the code again",
            retry_after=(ready_at - now).total_seconds(),
        )


def _has_valid_port(url: str) -> bool:
    """Whether the URL's port, when it names one, is a TCP port (``urlsplit`` raises for one
    past 65535 or not a number)."""
    try:
        port = urlsplit(url).port
    except ValueError:
        return False
    return port is None or port > 0


def validate_client_ip(value: Any) -> str | None:
    """The end user's IP address (``client_ip``), IPv4 or IPv6, in its canonical form; None
    when not given. ``InvalidRequest`` naming ``client_ip`` otherwise."""
    if value is None:
        return None
    try:
        if not isinstance(value, str) or len(value) > 64:
            raise ValueError
        address = ipaddress.ip_address(value)
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise ValueError  # "fe80::1%eth0": a zone names a link of the caller's, not a user
        return str(address)
    except ValueError:
        raise InvalidRequest(
            "client_ip must be an IPv4 or IPv6 address (without a %zone) such as 203.0.113.7 "
            "or 2001:db8::1",
            param="client_ip",
        ) from None


def validate_context(context: Any) -> dict[str, str] | None:
    """A transaction context: an object of ``amount`` and/or ``payee`` strings, each at most
    ``sms.CONTEXT_VALUE_MAX_LENGTH`` characters, or None."""
    if context is None:
        return None
    if not isinstance(context, dict) or not context:
        raise InvalidRequest("context must be a non-empty object or null", param="context")
    for key, value in context.items():
        if key not in sms.CONTEXT_KEYS:
            raise InvalidRequest(
                f"context keys are {', '.join(sms.CONTEXT_KEYS)}; {key!r} is not one",
                param=f"context.{key}",
            )
        if not isinstance(value, str) or not 1 <= len(value) <= sms.CONTEXT_VALUE_MAX_LENGTH:
            raise InvalidRequest(
                f"context.{key} must be a string of 1 to {sms.CONTEXT_VALUE_MAX_LENGTH} characters",
                param=f"context.{key}",
            )
        if any(unicodedata.category(ch) in _UNSHOWN_CATEGORIES for ch in value):
            # The SMS shows the amount and payee the code approves: a line break could forge
            # a line of its own ("Code: …"), and U+202E would show the text reversed.
            raise InvalidRequest(
                f"context.{key} must be text shown as it is: no line breaks, control or "
                "invisible formatting characters (such as U+202E)",
                param=f"context.{key}",
            )
    return {str(k): str(v) for k, v in context.items()}


#: Characters a transaction context may not hold: controls (line breaks included), invisible
#: formatting (bidirectional overrides, zero-width characters) and line or paragraph breaks.
_UNSHOWN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def validate_metadata(metadata: Any, encoded_size: int) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object", param="metadata")
    if encoded_size > _METADATA_MAX_BYTES:
        raise InvalidRequest(
            f"metadata must be at most {_METADATA_MAX_BYTES} bytes as JSON", param="metadata"
        )
    return metadata


#: An e-mail address otpgate sends to: a plain local part and a domain of DNS labels (no
#: quoted local parts, comments or address literals: nothing a code e-mail needs).
_EMAIL = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,63}$"
)


def validate_email(value: Any, *, param: str) -> str:
    """An e-mail address, trimmed, its domain in lower case; ``InvalidRequest`` naming
    ``param`` otherwise (at most 254 characters, ASCII)."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{param} must be an e-mail address", param=param)
    address = value.strip()
    if len(address) > 254 or not _EMAIL.fullmatch(address) or ".." in address:
        raise InvalidRequest(
            f"{param} must be an e-mail address such as ana@example.com", param=param
        )
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower()}"


def fallback_at(policy: ServicePolicy, channel: Channel, now: datetime) -> datetime | None:
    """When a verification started on ``channel`` moves to the service's next channel if no
    check arrived: ``fallback_after_seconds`` from now, or None (no timed fallback: none set,
    or no channel after this one)."""
    if policy.fallback_after_seconds is None or channel not in policy.channels:
        return None
    if policy.channels.index(channel) == len(policy.channels) - 1:
        return None
    return now + timedelta(seconds=policy.fallback_after_seconds)


def validate_locale(locale: Any) -> str | None:
    if locale is None:
        return None
    if not isinstance(locale, str) or not _LOCALE.match(locale):
        raise InvalidRequest("locale must be a locale such as en or es-MX", param="locale")
    return locale


def compose_sms(
    policy: ServicePolicy, *, code: str, locale: str, context: Mapping[str, str] | None
) -> str:
    """The text of a code message for this service, locale and (optional) transaction context."""
    template = sms.select_template(
        overrides=policy.templates,
        locale=locale,
        default_locale=policy.default_locale,
        with_context=bool(context),
    )
    return sms.render_message(
        template,
        brand=policy.name,
        code=code,
        minutes=minutes_of(policy),
        context=context,
        webotp_domain=policy.webotp_domain,
        android_app_hash=policy.android_app_hash,
    )


@dataclass(frozen=True, slots=True)
class Composed:
    """A code message as one channel carries it: the text (SMS body, words a call speaks,
    e-mail text part), with the e-mail's subject and HTML for e-mail, and the text as it may
    be stored (every form of the code masked)."""

    text: str
    masked: str
    email: EmailContent | None = None


def compose(
    policy: ServicePolicy,
    channel: Channel,
    *,
    code: str,
    locale: str,
    context: Mapping[str, str] | None,
) -> Composed:
    """The message of a code on ``channel``: the SMS template; for a call, the code spelled
    twice in the locale's language; for e-mail, a subject, text and HTML without any remote
    resource. A transaction's amount and payee are shown by SMS only (the caller refuses
    other channels for a verification with a context)."""
    if channel is Channel.SMS:
        text = compose_sms(policy, code=code, locale=locale, context=context)
        return Composed(text, mask_code(text, code))
    if channel is Channel.VOICE:
        text = texts.voice_text(code, policy.name, locale, default_locale=policy.default_locale)
        masked = text.replace(texts.spell_code(code), "*")
        return Composed(text, mask_code(masked, code))
    subject, text, page = texts.email_content(
        code, policy.name, minutes_of(policy), locale, default_locale=policy.default_locale
    )
    return Composed(text, mask_code(text, code), EmailContent(subject=subject, html=page))


#: How a message of each channel other than SMS is labelled in its ``encoding`` column.
_ENCODING = {Channel.VOICE: "speech", Channel.EMAIL: "UTF-8"}


def code_message(
    policy: ServicePolicy,
    *,
    message_id: str,
    account_id: str,
    verification_id: str,
    to: str,
    channel: Channel,
    locale: str,
    code: str,
    context: Mapping[str, str] | None,
    now: datetime,
) -> tuple[Message, str]:
    """The outbox row of one send of ``code`` on ``channel``, with its text measured now (an
    SMS's segments and encoding are part of the answer), and the text as stored: every form
    of the code masked. A call or an e-mail counts as one part. ``InvalidRequest`` when a
    context pushes an SMS past one segment, or past ``sms.MAX_MULTIPART_SEGMENTS`` when the
    service allows multipart (templates alone are proven to fit)."""
    composed = compose(policy, channel, code=code, locale=locale, context=context)
    if channel is Channel.SMS:
        shape = sms.measure(composed.text)
        if shape.segments > (sms.MAX_MULTIPART_SEGMENTS if policy.allow_multipart else 1):
            raise InvalidRequest(
                f"with this context the message needs {shape.segments} SMS segments; use "
                "shorter values or GSM-7 characters",
                param="context",
            )
        segments, encoding = shape.segments, shape.encoding
    else:
        segments, encoding = 1, _ENCODING[channel]
    message = Message(
        id=message_id,
        account_id=account_id,
        verification_id=verification_id,
        channel=channel,
        to=to,
        status=MessageStatus.QUEUED,
        locale=locale,
        segments=segments,
        encoding=encoding,
        created_at=now,
        updated_at=now,
    )
    return message, composed.masked


def effective_policy(
    policy: ServicePolicy, *, template: str | None, sender_id: str | None
) -> ServicePolicy:
    """The service's policy with a verification's own template (for every locale) and sender
    in place of the service's, when it has them (LabsMobile's sendCode ``message`` and
    ``sender``)."""
    if template is None and sender_id is None:
        return policy
    return replace(
        policy,
        templates={policy.default_locale: template} if template is not None else policy.templates,
        sender_id=sender_id if sender_id is not None else policy.sender_id,
    )


def mask_code(text: str, code: str) -> str:
    """The text with every occurrence of the code replaced by asterisks, for storage."""
    return text.replace(code, "*" * len(code))
