"""Rate limits on sends and checks (docs/security.md, "Rate limits").

Every send of a code — a start, a resend, a start that becomes a resend — is counted, per
service, against its destination number, its number prefix (the number without its last
3 digits: 1,000 consecutive numbers, the unit SMS pumping works in), its country, the end
user's address when the integrator passes it (``client_ip``), the service, and the account.
The service's ``rate_limits`` say how many per window (``model.RateLimits``); the account's
limit and the check limit are the operator's (settings). Checks of a code are counted per
destination and service, so guessing across a destination's verifications stays bounded.

A refusal is ``RateLimited`` (429 ``rate_limited``) naming the limit, with ``retry_after``:
when the oldest event in that limit's window leaves it. A refused request counts nothing.

Counter keys never hold a phone number, an e-mail address or an end user's address: those
parts are a keyed hash (BLAKE2b keyed with a key derived from the master secret, 128 bits),
so a dump of Redis or of the process names nobody, and processes sharing the master secret count
the same destination under the same key.

When the shared store (Redis) cannot answer: a send is refused with ``Unavailable`` (503),
unless its service sets ``rate_limits.fail_open`` — then it goes on, unlimited, and a warning
is logged; a check is always refused (503), never left unlimited.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import secrets

from otpgate.domain.fraud import prefix_of
from otpgate.domain.model import Limit, Service
from otpgate.domain.phone import mask
from otpgate.domain.ports import Metrics, RateCounter, RateLimiter, RateRefusal
from otpgate.errors import RateLimited, Unavailable

log = logging.getLogger(__name__)

#: The operator's defaults: sends per account, and checks per destination and service.
DEFAULT_ACCOUNT_LIMIT = Limit(60_000, 600)
DEFAULT_CHECK_LIMIT = Limit(60, 3_600)

_WHAT = {
    "per_number": "sends to this number",
    "per_prefix": "sends to numbers of this prefix",
    "per_country": "sends to this country",
    "per_ip": "sends for this client_ip",
    "per_service": "sends in this service",
    "per_account": "sends in this account",
    "per_destination_checks": "checks for this destination",
}


def client_key(client_ip: str) -> str:
    """How an end user's address is counted: an IPv4 address as it is, an IPv6 address by
    its /64 (one subscriber's network: the addresses inside it are free to pick)."""
    address = ipaddress.ip_address(client_ip)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class RateLimiting:
    def __init__(
        self,
        *,
        limiter: RateLimiter,
        metrics: Metrics,
        per_account: Limit = DEFAULT_ACCOUNT_LIMIT,
        checks: Limit = DEFAULT_CHECK_LIMIT,
        key: bytes | None = None,
    ) -> None:
        """``key`` makes the hashed parts of counter keys; processes that share counters (one
        Redis) must share it. None: a random key, for a limiter used by one process only."""
        self._limiter = limiter
        self._metrics = metrics
        self._per_account = per_account
        self._checks = checks
        self._key = key if key is not None else secrets.token_bytes(32)

    def _hidden(self, value: str) -> str:
        """A destination or address as a counter key holds it: a keyed hash, never the value.
        BLAKE2b in its keyed (MAC) mode: one C call, a third of HMAC-SHA256's cost on the
        path of every start and check."""
        mac = hashlib.blake2b(
            value.encode("utf-8", "surrogatepass"), key=self._key, digest_size=16
        ).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def send_counters(
        self,
        service: Service,
        *,
        to: str,
        country: str | None,
        client_ip: str | None = None,
        safe: bool = False,
    ) -> list[RateCounter]:
        """The counters one send of a code to ``to`` (E.164, or an e-mail address) uses,
        the most specific first (a refusal names the first without room). A ``safe``
        destination (on its account's safe list) is not counted by prefix."""
        limits = service.policy.rate_limits

        def counter(name: str, key: str, limit: Limit | None = None) -> RateCounter:
            shape = limit or limits.limit(name)
            return RateCounter(name, key, shape.limit, shape.window_seconds)

        scope = service.id
        hidden = self._hidden
        counters = [counter("per_number", f"{scope}/number/{hidden(to)}")]
        if to.startswith("+") and not safe:
            counters.append(counter("per_prefix", f"{scope}/prefix/{hidden(prefix_of(to))}"))
        if country is not None:
            counters.append(counter("per_country", f"{scope}/country/{country}"))
        if client_ip is not None:
            counters.append(counter("per_ip", f"{scope}/ip/{hidden(client_key(client_ip))}"))
        counters.append(counter("per_service", f"{scope}/service"))
        counters.append(counter("per_account", f"{service.account_id}/account", self._per_account))
        return counters

    async def send(
        self,
        service: Service,
        *,
        to: str,
        country: str | None,
        client_ip: str | None = None,
        safe: bool = False,
    ) -> None:
        """Count one send of a code, or refuse it: ``RateLimited`` when a limit has no room,
        ``Unavailable`` when the store cannot answer and the service does not fail open.
        ``safe``: the destination is safe-listed, so no prefix limit applies."""
        counters = self.send_counters(
            service, to=to, country=country, client_ip=client_ip, safe=safe
        )
        try:
            refusal = await self._limiter.acquire(counters)
        except Unavailable:
            if not service.policy.rate_limits.fail_open:
                self._metrics.count("rate_limit_unavailable", kind="send")
                raise
            self._metrics.count("rate_limit_fail_open")
            log.warning(
                "rate-limit store down: send not limited (the service fails open)",
                extra={"service_id": service.id, "to": mask(to)},
            )
            return
        if refusal is not None:
            self._refuse(refusal, kind="send", service_id=service.id, to=to)

    async def check(self, *, service_id: str, to: str) -> None:
        """Count one check of a code for ``to`` in the service, or refuse it:
        ``RateLimited``, or ``Unavailable`` whenever the store cannot answer (checks fail
        closed: an attacker who can take the store down gets no unlimited guesses)."""
        counter = RateCounter(
            "per_destination_checks",
            f"{service_id}/check/{self._hidden(to)}",
            self._checks.limit,
            self._checks.window_seconds,
        )
        try:
            refusal = await self._limiter.acquire((counter,))
        except Unavailable:
            self._metrics.count("rate_limit_unavailable", kind="check")
            raise
        if refusal is not None:
            self._refuse(refusal, kind="check", service_id=service_id, to=to)

    def _refuse(self, refusal: RateRefusal, *, kind: str, service_id: str, to: str) -> None:
        counter = refusal.counter
        self._metrics.count("rate_limited", limit=counter.name)
        log.info(
            "rate limited",
            extra={"service_id": service_id, "to": mask(to), "limit": counter.name},
        )
        raise RateLimited(
            f"rate limit {counter.name} reached: at most {counter.limit} {_WHAT[counter.name]} "
            f"per {counter.window_seconds} s",
            retry_after=refusal.retry_after,
        )
