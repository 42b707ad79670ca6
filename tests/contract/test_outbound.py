"""Outbound calls to caller-supplied URLs (``otpgate.adapters.outbound``): only where the
address rules allow, never following redirects, bounded in time and size, and silent about
URLs' queries.

Every test here runs under :func:`connect_guard`, which sees every socket ``connect`` of the
process: one aimed outside 127.0.0.0/8 and ::1 fails the test (and is stopped before it leaves
the machine), and the refusal tests assert that nothing was connected at all. Names are
resolved by :class:`StaticResolver`, a table the test writes, so no real lookup happens; the
servers are aiohttp servers on loopback started by the tests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import RawTestServer

from otpgate.adapters.outbound import (
    MAX_URL_LENGTH,
    AddressPolicy,
    OutboundHttp,
    classify,
    from_settings,
)
from otpgate.errors import (
    OutboundError,
    OutboundRefused,
    PermanentOutboundError,
    TransientOutboundError,
)
from otpgate.settings import Settings

#: The body of ``/endless``: far more than any answer otpgate reads, and than the socket buffers
#: between the server and the client hold.
ENDLESS_BYTES = 256 * 1_048_576

PRODUCTION = AddressPolicy(allow_loopback=False)
DEVELOPMENT = AddressPolicy(allow_loopback=True)

# --------------------------------------------------------------------------------------------
# The guard, the resolver and the servers


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass
class ConnectLog:
    """Every address a socket of this process tried to connect to during the test."""

    attempts: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)


@pytest.fixture(autouse=True)
def connect_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectLog]:
    """Record every ``connect``; stop (and fail the test on) any outside loopback."""
    record = ConnectLog()
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        host = address[0] if isinstance(address, tuple) else str(address)
        record.attempts.append(host)
        if not _is_loopback(host):
            record.stopped.append(host)
            raise PermissionError(f"test guard: no connection to {host} outside loopback")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield record
    assert record.stopped == [], f"tried to connect outside loopback: {record.stopped}"


class StaticResolver(AbstractResolver):
    """DNS as the test writes it: ``answers[name]`` is the list of addresses of each lookup in
    turn (the last one repeats); an unknown name does not resolve."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.lookups.append(host)
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        turns = self.answers[host]
        addresses = turns[min(self.lookups.count(host), len(turns)) - 1]
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


@dataclass
class Receiver:
    """A loopback HTTP server standing in for a caller's ack or webhook receiver."""

    base: str = ""
    port: int = 0
    requests: list[web.BaseRequest] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stream_cut: asyncio.Event = field(default_factory=asyncio.Event)
    streamed_bytes: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests.append(request)
        path = request.path
        if path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            if 300 <= status < 400:
                headers["Location"] = "http://169.254.169.254/latest/meta-data/"
            return web.Response(status=status, headers=headers, text="answer")
        if path == "/hang":  # never answers (until the test ends)
            await self.release.wait()
            return web.Response(text="late")
        if path == "/endless":  # a 200 whose body does not end before the client gives up
            response = web.StreamResponse(status=200)
            await response.prepare(request)
            chunk = b"x" * 65_536
            try:
                for _ in range(ENDLESS_BYTES // len(chunk)):  # bounded, so it ends by itself
                    await response.write(chunk)
                    self.streamed_bytes += len(chunk)
            except ConnectionError:
                pass
            finally:
                self.stream_cut.set()
            return response
        if path == "/stalled-body":  # headers, then nothing
            response = web.StreamResponse(status=200)
            response.content_length = 100
            await response.prepare(request)
            await response.write(b"partial")
            await self.release.wait()
            return response
        return web.Response(status=200, text="ok")


async def _serve(host: str) -> AsyncIterator[Receiver]:
    receiver = Receiver()
    async with RawTestServer(receiver.handle, host=host) as server:
        receiver.port = server.port or 0
        try:
            yield receiver
        finally:
            receiver.release.set()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async for r in _serve("127.0.0.1"):
        yield r


@pytest.fixture
async def receiver6() -> AsyncIterator[Receiver]:
    async for r in _serve("::1"):
        yield r


def client(
    policy: AddressPolicy = DEVELOPMENT,
    *,
    answers: dict[str, Sequence[Sequence[str]]] | None = None,
    timeout_seconds: float = 5.0,
) -> OutboundHttp:
    return OutboundHttp(
        policy=policy, timeout_seconds=timeout_seconds, resolver=StaticResolver(answers or {})
    )


# --------------------------------------------------------------------------------------------
# The address rules


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "shared"),
        ("100.127.255.254", "shared"),
        ("0.0.0.0", "unspecified"),  # noqa: S104
        ("0.1.2.3", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("2001:db8::1", "reserved"),
        ("::127.0.0.1", "reserved"),  # IPv4-compatible (deprecated)
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "metadata"),
        ("::ffff:100.64.0.1", "shared"),
        ("::ffff:0.0.0.0", "unspecified"),
        ("64:ff9b::a9fe:a9fe", "metadata"),  # NAT64 form of 169.254.169.254
        ("64:ff9b::a00:1", "private"),
        ("64:ff9b::7f00:1", "reserved"),  # not this host's loopback: a gateway's
        ("2002:a00:1::", "private"),  # 6to4 form of 10.0.0.1
        ("2002:a9fe:a9fe::1", "metadata"),
        ("8.8.8.8", None),
        ("1.1.1.1", None),
        ("100.128.0.1", None),  # just past the shared range
        ("172.32.0.1", None),  # just past 172.16/12
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
    ],
)
def test_classify(address: str, kind: str | None) -> None:
    assert classify(ipaddress.ip_address(address)) == kind


