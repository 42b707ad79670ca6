"""Rate limits: the ``rate_limits`` policy field, ``client_ip``, the counters a send uses, and
the in-process limiter's all-or-nothing counting (real ``limits`` storage, no Redis)."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest

from otpgate.adapters.metrics import PrometheusMetrics
from otpgate.adapters.ratelimit import LimitsRateLimiter
from otpgate.adapters.storage.store import policy_from_json, policy_to_json
from otpgate.domain import policy as rules
from otpgate.domain.fraud import prefix_of
from otpgate.domain.model import DEFAULT_START_LIMITS, Limit, RateLimits, Service
from otpgate.domain.ports import RateCounter
from otpgate.errors import ConfigurationError, InvalidRequest, RateLimited
from otpgate.services.ratelimit import RateLimiting, client_key
from otpgate.settings import Settings


def service(rate_limits: Any = None) -> Service:
    fields: dict[str, Any] = {"name": "Acme"}
    if rate_limits is not None:
        fields["rate_limits"] = rate_limits
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Service("svc_1", "acc_1", rules.build_policy(fields), now, now)


def test_the_defaults_are_the_documented_figures() -> None:
    assert RateLimits().effective() == {
        "per_number": Limit(10, 3_600),
        "per_prefix": Limit(10, 600),
        "per_country": Limit(3_000, 600),
        "per_ip": Limit(100, 3_600),
        "per_service": Limit(30_000, 600),
    }
    assert RateLimits().fail_open is False


def test_an_override_replaces_only_what_it_names_and_round_trips_through_storage() -> None:
    policy = service({"per_prefix": {"limit": 3, "window_seconds": 60}, "fail_open": True}).policy
    assert policy.rate_limits.limit("per_prefix") == Limit(3, 60)
    assert policy.rate_limits.limit("per_number") == DEFAULT_START_LIMITS["per_number"]
    assert policy.rate_limits.fail_open is True
    stored = policy_to_json(policy)
    # Only what the service set is stored: the defaults stay the release's own.
    assert stored["rate_limits"] == {
        "per_prefix": {"limit": 3, "window_seconds": 60},
        "fail_open": True,
    }
    assert policy_from_json(stored) == policy
    # A service stored before rate limits existed has the defaults.
    del stored["rate_limits"]
    assert policy_from_json(stored).rate_limits == RateLimits()


@pytest.mark.parametrize(
    "bad",
    [
        [],
        5,
        {"per_number": 5},
        {"per_number": {"limit": 5}},
        {"per_number": {"limit": 5, "window_seconds": 60, "extra": 1}},
        {"per_number": {"limit": 0, "window_seconds": 60}},
        {"per_number": {"limit": 5, "window_seconds": 86_401}},
        {"per_number": {"limit": False, "window_seconds": 60}},
        {"per_account": {"limit": 5, "window_seconds": 60}},
        {"fail_open": 1},
    ],
)
def test_a_bad_rate_limits_object_names_rate_limits(bad: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        rules.build_policy({"name": "Acme", "rate_limits": bad})
    assert refused.value.param == "rate_limits"


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:0DB8:0000::0001", "2001:db8::1"),
        ("::ffff:203.0.113.7", "::ffff:cb00:7107"),
        (None, None),
    ],
)
def test_client_ip_is_an_ipv4_or_ipv6_address(given: Any, canonical: Any) -> None:
    assert rules.validate_client_ip(given) == canonical


@pytest.mark.parametrize("bad", ["", "1.2.3", "1.2.3.4.5", "01.2.3.4", "host", "1.2.3.4/8", 7])
def test_a_bad_client_ip_names_client_ip(bad: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        rules.validate_client_ip(bad)
    assert refused.value.param == "client_ip"


def test_prefixes_and_address_keys() -> None:
    assert prefix_of("+34600123456") == "+34600123"
    assert prefix_of("+447911123456") == "+447911123"
    assert client_key("203.0.113.7") == "203.0.113.7"
    assert (
        client_key("2001:db8:1:2:aaaa::1")
        == client_key("2001:db8:1:2::ffff")
        == ("2001:db8:1:2::/64")
    )
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"


def hidden(key: bytes, value: str) -> str:
    """What a counter key holds for a destination or address: 128 bits of keyed BLAKE2b."""
    mac = hashlib.blake2b(value.encode(), key=key, digest_size=16).digest()
    return base64.urlsafe_b64encode(mac).decode().rstrip("=")


def test_a_send_uses_every_counter_most_specific_first() -> None:
    key = b"k" * 32
    limiting = RateLimiting(
        limiter=LimitsRateLimiter.in_process(),
        metrics=PrometheusMetrics(),
        per_account=Limit(500, 60),
        key=key,
    )
    counters = limiting.send_counters(
        service(), to="+34600123456", country="ES", client_ip="203.0.113.7"
    )
    assert [(c.name, c.key, c.limit, c.window_seconds) for c in counters] == [
        ("per_number", f"svc_1/number/{hidden(key, '+34600123456')}", 10, 3_600),
        ("per_prefix", f"svc_1/prefix/{hidden(key, '+34600123')}", 10, 600),
        ("per_country", "svc_1/country/ES", 3_000, 600),
        ("per_ip", f"svc_1/ip/{hidden(key, '203.0.113.7')}", 100, 3_600),
        ("per_service", "svc_1/service", 30_000, 600),
        ("per_account", "acc_1/account", 500, 60),
    ]
    # An e-mail destination has no prefix or country; no client_ip, no address.
    by_mail = limiting.send_counters(service(), to="a@example.com", country=None)
    assert [c.name for c in by_mail] == ["per_number", "per_service", "per_account"]


async def test_counter_keys_name_no_destination_or_address() -> None:
    """A dump of the counters (Redis, or the process) names nobody; the same key counts the
    same destination alike in every process, another key differently."""
    first = RateLimiting(
        limiter=LimitsRateLimiter.in_process(), metrics=PrometheusMetrics(), key=b"a" * 32
    )
    again = RateLimiting(
        limiter=LimitsRateLimiter.in_process(), metrics=PrometheusMetrics(), key=b"a" * 32
    )
    other = RateLimiting(
        limiter=LimitsRateLimiter.in_process(), metrics=PrometheusMetrics(), key=b"b" * 32
    )

    def keys(limiting: RateLimiting, to: str) -> list[str]:
        counters = limiting.send_counters(
            service(), to=to, country="ES", client_ip="2001:db8:1:2::7"
        )
        return [c.key for c in counters]

    for to in ("+34600123456", "ana@example.com", "+34600123\udc80"):
        shown = " ".join(keys(first, to))
        for secret in (to, "600123", "2001:db8", "example.com"):
            assert secret not in shown
        assert keys(first, to) == keys(again, to)
        assert keys(first, to) != keys(other, to)


async def test_a_refusal_counts_nothing_on_any_counter() -> None:
    limiter = LimitsRateLimiter.in_process()
    wide = RateCounter("wide", "k/wide", 5, 60)
    narrow = RateCounter("narrow", "k/narrow", 1, 60)
    assert await limiter.acquire([wide, narrow]) is None
    for _ in range(3):
        refusal = await limiter.acquire([wide, narrow])
        assert refusal is not None and refusal.counter == narrow
        assert 0 < refusal.retry_after <= 60
    # wide was counted once: four more fit, the fifth does not.
    for _ in range(4):
        assert await limiter.acquire([wide]) is None
    refusal = await limiter.acquire([wide])
    assert refusal is not None and refusal.counter == wide


async def test_the_refusal_names_the_limit_and_carries_retry_after() -> None:
    limiting = RateLimiting(limiter=LimitsRateLimiter.in_process(), metrics=PrometheusMetrics())
    svc = service({"per_prefix": {"limit": 1, "window_seconds": 90}})
    await limiting.send(svc, to="+34600123000", country="ES")
    with pytest.raises(RateLimited) as refused:
        await limiting.send(svc, to="+34600123001", country="ES")
    assert "per_prefix" in refused.value.detail
    assert refused.value.retry_after is not None and 1 <= refused.value.retry_after <= 90


def test_the_redis_url_is_a_secret_and_a_bad_one_is_refused_without_echoing_it() -> None:
    settings = Settings(redis_url="redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(settings)
    with pytest.raises(ConfigurationError) as refused:
        LimitsRateLimiter.redis(
            "http://:hunter2@127.0.0.1:6379", key_prefix="x", timeout_seconds=0.5
        )
    assert "hunter2" not in str(refused.value)
