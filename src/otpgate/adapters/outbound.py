"""Outbound HTTP calls to URLs that callers supply (LabsMobile ``ackurl`` delivery reports,
webhooks), made so that a caller cannot aim otpgate at the network it runs in.

A caller who can make otpgate fetch any URL could read a cloud metadata service or reach an
internal admin page. :class:`OutboundHttp` therefore keeps these rules:

* **Scheme and host.** Only ``http`` and ``https`` URLs with a host, at most
  :data:`MAX_URL_LENGTH` characters. A host written as an address must be a canonical one (a
  dotted quad, or IPv6 in brackets); ``2130706433`` or ``127.1`` are refused.
* **Addresses.** The host is resolved when the call is made, and *every* address it resolves to
  is checked; one refused address refuses the whole name. Refused (see :func:`classify`):
  loopback, private (RFC 1918, ``fc00::/7``), link-local (``169.254/16``, ``fe80::/10``), the
  cloud metadata addresses (``169.254.169.254``, ``fd00:ec2::254``), unspecified (``0.0.0.0/8``,
  ``::``), multicast, shared address space (CGNAT, ``100.64/10``), reserved and documentation
  ranges, and the IPv6 forms that carry one of these IPv4 addresses (IPv4-mapped
  ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``). The operator can let a range
  through (``OTPGATE_OUTBOUND_ALLOW``, CIDRs); a range never opens a metadata address unless it
  is exactly that address. Outside production, loopback is allowed so that development works.
* **No DNS rebinding window.** The call connects only to the addresses that were checked: the
  connector's resolver hands back the checked answer instead of asking DNS again, and an
  address literal is checked as written (aiohttp never resolves one).
* **Redirects are not followed.** A 3xx is an answer, not a success.
* **Bounded.** One timeout covers resolution, connection, request and answer headers; at most
  :data:`MAX_ANSWER_BYTES` of the answer's body are read (and thrown away), within what is left
  of the same timeout, and the connection is closed after every call (no pooling: every
  connection follows a fresh check).
* **Nothing from the environment**: no proxy, no ``.netrc``.
* **Nothing secret in logs or errors.** URLs of this kind carry tokens in their query, path or
  user information, so logs and error details name only the origin (``https://host:port``);
  the errors do not chain the HTTP library's exceptions, whose text can hold the URL.

Errors (``otpgate.errors``): :class:`OutboundRefused` for a URL that may not be called (bad
scheme, refused address), :class:`PermanentOutboundError` for an answer that retrying the same
URL will not change (3xx, 4xx other than 408 and 429), :class:`TransientOutboundError` for the
rest (timeouts, names that do not resolve, connection and TLS errors, 408, 429, 5xx), with
``retry_after`` from a 429's or 503's ``Retry-After`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

import aiohttp
import certifi
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from otpgate.errors import (
    OutboundError,
    OutboundRefused,
    PermanentOutboundError,
    TransientOutboundError,
)
from otpgate.settings import Environment, Settings

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_URL_LENGTH",
    "AddressPolicy",
    "OutboundHttp",
    "classify",
    "from_settings",
]

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The most of an answer's body that is read; the rest is never downloaded.
MAX_ANSWER_BYTES: Final = 4096
#: Longer URLs are refused: no ack or webhook URL needs more, and every hop has its own limit.
MAX_URL_LENGTH: Final = 2048

_E = TypeVar("_E", bound=OutboundError)

_SCHEMES: Final = frozenset({"http", "https"})
_USER_AGENT: Final = "otpgate"


def _rules(*rows: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(cidr), kind) for cidr, kind in rows)


# The first matching row names the kind; more specific rows come first.
_IPV4_RULES: Final = _rules(
    ("169.254.169.254/32", "metadata"),  # AWS, GCP, Azure, OpenStack... instance metadata
    ("127.0.0.0/8", "loopback"),
    ("0.0.0.0/8", "unspecified"),  # "this network"; 0.0.0.0 reaches the local host on Linux
    ("10.0.0.0/8", "private"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("100.64.0.0/10", "shared"),  # carrier-grade NAT
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),  # and the broadcast address
    ("192.0.0.0/24", "reserved"),  # IETF protocol assignments
    ("192.0.2.0/24", "reserved"),  # documentation
    ("198.51.100.0/24", "reserved"),  # documentation
    ("203.0.113.0/24", "reserved"),  # documentation
    ("198.18.0.0/15", "reserved"),  # benchmarking
)
_IPV6_RULES: Final = _rules(
    ("fd00:ec2::254/128", "metadata"),  # AWS instance metadata over IPv6
    ("::1/128", "loopback"),
    ("::/128", "unspecified"),
    ("fc00::/7", "private"),  # unique local
    ("fec0::/10", "private"),  # site-local (deprecated)
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("64:ff9b:1::/48", "private"),  # local-use NAT64
    ("::/8", "reserved"),  # IPv4-compatible and other legacy forms
    ("100::/64", "reserved"),  # discard-only
    ("2001::/23", "reserved"),  # IETF protocol assignments, Teredo included
    ("2001:db8::/32", "reserved"),  # documentation
    ("3fff::/20", "reserved"),  # documentation
)
_IPV4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, bool] | None:
    """The IPv4 address an IPv6 address stands for, and whether it is the same host (an
    IPv4-mapped address is; a NAT64 or 6to4 address is reached through a gateway)."""
    if address in _IPV4_MAPPED:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF), True
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF), False
    if address.sixtofour is not None:
        return address.sixtofour, False
    return None


def classify(address: IPAddress) -> str | None:
    """The kind of a non-public address — ``metadata``, ``loopback``, ``unspecified``,
    ``private``, ``shared``, ``link-local``, ``multicast`` or ``reserved`` — or ``None`` for a
    public one. An IPv6 form of an IPv4 address is the kind of that IPv4 address; only the
    IPv4-mapped form of a loopback address is loopback itself (a NAT64 or 6to4 one is
    ``reserved``). Anything Python's ``ipaddress`` does not call global is ``reserved``."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            ipv4, same_host = embedded
            kind = classify(ipv4)
            if kind == "loopback" and not same_host:
                return "reserved"
            return kind
        rules = _IPV6_RULES
    else:
        rules = _IPV4_RULES
    for network, kind in rules:
        if address in network:
            return kind
    return None if address.is_global else "reserved"


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """Which addresses an outbound call may reach: public ones always, non-public ones inside
    ``allow``, and loopback too when ``allow_loopback`` (outside production)."""

    allow: tuple[IPNetwork, ...] = ()
    allow_loopback: bool = False

    def refusal(self, address: IPAddress) -> str | None:
        """``None`` when ``address`` may be called; otherwise the kind that refuses it."""
        kind = classify(address)
        if kind is None or (kind == "loopback" and self.allow_loopback):
            return None
        forms: list[IPAddress] = [address]
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            forms.append(address.ipv4_mapped)  # the same host: an IPv4 range covers it
        for network in self.allow:
            # A broad range (0.0.0.0/0, 169.254.0.0/16) is not a reason to expose instance
            # credentials: a metadata address is opened only by naming it exactly.
            if kind == "metadata" and network.num_addresses > 1:
                continue
            if any(form.version == network.version and form in network for form in forms):
                return None
        return kind