@pytest.mark.parametrize(
    ("policy", "address", "refused"),
    [
        (PRODUCTION, "127.0.0.1", "loopback"),
        (PRODUCTION, "::1", "loopback"),
        (DEVELOPMENT, "127.0.0.1", None),
        (DEVELOPMENT, "::1", None),
        (DEVELOPMENT, "::ffff:127.0.0.1", None),
        # 0.0.0.0 reaches this host on Linux, but is not loopback
        (DEVELOPMENT, "0.0.0.0", "unspecified"),  # noqa: S104
        (DEVELOPMENT, "10.0.0.1", "private"),
        (DEVELOPMENT, "169.254.169.254", "metadata"),
        (AddressPolicy(allow=(ipaddress.ip_network("10.0.0.0/8"),)), "10.1.2.3", None),
        (AddressPolicy(allow=(ipaddress.ip_network("10.0.0.0/8"),)), "::ffff:10.1.2.3", None),
        (AddressPolicy(allow=(ipaddress.ip_network("10.0.0.0/8"),)), "192.168.0.1", "private"),
        (AddressPolicy(allow=(ipaddress.ip_network("fd12::/16"),)), "fd12::5", None),
        (AddressPolicy(allow=(ipaddress.ip_network("fd12::/16"),)), "fd13::5", "private"),
        (AddressPolicy(allow=(ipaddress.ip_network("127.0.0.1/32"),)), "127.0.0.1", None),
        (AddressPolicy(allow=(ipaddress.ip_network("127.0.0.1/32"),)), "127.0.0.2", "loopback"),
        # A range does not open the metadata address; naming it exactly does.
        (
            AddressPolicy(allow=(ipaddress.ip_network("169.254.0.0/16"),)),
            "169.254.169.254",
            "metadata",
        ),
        (AddressPolicy(allow=(ipaddress.ip_network("169.254.0.0/16"),)), "169.254.1.1", None),
        (AddressPolicy(allow=(ipaddress.ip_network("0.0.0.0/0"),)), "169.254.169.254", "metadata"),
        (AddressPolicy(allow=(ipaddress.ip_network("169.254.169.254"),)), "169.254.169.254", None),
        (PRODUCTION, "93.184.215.14", None),
    ],
)
def test_policy(policy: AddressPolicy, address: str, refused: str | None) -> None:
    assert policy.refusal(ipaddress.ip_address(address)) == refused


