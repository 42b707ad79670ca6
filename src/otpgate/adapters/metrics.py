"""Prometheus metrics behind the ``Metrics`` port. Each container has its own registry, so
several apps in one process (tests) never collide."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

_EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "verification_started": ("Verifications created", ("channel",)),
    "verification_resent": ("Codes sent again on a pending verification", ("channel",)),
    "verification_failed": ("Verifications failed because every route failed", ()),
    "verification_fallback": (
        "Codes moved to the service's next channel (a failure, or no check in time)",
        ("channel",),
    ),
    "check": ("Code checks by result", ("result",)),
    "destination_locked": ("Destinations locked after consecutive failures (S8)", ()),
    "destination_blocked": (
        "Sends refused by a block in force (SMS-pumping defence)",
        ("kind",),
    ),
    "block_created": (
        "Blocks of a prefix or a country, by the detector or an operator",
        ("kind", "by"),
    ),
    "message_queued": ("Plain messages queued", ("channel",)),
    "callback": ("Calls to callers' URLs by result (delivered, retry, given_up)", ("result",)),
    "webhook": ("Webhook event deliveries by result (delivered, retry, given_up)", ("result",)),
    "message_sent": ("Messages accepted by a provider", ("provider",)),
    "message_retry": ("Transient delivery errors scheduled for retry", ("provider",)),
    "message_send_timeout": (
        "Sends without an answer in time (the provider may have sent them)",
        ("provider",),
    ),
    "message_failed": ("Messages failed for good", ("provider",)),
    "receipt": ("Delivery receipts applied", ("provider", "status")),
    "test_verification": (
        "Starts and resends to test numbers (nothing sent, no limit, credit or cap used)",
        ("kind",),
    ),
    "spend_cap_refusal": ("Sends refused by a daily spend cap", ("cap",)),
    "rate_limited": ("Sends and checks refused by a rate limit, by limit", ("limit",)),
    "rate_limit_unavailable": (
        "Sends and checks refused because the rate-limit store could not answer",
        ("kind",),
    ),
    "rate_limit_fail_open": (
        "Sends let through unlimited while the rate-limit store could not answer "
        "(services with fail_open)",
        (),
    ),
}


class PrometheusMetrics:
    """Implements ``otpgate.domain.ports.Metrics``; unknown events are a programming error."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters = {
            name: Counter(f"otpgate_{name}", doc, labels, registry=self.registry)
            for name, (doc, labels) in _EVENTS.items()
        }
        self.request_seconds = Histogram(
            "otpgate_http_request_seconds",
            "HTTP request latency by route template and status class",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self._children: dict[tuple[str, ...], Any] = {}
        self._request_children: dict[tuple[str, str, str], Any] = {}

    def count(self, event: str, **labels: str) -> None:
        key = (event, *labels.values())
        child = self._children.get(key)
        if child is None:  # labels() is a lock and a dict walk: resolve each series once
            counter = self._counters[event]
            child = counter.labels(**labels) if labels else counter
            self._children[key] = child
        child.inc()

    def observe_request(self, method: str, route: str, status: str, seconds: float) -> None:
        key = (method, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self.request_seconds.labels(method, route, status)
            self._request_children[key] = child
        child.observe(seconds)

    def watch_circuits(self, states: Callable[[], Iterable[tuple[str, int]]]) -> None:
        """Export ``otpgate_provider_circuit_state{provider}`` (0 closed, 1 half-open, 2 open),
        read from ``states`` at every scrape, since a circuit half-opens by the clock alone."""
        self.registry.register(_CircuitCollector(states))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CircuitCollector(Collector):
    def __init__(self, states: Callable[[], Iterable[tuple[str, int]]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "otpgate_provider_circuit_state",
            "Circuit breaker of each provider: 0 closed, 1 half-open (trial), 2 open (resting)",
            labels=["provider"],
        )
        for provider, value in self._states():
            family.add_metric([provider], value)
        yield family
