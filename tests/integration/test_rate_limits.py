"""Rate limits (docs/security.md, "Rate limits"): per number, prefix, country, client IP,
service and account on every send of a code, per destination on checks; in-process or in a
shared Redis; what happens when Redis goes away."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from otpgate.adapters.ratelimit import LimitsRateLimiter
from otpgate.adapters.storage import tables as t
from otpgate.domain.ports import RateCounter
from otpgate.errors import Unavailable
from tests.conftest import Api, Database, code_in, make_settings, serving
from tests.support.server import OTPGATE, _wait_until_healthy, free_port, running_server

#: Twenty numbers of one prefix (+34600123: the number without its last 3 digits).
PREFIX_NUMBERS = [f"+34600123{n:03d}" for n in range(20)]


async def stored(api: Api) -> tuple[int, int]:
    async with api.database.sql() as conn:
        verifications = (
            await conn.execute(select(func.count()).select_from(t.verifications))
        ).scalar_one()
        messages = (await conn.execute(select(func.count()).select_from(t.messages))).scalar_one()
    return verifications, messages


def assert_rate_limited(response: httpx.Response, limit: str, *, window: int) -> int:
    """A ``429 rate_limited`` naming ``limit``, with ``retry_after`` in the body and the
    header, at most the window; returns it."""
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == "rate_limited"
    assert limit in body["detail"]
    retry_after = body["retry_after"]
    assert response.headers["Retry-After"] == str(retry_after)
    assert 1 <= retry_after <= window
    return int(retry_after)


async def set_limits(api: Api, rate_limits: Any, service_id: str | None = None) -> Any:
    response = await api.http.patch(
        f"/v1/services/{service_id or api.service_id}",
        json={"rate_limits": rate_limits},
        headers=api.auth(),
    )
    assert response.status_code == 200, response.text
    return response.json()["rate_limits"]


# --- in-process limits ----------------------------------------------------------------------


async def test_twenty_numbers_of_one_prefix_trip_the_prefix_limit(api: Api) -> None:
    answers = [await api.start(to) for to in PREFIX_NUMBERS]
    assert [a.status_code for a in answers[:10]] == [201] * 10
    for refused in answers[10:]:
        retry_after = assert_rate_limited(refused, "per_prefix", window=600)
        assert retry_after > 590  # the oldest start in the window is seconds old
    # The refused ones stored nothing and sent nothing.
    assert await stored(api) == (10, 10)
    await api.deliver()
    assert sorted(m.to for m in api.sender.sent) == PREFIX_NUMBERS[:10]
    # Another prefix of the same country is not affected.
    assert (await api.start("+34600124000")).status_code == 201


async def test_a_safe_listed_destination_is_not_held_by_the_prefix_limit(api: Api) -> None:
    answers = [await api.start(to) for to in PREFIX_NUMBERS[:11]]
    assert [a.status_code for a in answers] == [201] * 10 + [429]
    listed = await api.http.post(
        "/v1/safe-list", json={"number": PREFIX_NUMBERS[11]}, headers=api.auth()
    )
    assert listed.status_code == 201, listed.text
    assert (await api.start(PREFIX_NUMBERS[11])).status_code == 201
    assert_rate_limited(await api.start(PREFIX_NUMBERS[12]), "per_prefix", window=600)


async def test_per_number_limit_counts_new_verifications_and_resends(api: Api) -> None:
    to = "+34600000001"
    for _ in range(10):
        started = await api.start(to)
        assert started.status_code == 201, started.text
        cancel = await api.http.post(
            f"/v1/verifications/{started.json()['id']}/cancel", headers=api.auth()
        )
        assert cancel.status_code == 200
    assert_rate_limited(await api.start(to), "per_number", window=3_600)
    assert await stored(api) == (10, 10)
    # Resends are sends: with room for 3 sends per number, start + 2 resends, then refused.
    service = await api.new_service(
        resend_interval_seconds=0,
        max_send_attempts=10,
        rate_limits={"per_number": {"limit": 3, "window_seconds": 3_600}},
    )
    body = {"service_id": service, "to": to}
    started = await api.http.post("/v1/verifications", json=body, headers=api.auth())
    assert started.status_code == 201
    resend = f"/v1/verifications/{started.json()['id']}/resend"
    assert (await api.http.post(resend, headers=api.auth())).status_code == 200
    # A start to a destination with a pending verification is a resend: counted too.
    again = await api.http.post("/v1/verifications", json=body, headers=api.auth())
    assert again.status_code == 200
    assert_rate_limited(await api.http.post(resend, headers=api.auth()), "per_number", window=3_600)
    assert_rate_limited(
        await api.http.post("/v1/verifications", json=body, headers=api.auth()),
        "per_number",
        window=3_600,
    )
    got = await api.http.get(f"/v1/verifications/{started.json()['id']}", headers=api.auth())
    assert got.json()["send_attempts"] == 3


async def test_per_ip_limit_counts_the_client_ip_and_an_ipv6_slash_64(api: Api) -> None:
    await set_limits(api, {"per_ip": {"limit": 3, "window_seconds": 60}})
    numbers = iter(f"+346001{n:02d}000" for n in range(10, 99))  # one per prefix
    for _ in range(3):
        assert (await api.start(next(numbers), client_ip="203.0.113.7")).status_code == 201
    assert_rate_limited(
        await api.start(next(numbers), client_ip="203.0.113.7"), "per_ip", window=60
    )
    # Another address has its own count; a start without client_ip counts no address.
    assert (await api.start(next(numbers), client_ip="203.0.113.8")).status_code == 201
    assert (await api.start(next(numbers))).status_code == 201
    # IPv6: one /64 is one subscriber's network, however the addresses in it are written.
    for address in ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", "2001:0db8:0001:0002::3"):
        assert (await api.start(next(numbers), client_ip=address)).status_code == 201
    assert_rate_limited(
        await api.start(next(numbers), client_ip="2001:db8:1:2::42"), "per_ip", window=60
    )
    assert (await api.start(next(numbers), client_ip="2001:db8:1:3::1")).status_code == 201
    assert await stored(api) == (9, 9)


@pytest.mark.parametrize(
    "client_ip", ["300.1.2.3", "example.com", "", "203.0.113.7/24", "::g", 12345, ["1.2.3.4"]]
)
async def test_a_bad_client_ip_is_refused_and_stores_nothing(api: Api, client_ip: Any) -> None:
    response = await api.start(client_ip=client_ip)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "invalid_request"
    assert response.json()["param"] == "client_ip"
    assert await stored(api) == (0, 0)


async def test_a_service_override_changes_the_limit_and_get_shows_the_effective_limits(
    api: Api,
) -> None:
    defaults = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    assert defaults["rate_limits"] == {
        "per_number": {"limit": 10, "window_seconds": 3600},
        "per_prefix": {"limit": 10, "window_seconds": 600},
        "per_country": {"limit": 3000, "window_seconds": 600},
        "per_ip": {"limit": 100, "window_seconds": 3600},
        "per_service": {"limit": 30000, "window_seconds": 600},
        "fail_open": False,
    }
    shown = await set_limits(api, {"per_prefix": {"limit": 2, "window_seconds": 60}})
    assert shown == {**defaults["rate_limits"], "per_prefix": {"limit": 2, "window_seconds": 60}}
    listed = (await api.http.get("/v1/services", headers=api.auth())).json()["data"]
    assert [s["rate_limits"] for s in listed if s["id"] == api.service_id] == [shown]
    assert (await api.start(PREFIX_NUMBERS[0])).status_code == 201
    assert (await api.start(PREFIX_NUMBERS[1])).status_code == 201
    assert_rate_limited(await api.start(PREFIX_NUMBERS[2]), "per_prefix", window=60)
    # per_country and per_service, overridden, refuse the same way.
    await set_limits(
        api,
        {
            "per_country": {"limit": 3, "window_seconds": 60},
            "per_service": {"limit": 100, "window_seconds": 60},
        },
    )
    assert (await api.start("+34600200000")).status_code == 201
    assert (await api.start("+34600300000")).status_code == 201
    assert (await api.start("+34600400000")).status_code == 201
    assert_rate_limited(await api.start("+34600500000"), "per_country", window=60)
    assert (await api.start("+447911123456")).status_code == 201  # another country
    await set_limits(api, {"per_service": {"limit": 1, "window_seconds": 60}})
    assert (await api.start("+447911124000")).status_code == 201
    assert_rate_limited(await api.start("+447911125000"), "per_service", window=60)
    # null: every default again.
    assert await set_limits(api, None) == defaults["rate_limits"]


async def test_a_refused_start_consumes_no_other_limit(api: Api) -> None:
    await set_limits(
        api,
        {
            "per_number": {"limit": 1, "window_seconds": 3_600},
            "per_prefix": {"limit": 2, "window_seconds": 600},
        },
    )
    first, second, third = PREFIX_NUMBERS[:3]
    assert (await api.start(first)).status_code == 201
    assert (await api.start(second)).status_code == 201
    for _ in range(3):
        assert_rate_limited(await api.start(third), "per_prefix", window=600)
    # Room in the prefix again (a new limit is a new count): the third number's one start
    # was never used by its refusals.
    await set_limits(
        api,
        {
            "per_number": {"limit": 1, "window_seconds": 3_600},
            "per_prefix": {"limit": 3, "window_seconds": 600},
        },
    )
    assert (await api.start(third)).status_code == 201


BAD_RATE_LIMITS: list[Any] = [
    [],
    "10/hour",
    {"per_number": 5},
    {"per_number": None},
    {"per_number": {"limit": 5}},
    {"per_number": {"limit": 5, "window_seconds": 60, "burst": 2}},
    {"per_number": {"limit": 0, "window_seconds": 60}},
    {"per_number": {"limit": 100_001, "window_seconds": 60}},
    {"per_number": {"limit": 5, "window_seconds": 0}},
    {"per_number": {"limit": 5, "window_seconds": 86_401}},
    {"per_number": {"limit": True, "window_seconds": 60}},
    {"per_number": {"limit": 5.5, "window_seconds": 60}},
    {"per_number": {"limit": "5", "window_seconds": 60}},
    {"per_account": {"limit": 5, "window_seconds": 60}},
    {"per_bogus": {"limit": 5, "window_seconds": 60}},
    {"fail_open": "yes"},
    {"fail_open": None},
]


@pytest.mark.parametrize("bad", BAD_RATE_LIMITS)
async def test_bad_rate_limits_are_refused_and_change_nothing(api: Api, bad: Any) -> None:
    url = f"/v1/services/{api.service_id}"
    await set_limits(api, {"per_number": {"limit": 7, "window_seconds": 70}, "fail_open": True})
    before = (await api.http.get(url, headers=api.auth())).json()
    patched = await api.http.patch(
        url, json={"rate_limits": bad, "ttl_seconds": 900}, headers=api.auth()
    )
    assert patched.status_code == 400, patched.text
    assert patched.json()["code"] == "invalid_request"
    assert patched.json()["param"] == "rate_limits"
    assert (await api.http.get(url, headers=api.auth())).json() == before
    created = await api.http.post(
        "/v1/services", json={"name": "Bad", "rate_limits": bad}, headers=api.auth()
    )
    assert created.status_code == 400, created.text
    assert created.json()["param"] == "rate_limits"
    services = (await api.http.get("/v1/services", headers=api.auth())).json()["data"]
    assert [s["name"] for s in services] == ["Acme"]


@pytest.fixture
async def strict_checks(database: Database, tmp_path: Path) -> Any:
    settings = make_settings(
        database, tmp_path, rate_limit_checks=3, rate_limit_checks_window_seconds=120
    )
    async with serving(settings, database) as running:
        yield running


async def test_checks_are_limited_per_destination_across_verifications(
    strict_checks: Api,
) -> None:
    api = strict_checks
    to = "+34600000001"
    first = (await api.start(to)).json()["id"]
    assert (await api.check(first, "000000")).json()["valid"] is False
    assert (await api.check(first, "000001")).json()["valid"] is False
    await api.http.post(f"/v1/verifications/{first}/cancel", headers=api.auth())
    api.clock.advance(1)  # the second is the destination's latest
    second = (await api.start(to)).json()["id"]
    assert (await api.check(second, "000002")).json()["valid"] is False
    await api.deliver()
    code = api.sender.codes_to(to)[-1]
    # The fourth check for this destination is refused, right code or not, and counts no
    # attempt on the verification.
    assert_rate_limited(await api.check(second, code), "per_destination_checks", window=120)
    by_destination = await api.http.post(
        "/v1/verifications/check",
        json={"service_id": api.service_id, "to": to, "code": code},
        headers=api.auth(),
    )
    assert_rate_limited(by_destination, "per_destination_checks", window=120)
    got = (await api.http.get(f"/v1/verifications/{second}", headers=api.auth())).json()
    assert got["status"] == "pending" and got["check_attempts"] == 1
    # Another destination has its own count.
    other = (await api.start("+34600000002")).json()["id"]
    await api.deliver()
    right = api.sender.codes_to("+34600000002")[-1]
    assert (await api.check(other, right)).json()["valid"] is True


async def test_labsmobile_send_code_answers_zero_with_the_reason(api: Api) -> None:
    """LabsMobile's sendCode goes through the same start: a limit answers ``0`` with
    ``X-Otpgate-Error: rate_limited`` and ``Retry-After``."""
    account = (await api.http.get("/v1/account", headers=api.auth())).json()
    auth = httpx.BasicAuth(account["username"], api.key)
    answers = []
    for to in PREFIX_NUMBERS[:11]:
        answers.append(
            await api.http.get(
                "/otp/sendCode", params={"phone_number": to.lstrip("+"), "env": "x"}, auth=auth
            )
        )
    assert [a.text for a in answers] == ["1"] * 10 + ["0"]
    assert answers[-1].headers["X-Otpgate-Error"] == "rate_limited"
    assert 590 < int(answers[-1].headers["Retry-After"]) <= 600


# --- Redis ----------------------------------------------------------------------------------

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own in the shared Redis, its keys deleted at the end."""
    prefix = "otpgate-test-" + secrets.token_hex(6)
    yield prefix
    client = redis.Redis.from_url(SHARED_REDIS)
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)
    client.close()