def test_settings_read_the_allow_list_and_the_environment() -> None:
    production = from_settings(
        Settings(env="production", outbound_allow=" 10.0.0.0/8, fd12::/16,127.0.0.1 ")
    )
    assert production.policy == AddressPolicy(
        allow=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("fd12::/16"),
            ipaddress.ip_network("127.0.0.1/32"),
        ),
        allow_loopback=False,
    )
    assert from_settings(Settings(env="development")).policy == DEVELOPMENT
    assert from_settings(Settings(env="test")).policy == DEVELOPMENT
    assert Settings().outbound_timeout_seconds == 5.0


@pytest.mark.parametrize("value", ["10.0.0.0/33", "10.0.0.1/8", "intranet", "10.0.0.0/8;fd00::/8"])
def test_settings_refuse_a_bad_allow_list(value: str) -> None:
    with pytest.raises(pydantic.ValidationError, match="is not a CIDR range"):
        Settings(outbound_allow=value)


# --------------------------------------------------------------------------------------------
# Calls that go through


async def test_a_call_reaches_loopback_outside_production(
    receiver: Receiver, connect_guard: ConnectLog
) -> None:
    http = client(DEVELOPMENT)
    status = await http.get(
        receiver.url("/ack?token=abc"), {"subid": "s1", "desc": "DELIVRD", "msisdn": "346"}
    )
    assert status == 200
    [request] = receiver.requests
    assert request.method == "GET"
    # The URL's own query comes first, then the parameters, in order.
    assert request.query_string == "token=abc&subid=s1&desc=DELIVRD&msisdn=346"
    assert connect_guard.attempts == ["127.0.0.1"]  # the guard sees the connection


async def test_a_name_connects_to_the_address_it_was_checked_at(
    receiver: Receiver, connect_guard: ConnectLog
) -> None:
    """DNS rebinding: the name answers a loopback address, then a private one. The call goes to
    the first answer, checked, and nothing looks the name up again before connecting."""
    http = client(DEVELOPMENT, answers={"hooks.example": [["127.0.0.1"], ["10.0.0.1"]]})
    resolver = http._resolver
    assert isinstance(resolver, StaticResolver)

    assert await http.get(receiver.url("/ack", host="hooks.example"), {}) == 200
    assert resolver.lookups == ["hooks.example"]
    assert connect_guard.attempts == ["127.0.0.1"]
    assert receiver.requests[0].host == f"hooks.example:{receiver.port}"

    with pytest.raises(OutboundRefused, match=r"10\.0\.0\.1 is a private address"):
        await http.get(receiver.url("/ack", host="hooks.example"), {})
    assert resolver.lookups == ["hooks.example", "hooks.example"]
    assert connect_guard.attempts == ["127.0.0.1"]  # nothing new


async def test_ipv6_loopback_outside_production(
    receiver6: Receiver, connect_guard: ConnectLog
) -> None:
    assert await client(DEVELOPMENT).get(receiver6.url("/ack", host="[::1]"), {"a": "1"}) == 200
    assert receiver6.paths == ["/ack"]
    assert connect_guard.attempts == ["::1"]


async def test_ipv4_mapped_loopback_outside_production(
    receiver: Receiver, connect_guard: ConnectLog
) -> None:
    status = await client(DEVELOPMENT).get(receiver.url("/ack", host="[::ffff:127.0.0.1]"), {})
    assert status == 200
    assert receiver.paths == ["/ack"]
    assert [ipaddress.ip_address(a) for a in connect_guard.attempts] == [
        ipaddress.ip_address("::ffff:127.0.0.1")
    ]


async def test_the_allow_list_opens_loopback_in_production(receiver: Receiver) -> None:
    http = from_settings(Settings(env="production", outbound_allow="127.0.0.1/32"))
    assert await http.get(receiver.url("/ack"), {}) == 200
    assert receiver.paths == ["/ack"]
    # 127.0.0.2 is loopback too, but outside the allowed range.
    with pytest.raises(OutboundRefused, match="loopback"):
        await http.get(receiver.url("/ack", host="127.0.0.2"), {})


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_every_2xx_is_a_success(receiver: Receiver, status: int) -> None:
    assert await client().get(receiver.url(f"/status/{status}"), {}) == status