def from_settings(settings: Settings) -> OutboundHttp:
    """The client for ``OTPGATE_OUTBOUND_ALLOW``, ``OTPGATE_OUTBOUND_TIMEOUT_SECONDS`` and
    ``OTPGATE_ENV`` (loopback allowed outside production)."""
    return OutboundHttp(
        policy=AddressPolicy(
            allow=settings.outbound_allow_ranges,
            allow_loopback=settings.env is not Environment.PRODUCTION,
        ),
        timeout_seconds=settings.outbound_timeout_seconds,
    )


class _PinnedResolver(AbstractResolver):
    """Answers with the addresses already checked, so the connector cannot ask DNS again."""

    def __init__(self, hosts: list[ResolveResult]) -> None:
        self._hosts = hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return list(self._hosts)

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class _Target:
    url: yarl.URL
    host: str
    port: int
    literal: IPAddress | None
    origin: str  # scheme://host:port, the only part of the URL that is ever logged


class OutboundHttp:
    """GET and POST requests to caller-supplied URLs, under the rules of the module docstring.

    ``resolver`` answers name lookups (aiohttp's ``ThreadedResolver``, the system's
    ``getaddrinfo``, by default; tests give their own). It is asked once per call; ``aclose``
    closes it. The client keeps no connection open between calls.
    """

    def __init__(
        self,
        *,
        policy: AddressPolicy,
        timeout_seconds: float = 5.0,
        resolver: AbstractResolver | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError("timeout_seconds must be positive")
        self.policy = policy
        self._timeout_seconds = timeout_seconds
        self._resolver = resolver

    def __repr__(self) -> str:
        return f"OutboundHttp(policy={self.policy!r}, timeout_seconds={self._timeout_seconds})"

    async def aclose(self) -> None:
        if self._resolver is not None:
            await self._resolver.close()

    # ----------------------------------------------------------------------------------------
    # The port

    def validate(self, url: str) -> None:
        """Raise :class:`OutboundRefused` for a URL that can never be called: not ``http`` or
        ``https``, no host, too long, a malformed address literal, or a literal address the
        policy refuses. A host name passes here; its addresses are checked at call time."""
        self._target(url)

    async def get(self, url: str, params: Mapping[str, str]) -> int:
        """GET ``url`` with ``params`` added to its query; the HTTP status of a 2xx answer.

        Raises :class:`OutboundRefused` before anything is connected when the URL or any
        address of its host is refused, :class:`PermanentOutboundError` for a 3xx or 4xx
        answer (but 408 and 429), and :class:`TransientOutboundError` for timeouts, names
        that do not resolve, connection or TLS failures, 408, 429 and 5xx. Each error's
        ``answer_status`` is the HTTP status when there was an answer."""
        try:
            target = self._target(url)
        except OutboundRefused as error:
            raise _logged(error, origin=None) from None
        try:
            return await self._call(target, "GET", params=params)
        except OutboundError as error:
            raise _logged(error, origin=target.origin) from None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        """POST ``body`` with ``headers`` (a webhook delivery) to ``url``: the same address
        rules, timeout, redirect refusal and errors as :meth:`get`."""
        try:
            target = self._target(url)
        except OutboundRefused as error:
            raise _logged(error, origin=None) from None
        try:
            return await self._call(target, "POST", body=body, headers=headers)
        except OutboundError as error:
            raise _logged(error, origin=target.origin) from None

    # ----------------------------------------------------------------------------------------
    # Internals

    async def _call(
        self,
        target: _Target,
        method: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        request_url = target.url.extend_query(params) if params else target.url
        sent_headers = {**(headers or {}), "User-Agent": _USER_AGENT}
        # One deadline for the whole call; the body alone may run into it without failing it.
        deadline = asyncio.get_running_loop().time() + self._timeout_seconds
        try:
            async with asyncio.timeout_at(deadline):
                hosts = await self._checked_hosts(target)
            async with self._session(hosts) as session:
                async with asyncio.timeout_at(deadline):
                    response = await session.request(
                        method,
                        request_url,
                        data=body,
                        allow_redirects=False,
                        raise_for_status=False,
                        headers=sent_headers,
                    )
                try:
                    status = response.status
                    retry_after = response.headers.get("Retry-After", "")
                    # The status is the answer whether or not the body arrives in time.
                    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                        async with asyncio.timeout_at(deadline):
                            await _drain(response.content, MAX_ANSWER_BYTES)
                finally:
                    response.close()
        except TimeoutError:
            raise TransientOutboundError(
                f"{target.origin}: no answer within {self._timeout_seconds:g} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise TransientOutboundError(f"{target.origin}: {_describe(exc)}") from None
        if 200 <= status < 300:
            log.debug("outbound call answered", extra={"origin": target.origin, "status": status})
            return status
        raise _answer_error(target.origin, status, retry_after)

    def _target(self, url: str) -> _Target:
        if len(url) > MAX_URL_LENGTH:
            raise OutboundRefused(f"URL longer than {MAX_URL_LENGTH} characters")
        try:
            parsed = yarl.URL(url)
            scheme, host, port = parsed.scheme.lower(), parsed.host, parsed.port
            # yarl parses some parts only when asked: ask now, so a bad URL fails here.
            origin = str(parsed.origin()) if host else ""
        except (ValueError, TypeError):
            raise OutboundRefused("the URL cannot be parsed") from None
        if scheme not in _SCHEMES:
            raise OutboundRefused("only http and https URLs can be called")
        if not host or port is None:
            raise OutboundRefused("the URL has no host")
        try:
            literal = _address_literal(host)
        except ValueError:
            raise OutboundRefused(
                f"{origin}: the host is neither a name nor a canonical address"
            ) from None
        if literal is not None:
            self._check(origin, literal)
        return _Target(parsed.with_fragment(None), host, port, literal, origin)

    def _check(self, origin: str, address: IPAddress) -> None:
        kind = self.policy.refusal(address)
        if kind is not None:
            raise OutboundRefused(f"{origin}: {address} is a {kind} address, which is not allowed")

    async def _checked_hosts(self, target: _Target) -> list[ResolveResult]:
        """The addresses to connect to, every one of them allowed."""
        if target.literal is not None:
            return []  # aiohttp connects to a literal as written; it was checked in _target
        if self._resolver is None:
            self._resolver = aiohttp.ThreadedResolver()
        try:
            hosts = await self._resolver.resolve(target.host, target.port, socket.AF_UNSPEC)
        except OSError:
            hosts = []
        if not hosts:
            raise TransientOutboundError(f"{target.origin}: the name does not resolve")
        for entry in hosts:
            try:
                address = ipaddress.ip_address(entry["host"])
            except ValueError:
                raise OutboundRefused(
                    f"{target.origin}: the name resolved to an unreadable address"
                ) from None
            self._check(target.origin, address)
        return hosts

    def _session(self, hosts: list[ResolveResult]) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            resolver=_PinnedResolver(hosts),
            use_dns_cache=False,
            force_close=True,
            ssl=_tls_context(),
        )
        return aiohttp.ClientSession(
            connector=connector,
            trust_env=False,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            timeout=aiohttp.ClientTimeout(total=None),  # the caller's asyncio.timeout rules
        )


def _answer_error(origin: str, status: int, retry_after: str) -> OutboundError:
    """The error for an HTTP answer other than 2xx."""
    error: OutboundError
    if status in (408, 429) or status >= 500:
        seconds = _seconds(retry_after) if status in (429, 503) else None
        error = TransientOutboundError(f"{origin}: answered HTTP {status}", retry_after=seconds)
    elif 300 <= status < 400:
        error = PermanentOutboundError(
            f"{origin}: answered with a redirect (HTTP {status}), which is not followed"
        )
    else:
        error = PermanentOutboundError(f"{origin}: answered HTTP {status}")
    error.answer_status = status
    return error


def _logged(error: _E, *, origin: str | None) -> _E:
    """Log a failed call (a refusal as a warning: someone tried to reach a closed address)."""
    level = logging.WARNING if isinstance(error, OutboundRefused) else logging.INFO
    log.log(level, "outbound call failed: %s", error.detail, extra={"origin": origin})
    return error


def _address_literal(host: str) -> IPAddress | None:
    """The address a host literally is, or ``None`` for a name. Raises ``ValueError`` for a
    host that a resolver would take as an address (a colon, or anything the C library's
    ``inet_aton`` reads as IPv4) and that is not a canonical address: ``127.1``,
    ``2130706433``, ``010.0.0.1`` (octal), ``0xA9FEA9FE`` (hex), a malformed IPv6 address."""
    if ":" not in host:
        try:
            socket.inet_aton(host)
        except OSError:
            return None  # a name
    return ipaddress.ip_address(host)


async def _drain(content: aiohttp.StreamReader, limit: int) -> None:
    remaining = limit
    while remaining > 0:
        chunk = await content.read(remaining)
        if not chunk:
            return
        remaining -= len(chunk)


def _describe(exc: aiohttp.ClientError) -> str:
    """What went wrong, without the exception's own text (which can hold the URL)."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the name does not resolve"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS failed ({type(exc).__name__})"
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"connection failed ({reason})"
    return f"connection lost ({type(exc).__name__})"


def _seconds(header: str) -> float | None:
    value = header.strip()
    return float(value) if value.isdecimal() else None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context