@contextlib.contextmanager
def own_redis(directory: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own on a free loopback port (never the shared one)."""
    port = free_port()
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=10)


def test_two_api_processes_share_the_limits_through_redis(
    tmp_path: Path, redis_prefix: str
) -> None:
    redis_env = {"OTPGATE_REDIS_URL": SHARED_REDIS, "OTPGATE_REDIS_KEY_PREFIX": redis_prefix}
    with running_server(None, tmp_path, extra_env=redis_env) as first:
        # A second process on the same database and the same Redis.
        port = free_port()
        second_url = f"http://127.0.0.1:{port}"
        out = (tmp_path / "second.log").open("wb")
        second = subprocess.Popen(
            [OTPGATE, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**first.env, "OTPGATE_PUBLIC_URL": second_url},
            stdout=out,
            stderr=out,
        )
        try:
            _wait_until_healthy(second_url, second, tmp_path / "second.log")
            limit = 4
            patched = httpx.patch(
                f"{first.url}/v1/services/{first.service_id}",
                json={"rate_limits": {"per_prefix": {"limit": limit, "window_seconds": 600}}},
                headers=first.auth(),
            )
            assert patched.status_code == 200, patched.text
            answers = []
            for n, to in enumerate(PREFIX_NUMBERS[: limit + 2]):
                url = first.url if n % 2 == 0 else second_url
                answers.append(
                    httpx.post(
                        f"{url}/v1/verifications",
                        json={"service_id": first.service_id, "to": to},
                        headers=first.auth(),
                    )
                )
            assert [a.status_code for a in answers] == [201] * limit + [429, 429], [
                a.text for a in answers
            ]
            assert "per_prefix" in answers[limit].json()["detail"]
            assert int(answers[limit].headers["Retry-After"]) > 590
        finally:
            second.terminate()
            second.wait(timeout=15)
            out.close()
    # The counters are in Redis, under this run's prefix only.
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = list(client.scan_iter(match=f"{redis_prefix}:*"))
    client.close()
    assert keys
    # ... and they name no number or prefix: those parts are keyed hashes.
    for number in PREFIX_NUMBERS:
        assert not any(number[1:9].encode() in key for key in keys), keys


async def test_redis_down_checks_fail_closed_and_starts_follow_the_service(
    database: Database, tmp_path: Path
) -> None:
    with own_redis(tmp_path) as (url, redis_process):
        settings = make_settings(
            database, tmp_path, redis_url=url, redis_key_prefix="otpgate-" + secrets.token_hex(4)
        )
        async with serving(settings, database) as api:
            started = await api.start("+34600000001")
            assert started.status_code == 201
            await api.deliver()
            code = code_in(api.sender.sent[-1].text)
            assert (await api.check(started.json()["id"], "000000")).json()["valid"] is False

            redis_process.terminate()
            redis_process.wait(timeout=10)

            # Checks: 503, the right code as a wrong one, however many times; no attempt counted.
            for attempt in ("000000", code, "111111", code):
                refused = await api.check(started.json()["id"], attempt)
                assert refused.status_code == 503, refused.text
                assert refused.json()["code"] == "unavailable"
                assert "127.0.0.1" not in refused.text and url not in refused.text
            by_destination = await api.http.post(
                "/v1/verifications/check",
                json={"service_id": api.service_id, "to": "+34600000001", "code": code},
                headers=api.auth(),
            )
            assert by_destination.status_code == 503
            got = await api.http.get(
                f"/v1/verifications/{started.json()['id']}", headers=api.auth()
            )
            assert got.json()["status"] == "pending" and got.json()["check_attempts"] == 1

            # Starts: 503 by default, nothing stored or sent.
            before = await stored(api)
            refused = await api.start("+34600000002")
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "unavailable"
            assert await stored(api) == before
            # ...and they pass when the service fails open.
            await set_limits(api, {"fail_open": True})
            passed = await api.start("+34600000002")
            assert passed.status_code == 201, passed.text
            assert await stored(api) == (before[0] + 1, before[1] + 1)
            # Checks still fail closed.
            assert (await api.check(passed.json()["id"], "000000")).status_code == 503


async def test_the_openapi_document_shows_client_ip_and_rate_limits(api: Api) -> None:
    schemas = (await api.http.get("/openapi.json")).json()["components"]["schemas"]
    assert "client_ip" in schemas["StartVerification"]["properties"]
    accepted = schemas["ServiceFields"]["properties"]["rate_limits"]["anyOf"][0]
    assert set(accepted["properties"]) == {
        "per_number",
        "per_prefix",
        "per_country",
        "per_ip",
        "per_service",
        "fail_open",
    }
    assert accepted["additionalProperties"] is False
    assert "rate_limits" in schemas["ServiceOut"]["required"]


async def test_a_redis_that_cannot_answer_is_unavailable_and_its_password_never_shows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limiter = LimitsRateLimiter.redis(
        f"redis://:hunter2secret@127.0.0.1:{free_port()}/0", key_prefix="x", timeout_seconds=0.5
    )
    try:
        with pytest.raises(Unavailable) as refused:
            await limiter.acquire([RateCounter("per_number", "svc/number/+34600000001", 1, 60)])
    finally:
        await limiter.aclose()
    assert refused.value.retry_after == 1
    shown = "".join(traceback.format_exception(refused.value)) + caplog.text
    assert "hunter2secret" not in shown