async def test_proxies_of_the_environment_are_ignored(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    async for proxy in _serve("127.0.0.1"):
        proxy_url = f"http://127.0.0.1:{proxy.port}"
        for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy_url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert await client().get(receiver.url("/ack"), {}) == 200
        assert proxy.requests == []
        assert receiver.paths == ["/ack"]


# --------------------------------------------------------------------------------------------
# Refusals: before anything is connected


@pytest.mark.parametrize("policy", [PRODUCTION, DEVELOPMENT], ids=["production", "development"])
@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://10.0.0.1/",
        "https://192.168.1.10:8443/hook",
        "http://172.20.0.5/",
        "http://[::ffff:10.0.0.1]/",
        "http://100.64.0.1/",
        "http://0.0.0.0:8080/",
        "http://[::]/",
        "http://[fe80::1]/",
        "http://[fc00::1]/",
        "http://224.0.0.1/",
        "http://[ff02::1]/",
        "http://255.255.255.255/",
    ],
)
async def test_non_public_addresses_are_refused_before_any_connect(
    policy: AddressPolicy, url: str, connect_guard: ConnectLog
) -> None:
    http = client(policy)
    with pytest.raises(OutboundRefused) as refused:
        http.validate(url)
    assert "not allowed" in refused.value.detail
    with pytest.raises(OutboundRefused):
        await http.get(url, {"subid": "s1"})
    assert connect_guard.attempts == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/", "http://127.8.9.10/", "http://[::1]:9/", "http://[::ffff:7f00:1]/"],
)
async def test_loopback_is_refused_in_production(url: str, connect_guard: ConnectLog) -> None:
    http = client(PRODUCTION)
    with pytest.raises(OutboundRefused, match="loopback"):
        http.validate(url)
    with pytest.raises(OutboundRefused, match="loopback"):
        await http.get(url, {})
    assert connect_guard.attempts == []


async def test_loopback_server_refused_in_production(
    receiver: Receiver, connect_guard: ConnectLog
) -> None:
    """The same live receiver that development reaches is out of bounds in production."""
    with pytest.raises(OutboundRefused, match="loopback"):
        await client(PRODUCTION).get(receiver.url("/ack"), {})
    assert receiver.requests == []
    assert connect_guard.attempts == []


@pytest.mark.parametrize("policy", [PRODUCTION, DEVELOPMENT], ids=["production", "development"])
@pytest.mark.parametrize(
    ("addresses", "kind"),
    [
        (["10.0.0.1"], "private"),
        (["::ffff:10.0.0.1"], "private"),
        (["169.254.169.254"], "metadata"),
        (["fd00:ec2::254"], "metadata"),
        (["fe80::1"], "link-local"),
        # One bad address refuses the name, whatever else it resolves to.
        (["127.0.0.1", "10.0.0.1"], "(loopback|private)"),
        (["93.184.215.14", "192.168.0.1"], "private"),
    ],
)
async def test_a_name_resolving_to_a_refused_address_is_refused(
    policy: AddressPolicy, addresses: list[str], kind: str, connect_guard: ConnectLog
) -> None:
    http = client(policy, answers={"intranet.example": [addresses]})
    url = "http://intranet.example/ack"
    http.validate(url)  # a name cannot be judged before the call resolves it
    with pytest.raises(OutboundRefused, match=f"is a {kind} address"):
        await http.get(url, {"subid": "s1"})
    assert connect_guard.attempts == []


async def test_a_name_resolving_to_loopback_is_refused_in_production(
    receiver: Receiver, connect_guard: ConnectLog
) -> None:
    http = client(PRODUCTION, answers={"localhost.example": [["127.0.0.1", "::1"]]})
    with pytest.raises(OutboundRefused, match="loopback"):
        await http.get(receiver.url("/ack", host="localhost.example"), {})
    assert receiver.requests == []
    assert connect_guard.attempts == []


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://example.com:70/",
        "javascript:alert(1)",
        "ws://example.com/socket",
        "example.com/ack",
        "//example.com/ack",
        "http:///ack",
        "http://",
        "",
        "http://[::1/",
        "http://2130706433/",  # 127.0.0.1 as one number
        "http://127.1/",
        "http://017700000001/",
        "http://010.0.0.1/",  # octal to some resolvers
        "http://0xA9FEA9FE/",  # 169.254.169.254 in hex, as inet_aton reads it
        "http://0x7f.0.0.1/",  # 127.0.0.1, hex first part
        "http://0177.1/",  # 127.0.0.1, octal and short
        "http://[1:2:3]/",
        "http://example.com/" + "a" * MAX_URL_LENGTH,
    ],
)
async def test_urls_that_cannot_be_called_are_refused(url: str, connect_guard: ConnectLog) -> None:
    http = client(DEVELOPMENT)
    resolver = http._resolver
    assert isinstance(resolver, StaticResolver)
    with pytest.raises(OutboundRefused):
        http.validate(url)
    with pytest.raises(OutboundRefused):
        await http.get(url, {})
    assert resolver.lookups == []
    assert connect_guard.attempts == []


def test_validate_accepts_callable_urls_without_a_lookup() -> None:
    http = client(PRODUCTION)
    for url in (
        "https://hooks.example.com/labsmobile/ack?token=abc",
        "http://hooks.example.com:8080/",
        "HTTPS://Hooks.Example.COM/x",
        "https://93.184.215.14/ack",
        "https://[2606:4700:4700::1111]/ack",
        "https://user:secret@hooks.example.com/ack",
    ):
        http.validate(url)
    assert isinstance(http._resolver, StaticResolver)
    assert http._resolver.lookups == []


# --------------------------------------------------------------------------------------------
# Answers and failures


async def test_redirects_are_not_followed(receiver: Receiver, connect_guard: ConnectLog) -> None:
    for status in (301, 302, 303, 307, 308):
        with pytest.raises(PermanentOutboundError, match="redirect") as error:
            await client().get(receiver.url(f"/status/{status}"), {})
        assert not isinstance(error.value, OutboundRefused)
        assert error.value.answer_status == status
    # Each redirect pointed at the metadata address; it was never asked for.
    assert receiver.paths == [f"/status/{s}" for s in (301, 302, 303, 307, 308)]
    assert set(connect_guard.attempts) == {"127.0.0.1"}


@pytest.mark.parametrize(
    ("status", "error_type", "retry_after"),
    [
        (400, PermanentOutboundError, None),
        (401, PermanentOutboundError, None),
        (404, PermanentOutboundError, None),
        (410, PermanentOutboundError, None),
        (408, TransientOutboundError, None),
        (429, TransientOutboundError, 7),
        (500, TransientOutboundError, None),
        (502, TransientOutboundError, None),
        (503, TransientOutboundError, 7),
        (504, TransientOutboundError, None),
    ],
)
async def test_error_answers_are_classified(
    receiver: Receiver,
    status: int,
    error_type: type[OutboundError],
    retry_after: int | None,
) -> None:
    with pytest.raises(error_type) as error:
        await client().get(receiver.url(f"/status/{status}?retry_after=7"), {})
    assert type(error.value) is error_type
    assert error.value.answer_status == status
    assert error.value.retry_after == retry_after


async def test_no_answer_in_time_is_transient(receiver: Receiver) -> None:
    with pytest.raises(TransientOutboundError, match=r"no answer within 0\.2 s") as error:
        await client(timeout_seconds=0.2).get(receiver.url("/hang"), {})
    assert error.value.answer_status is None
    assert receiver.paths == ["/hang"]


async def test_a_body_that_stalls_after_the_status_does_not_hide_the_answer(
    receiver: Receiver,
) -> None:
    """The status line is the answer; the body is read only within what is left of the
    timeout."""
    assert await client(timeout_seconds=0.3).get(receiver.url("/stalled-body"), {}) == 200


async def test_the_answer_body_is_read_up_to_a_cap(receiver: Receiver) -> None:
    """A 256 MiB answer: the call returns its status without downloading it and closes the
    connection, which stops the server's writing once the socket buffers are full (a few MiB
    on loopback), long before the end of the body."""
    assert await client(timeout_seconds=30.0).get(receiver.url("/endless"), {}) == 200
    await asyncio.wait_for(receiver.stream_cut.wait(), timeout=10.0)
    assert receiver.streamed_bytes < ENDLESS_BYTES // 4


async def test_connection_refused_is_transient() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(TransientOutboundError, match="connection failed") as error:
            await client().get(f"http://127.0.0.1:{port}/ack", {})
    assert error.value.answer_status is None


async def test_a_name_that_does_not_resolve_is_transient(connect_guard: ConnectLog) -> None:
    with pytest.raises(TransientOutboundError, match="does not resolve"):
        await client(PRODUCTION).get("https://unknown.example/ack", {})
    assert connect_guard.attempts == []


async def test_a_tls_failure_is_transient(receiver: Receiver) -> None:
    with pytest.raises(TransientOutboundError, match=r"TLS|connection"):
        await client().get(f"https://127.0.0.1:{receiver.port}/ack", {})


# --------------------------------------------------------------------------------------------
# Nothing secret in logs


SECRETS = ("tok3n-in-query", "s3cret-param", "pa55word", "path-s3cret")


def _secret_url(base: str) -> str:
    scheme, rest = base.split("://", 1)
    return f"{scheme}://user:pa55word@{rest}/path-s3cret?token=tok3n-in-query"


async def test_logs_and_errors_hold_no_query_path_or_credentials(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = f"http://127.0.0.1:{receiver.port}"
    params = {"subid": "s3cret-param"}
    calls: list[Callable[[], Awaitable[int]]] = [
        lambda: client(DEVELOPMENT).get(_secret_url(base), params),
        lambda: client(DEVELOPMENT).get(
            f"http://user:pa55word@127.0.0.1:{receiver.port}/status/404?token=tok3n-in-query",
            params,
        ),
        lambda: client(PRODUCTION).get(_secret_url(base), params),
        lambda: client(DEVELOPMENT).get(_secret_url("http://169.254.169.254"), params),
        lambda: client(DEVELOPMENT).get(_secret_url("http://unknown.example"), params),
        lambda: client(DEVELOPMENT, timeout_seconds=0.2).get(
            f"http://user:pa55word@127.0.0.1:{receiver.port}/hang?token=tok3n-in-query", params
        ),
        lambda: client(DEVELOPMENT).get(
            f"https://user:pa55word@127.0.0.1:{receiver.port}/path-s3cret?t=tok3n-in-query",
            params,
        ),
    ]
    errors: list[BaseException] = []
    for call in calls:
        try:
            await call()
        except OutboundError as exc:
            errors.append(exc)
    assert len(errors) == len(calls) - 1  # only the first call succeeds
    # The receiver did get the whole URL: the secrets were sent, only never written down.
    assert receiver.requests[0].query["token"] == "tok3n-in-query"
    assert receiver.requests[0].query["subid"] == "s3cret-param"

    # The receiver's own access log is the receiver's business; everything else is otpgate's
    # side (its own logger and the HTTP client library's).
    server_side = ("aiohttp.access", "aiohttp.server")
    ours = [r for r in caplog.records if not r.name.startswith(server_side)]
    shown = "".join(f"{r.getMessage()}\n{vars(r)}\n" for r in ours)
    shown += "".join(f"{e}\n{e!r}\n{''.join(traceback.format_exception(e))}" for e in errors)
    for secret in SECRETS:
        assert secret not in shown
    # What is logged names the origin, so an operator can still tell which receiver failed.
    assert f"http://127.0.0.1:{receiver.port}" in shown
    assert "169.254.169.254" in shown
    assert any(r.levelno == logging.WARNING for r in ours)  # the refusals
