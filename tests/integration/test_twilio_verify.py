"""The real ``twilio`` Python SDK, unchanged but for its Verify base URL, against a real
``otpgate serve`` on SQLite and on PostgreSQL, sending through the LabsMobile provider to a
loopback stub (where the tests read the codes)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from twilio.base.exceptions import TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from otpgate.adapters.storage.engine import create_engine
from otpgate.adapters.storage.tables import metadata
from tests.conftest import POSTGRES_URL, code_in, run_in_thread
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import Server, running_server, wait_until

SECRET = "twilio-verify-test-secret-" + "x" * 32
_numbers = itertools.count(1)


def fresh_number() -> str:
    """A Spanish mobile number with a prefix (all but the last 3 digits) no other test uses,
    so that the per-number and per-prefix start limits never meet."""
    return f"+3461{next(_numbers):04d}001"


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as running:
        yield running


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest,
    stub: LabsMobileStub,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    env: dict[str, str] = {"OTPGATE_SECRET_KEY": SECRET}
    if request.param == "postgresql":
        schema = request.getfixturevalue("postgres_schema")

        async def empty() -> None:
            engine = create_engine(POSTGRES_URL, schema=schema, pool_size=1)
            async with engine.begin() as conn:
                names = ", ".join(f'"{t.name}"' for t in reversed(metadata.sorted_tables))
                await conn.execute(text(f"TRUNCATE {names} CASCADE"))
            await engine.dispose()

        run_in_thread(empty())
        env |= {"OTPGATE_DATABASE_URL": POSTGRES_URL, "OTPGATE_DATABASE_SCHEMA": schema}
    with running_server(stub, tmp_path_factory.mktemp(request.param), extra_env=env) as running:
        yield running


def account_sid(server: Server) -> str:
    account = httpx.get(f"{server.url}/v1/account", headers=server.auth()).json()
    return "AC" + str(account["id"]).removeprefix("acc_")


def twilio_client(server: Server, token: str | None = None, sid: str | None = None) -> Client:
    client = Client(sid or account_sid(server), token or server.key)
    client.verify.base_url = server.url  # the one change an application makes
    return client


@pytest.fixture
def client(server: Server) -> Client:
    return twilio_client(server)


def texts_to(stub: LabsMobileStub, number: str) -> list[str]:
    msisdn = number.removeprefix("+")
    return [str(r.body["message"]) for r in stub.messages if msisdn in r.msisdns]


def wait_for_texts(stub: LabsMobileStub, number: str, n: int) -> list[str]:
    wait_until(lambda: len(texts_to(stub, number)) >= n, timeout=10, what=f"{n} SMS to {number}")
    return texts_to(stub, number)


def refused(call: Any) -> TwilioRestException:
    with pytest.raises(TwilioRestException) as caught:
        call()
    return caught.value


def wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


# --- services -----------------------------------------------------------------------------------


def test_service_create_fetch_update_list_and_delete(server: Server, client: Client) -> None:
    created = client.verify.v2.services.create(
        friendly_name="Shop", code_length=8, custom_code_enabled=True, psd2_enabled=True
    )
    assert created.sid.startswith("VA") and len(created.sid) == 34
    assert created.account_sid == account_sid(server)
    assert (created.friendly_name, created.code_length) == ("Shop", 8)
    assert created.custom_code_enabled is True
    assert isinstance(created.date_created, datetime)
    assert created.url == f"{server.url}/v2/Services/{created.sid}"

    # The native API sees the same object, with Twilio's behaviour.
    native = httpx.get(
        f"{server.url}/v1/services/svc_{created.sid[2:]}", headers=server.auth()
    ).json()
    assert native["name"] == "Shop"
    assert (native["ttl_seconds"], native["max_check_attempts"]) == (600, 5)
    assert (native["max_send_attempts"], native["resend_interval_seconds"]) == (5, 0)

    fetched = client.verify.v2.services(created.sid).fetch()
    assert (fetched.sid, fetched.friendly_name) == (created.sid, "Shop")

    updated = client.verify.v2.services(created.sid).update(friendly_name="Shop 2", code_length=6)
    assert (updated.friendly_name, updated.code_length) == ("Shop 2", 6)
    assert client.verify.v2.services(created.sid).fetch().friendly_name == "Shop 2"

    for n in range(3):
        client.verify.v2.services.create(friendly_name=f"Extra {n}")
    listed = client.verify.v2.services.list(page_size=2)
    sids = [s.sid for s in listed]
    assert created.sid in sids and len(sids) == len(set(sids))
    assert len(sids) >= 4

    page = client.verify.v2.services.page(page_size=2)
    first = list(page)
    assert len(first) == 2
    assert page.next_page_url is not None
    assert page.next_page_url.startswith(f"{server.url}/v2/Services?")
    second = page.next_page()
    assert second is not None
    assert {s.sid for s in second}.isdisjoint({s.sid for s in first})

    assert client.verify.v2.services(created.sid).delete() is True
    gone = refused(lambda: client.verify.v2.services(created.sid).fetch())
    assert (gone.status, gone.code) == (404, 20404)


# --- verifications ------------------------------------------------------------------------------


def test_start_check_wrong_then_right_then_again(client: Client, stub: LabsMobileStub) -> None:
    service = client.verify.v2.services.create(friendly_name="Login")
    number = fresh_number()
    started = client.verify.v2.services(service.sid).verifications.create(to=number, channel="sms")
    assert started.status == "pending" and started.valid is False
    assert started.sid.startswith("VE") and len(started.sid) == 34
    assert started.service_sid == service.sid and started.to == number
    assert started.channel == "sms"
    assert len(started.send_code_attempts) == 1
    assert started.send_code_attempts[0]["attempt_sid"].startswith("VL")
    assert isinstance(started.date_created, datetime)
    assert started.url.endswith(f"/v2/Services/{service.sid}/Verifications/{started.sid}")

    (sms,) = wait_for_texts(stub, number, 1)
    code = code_in(sms)
    assert len(code) == 6

    fetched = client.verify.v2.services(service.sid).verifications(started.sid).fetch()
    assert (fetched.sid, fetched.status) == (started.sid, "pending")

    checks = client.verify.v2.services(service.sid).verification_checks
    bad = checks.create(to=number, code=wrong(code))
    assert (bad.status, bad.valid, bad.sid) == ("pending", False, started.sid)
    good = checks.create(verification_sid=started.sid, code=code)
    assert (good.status, good.valid) == ("approved", True)

    again = refused(lambda: checks.create(to=number, code=code))
    assert (again.status, again.code) == (404, 20404)
    after = refused(
        lambda: client.verify.v2.services(service.sid).verifications(started.sid).fetch()
    )
    assert (after.status, after.code) == (404, 20404)


def test_sixth_wrong_check_is_max_check_attempts(client: Client, stub: LabsMobileStub) -> None:
    service = client.verify.v2.services.create(friendly_name="Checks")
    number = fresh_number()
    started = client.verify.v2.services(service.sid).verifications.create(to=number, channel="sms")
    code = code_in(wait_for_texts(stub, number, 1)[0])
    checks = client.verify.v2.services(service.sid).verification_checks
    statuses = [checks.create(to=number, code=wrong(code)).status for _ in range(5)]
    assert statuses == ["pending"] * 4 + ["max_attempts_reached"]
    sixth = refused(lambda: checks.create(verification_sid=started.sid, code=code))
    assert (sixth.status, sixth.code) == (429, 60202)


def test_sixth_send_is_max_send_attempts_and_all_carry_one_code(
    client: Client, stub: LabsMobileStub
) -> None:
    service = client.verify.v2.services.create(friendly_name="Sends")
    number = fresh_number()
    verifications = client.verify.v2.services(service.sid).verifications
    sids = {verifications.create(to=number, channel="sms").sid for _ in range(5)}
    assert len(sids) == 1  # one verification, sent five times
    texts = wait_for_texts(stub, number, 5)
    assert len({code_in(t) for t in texts}) == 1
    sixth = refused(lambda: verifications.create(to=number, channel="sms"))
    assert (sixth.status, sixth.code) == (429, 60203)
    fetched = verifications(sids.pop()).fetch()
    assert len(fetched.send_code_attempts) == 5


def test_custom_code(client: Client, stub: LabsMobileStub) -> None:
    plain = client.verify.v2.services.create(friendly_name="Plain")
    number = fresh_number()
    refusal = refused(
        lambda: client.verify.v2.services(plain.sid).verifications.create(
            to=number, channel="sms", custom_code="123456"
        )
    )
    assert (refusal.status, refusal.code) == (403, 60204)
    assert texts_to(stub, number) == []

    custom = client.verify.v2.services.create(friendly_name="Custom", custom_code_enabled=True)
    started = client.verify.v2.services(custom.sid).verifications.create(
        to=number, channel="sms", custom_code="482913"
    )
    assert code_in(wait_for_texts(stub, number, 1)[0]) == "482913"
    check = client.verify.v2.services(custom.sid).verification_checks.create(
        verification_sid=started.sid, code="482913"
    )
    assert check.status == "approved"


def test_psd2_amount_and_payee(client: Client, stub: LabsMobileStub) -> None:
    service = client.verify.v2.services.create(friendly_name="Bank", psd2_enabled=True)
    number = fresh_number()
    started = client.verify.v2.services(service.sid).verifications.create(
        to=number, channel="sms", amount="€39.99", payee="Acme Inc."
    )
    assert (started.amount, started.payee) == ("€39.99", "Acme Inc.")
    (sms,) = wait_for_texts(stub, number, 1)
    assert "39.99" in sms and "Acme Inc." in sms
    code = code_in(sms)
    checks = client.verify.v2.services(service.sid).verification_checks
    other = checks.create(to=number, code=code, amount="€39.99", payee="Mallory")
    assert (other.status, other.valid) == ("pending", False)
    good = checks.create(to=number, code=code, amount="€39.99", payee="Acme Inc.")
    assert (good.status, good.valid) == ("approved", True)
    assert (good.amount, good.payee) == ("€39.99", "Acme Inc.")


def test_update_cancel_and_approve(client: Client) -> None:
    service = client.verify.v2.services.create(friendly_name="Updates")
    verifications = client.verify.v2.services(service.sid).verifications
    first = verifications.create(to=fresh_number(), channel="sms")
    canceled = verifications(first.sid).update(status="canceled")
    assert canceled.status == "canceled"
    second = verifications.create(to=fresh_number(), channel="sms")
    approved = verifications(second.sid).update(status="approved")
    assert (approved.status, approved.valid) == ("approved", True)
    gone = refused(lambda: verifications(second.sid).update(status="canceled"))
    assert (gone.status, gone.code) == (404, 20404)


# --- refusals -----------------------------------------------------------------------------------


def test_refusals(server: Server, client: Client, stub: LabsMobileStub) -> None:
    service = client.verify.v2.services.create(friendly_name="Refusals")
    verifications = client.verify.v2.services(service.sid).verifications
    before = len(stub.messages)

    invalid = refused(lambda: verifications.create(to="+3412", channel="sms"))
    assert (invalid.status, invalid.code) == (400, 60200)
    assert "To" in invalid.msg
    bad_channel = refused(lambda: verifications.create(to=fresh_number(), channel="pigeon"))
    assert (bad_channel.status, bad_channel.code) == (400, 60200)
    assert "Channel" in bad_channel.msg
    landline = refused(lambda: verifications.create(to="+34912345678", channel="sms"))
    assert (landline.status, landline.code) == (403, 60205)

    wrong_token = twilio_client(server, token="otpgate_" + "A" * 43)
    unauthorized = refused(lambda: wrong_token.verify.v2.services(service.sid).fetch())
    assert (unauthorized.status, unauthorized.code) == (401, 20003)
    wrong_sid = twilio_client(server, sid="AC" + "0" * 32)
    unauthorized = refused(lambda: wrong_sid.verify.v2.services(service.sid).fetch())
    assert (unauthorized.status, unauthorized.code) == (401, 20003)

    # Another account, with a key of its own, sees nothing of this one.
    admin = server.auth()
    other = httpx.post(f"{server.url}/v1/accounts", json={"name": "Other"}, headers=admin)
    assert other.status_code == 201, other.text
    key = httpx.post(
        f"{server.url}/v1/keys",
        json={"name": "other", "account_id": other.json()["id"]},
        headers=admin,
    )
    assert key.status_code == 201, key.text
    outsider = twilio_client(
        server, token=key.json()["key"], sid="AC" + other.json()["id"].removeprefix("acc_")
    )
    hidden = refused(lambda: outsider.verify.v2.services(service.sid).fetch())
    assert (hidden.status, hidden.code) == (404, 20404)
    hidden = refused(
        lambda: outsider.verify.v2.services(service.sid).verifications.create(
            to=fresh_number(), channel="sms"
        )
    )
    assert (hidden.status, hidden.code) == (404, 20404)
    assert len(stub.messages) == before  # no refusal sent anything


def test_an_api_key_sid_and_its_secret_authenticate(server: Server, stub: LabsMobileStub) -> None:
    """Twilio's recommended credentials: ``Client(api_key_sid, api_key_secret, account_sid)``.
    ``SK…`` carries the 32 hex digits of the otpgate key's id; the secret is that key."""
    made = httpx.post(f"{server.url}/v1/keys", json={"name": "twilio sdk"}, headers=server.auth())
    assert made.status_code == 201, made.text
    key_sid = "SK" + made.json()["id"].removeprefix("key_")
    client = Client(key_sid, made.json()["key"], account_sid(server))
    client.verify.base_url = server.url

    service = client.verify.v2.services.create(friendly_name="Keyed")
    number = fresh_number()
    started = client.verify.v2.services(service.sid).verifications.create(to=number, channel="sms")
    assert started.status == "pending"
    (text,) = wait_for_texts(stub, number, 1)
    checked = client.verify.v2.services(service.sid).verification_checks.create(
        to=number, code=code_in(text)
    )
    assert checked.status == "approved"

    # The SID must name the very key whose secret comes with it, and a revoked key is dead.
    other = httpx.post(f"{server.url}/v1/keys", json={"name": "other"}, headers=server.auth())
    mismatched = Client("SK" + other.json()["id"].removeprefix("key_"), made.json()["key"])
    mismatched.verify.base_url = server.url
    refusal = refused(lambda: mismatched.verify.v2.services(service.sid).fetch())
    assert (refusal.status, refusal.code) == (401, 20003)
    malformed = Client("SK" + "z" * 32, made.json()["key"])
    malformed.verify.base_url = server.url
    refusal = refused(lambda: malformed.verify.v2.services(service.sid).fetch())
    assert (refusal.status, refusal.code) == (401, 20003)
    revoked = httpx.delete(f"{server.url}/v1/keys/{made.json()['id']}", headers=server.auth())
    assert revoked.status_code == 204, revoked.text
    refusal = refused(lambda: client.verify.v2.services(service.sid).fetch())
    assert (refusal.status, refusal.code) == (401, 20003)


def test_error_body_is_twilios(server: Server) -> None:
    answer = httpx.get(f"{server.url}/v2/Services/VA" + "0" * 32, auth=("AC" + "0" * 32, "x"))
    assert answer.status_code == 401
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json() == {
        "code": 20003,
        "message": "Authenticate",
        "more_info": "https://www.twilio.com/docs/errors/20003",
        "status": 401,
    }


def test_native_api_honours_custom_code_enabled(server: Server, client: Client) -> None:
    """A service made through /v2 has custom codes off for the native API too."""
    service = client.verify.v2.services.create(friendly_name="No custom")
    number = fresh_number()
    answer = httpx.post(
        f"{server.url}/v1/verifications",
        json={"service_id": "svc_" + service.sid[2:], "to": number, "custom_code": "123456"},
        headers=server.auth(),
    )
    assert answer.status_code == 403, answer.text
    assert (answer.json()["code"], answer.json()["param"]) == ("forbidden", "custom_code")
    listed = httpx.get(
        f"{server.url}/v1/verifications", params={"to": number}, headers=server.auth()
    ).json()
    assert listed["data"] == []


def test_bad_page_token_is_invalid_parameter(client: Client, server: Server) -> None:
    answer = httpx.get(
        f"{server.url}/v2/Services",
        params={"PageToken": "not-a-cursor"},
        auth=(account_sid(server), server.key),
    )
    assert answer.status_code == 400
    assert answer.json()["code"] == 60200 and "PageToken" in answer.json()["message"]


def forged_cursor(stamp: str, row_id: str) -> str:
    raw = json.dumps([stamp, row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    ("method", "path", "data", "parameter"),
    [
        ("POST", "/v2/Services", {"FriendlyName": "X", "CodeLength": "²"}, "CodeLength"),
        ("POST", "/v2/Services", {"FriendlyName": "X", "CodeLength": "①"}, "CodeLength"),
        ("POST", "/v2/Services", {"FriendlyName": "X", "CodeLength": "٨"}, "CodeLength"),
        ("POST", "/v2/Services", {"FriendlyName": "X", "CodeLength": "６"}, "CodeLength"),
        ("GET", "/v2/Services", {"PageSize": "²"}, "PageSize"),
        ("GET", "/v2/Services", {"PageSize": "0"}, "PageSize"),
        ("GET", "/v2/Services", {"Page": "¹"}, "Page"),
        (
            "GET",
            "/v2/Services",
            {"PageToken": forged_cursor("2099-01-01T00:00:00+00:00", "\ud800")},
            "PageToken",
        ),
        (
            "GET",
            "/v2/Services",
            {"PageToken": forged_cursor("2099-01-01T00:00:00+00:00", "svc_\u0000")},
            "PageToken",
        ),
        ("GET", "/v2/Services", {"PageToken": forged_cursor("2099-01-01", "svc_x")}, "PageToken"),
    ],
)
def test_odd_numbers_and_forged_page_tokens_are_invalid_parameters(
    server: Server, method: str, path: str, data: dict[str, str], parameter: str
) -> None:
    auth = (account_sid(server), server.key)
    before = httpx.get(f"{server.url}/v1/services?limit=200", headers=server.auth()).json()
    if method == "POST":
        answer = httpx.post(f"{server.url}{path}", data=data, auth=auth)
    else:
        answer = httpx.get(f"{server.url}{path}", params=data, auth=auth)
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == 60200 and parameter in answer.json()["message"]
    after = httpx.get(f"{server.url}/v1/services?limit=200", headers=server.auth()).json()
    assert after == before


@pytest.mark.parametrize("value", ["NaN", "Infinity", "5", "[]", '"x"', "{"])
def test_json_parameters_must_be_json_objects(server: Server, client: Client, value: str) -> None:
    service = client.verify.v2.services.create(friendly_name="Json params")
    answer = httpx.post(
        f"{server.url}/v2/Services/{service.sid}/Verifications",
        data={"To": fresh_number(), "Channel": "sms", "ChannelConfiguration": value},
        auth=(account_sid(server), server.key),
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["code"] == 60200
    assert "ChannelConfiguration" in answer.json()["message"]


def test_blocked_destination_country_not_allowed_and_rate_limited(
    server: Server, client: Client, stub: LabsMobileStub
) -> None:
    """otpgate's abuse defence answers in Twilio's words: a blocked prefix 60410, a country
    the service does not allow 60605, a rate limit 20429; none of them sends anything."""
    service = client.verify.v2.services.create(friendly_name="Guarded")
    verifications = client.verify.v2.services(service.sid).verifications
    native_id = "svc_" + service.sid.removeprefix("VA")
    admin = server.auth()
    before = len(stub.messages)

    blocked_number = fresh_number()
    block = httpx.post(
        f"{server.url}/v1/blocks", json={"prefix": blocked_number[:-3]}, headers=admin
    )
    assert block.status_code == 201, block.text
    blocked = refused(lambda: verifications.create(to=blocked_number, channel="sms"))
    assert (blocked.status, blocked.code) == (403, 60410)
    lifted = httpx.delete(f"{server.url}/v1/blocks/{block.json()['id']}", headers=admin)
    assert lifted.status_code == 204

    narrowed = httpx.patch(
        f"{server.url}/v1/services/{native_id}", json={"allowed_countries": ["PT"]}, headers=admin
    )
    assert narrowed.status_code == 200, narrowed.text
    abroad = refused(lambda: verifications.create(to=fresh_number(), channel="sms"))
    assert (abroad.status, abroad.code) == (403, 60605)

    limited = httpx.patch(
        f"{server.url}/v1/services/{native_id}",
        json={
            "allowed_countries": None,
            "rate_limits": {"per_number": {"limit": 1, "window_seconds": 3600}},
        },
        headers=admin,
    )
    assert limited.status_code == 200, limited.text
    number = fresh_number()
    first = verifications.create(to=number, channel="sms")
    assert first.status == "pending"
    wait_for_texts(stub, number, 1)
    again = refused(lambda: verifications.create(to=number, channel="sms"))
    assert (again.status, again.code) == (429, 20429)
    assert len(stub.messages) == before + 1  # only the one allowed start sent a code


# --- the SDK's asynchronous client ---------------------------------------------------------------


# twilio 9.13's async client passes aiohttp.BasicAuth as ``auth``, which aiohttp 3.14
# deprecates: the SDK's warnings, not ours.
@pytest.mark.filterwarnings("ignore:BasicAuth is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:The 'auth' parameter is deprecated:DeprecationWarning")
async def test_the_asynchronous_client_starts_and_checks(
    server: Server, stub: LabsMobileStub
) -> None:
    """``twilio``'s async surface (``AsyncTwilioHttpClient``, ``*_async`` methods) over aiohttp
    works unchanged too."""
    client = Client(account_sid(server), server.key, http_client=AsyncTwilioHttpClient())
    client.verify.base_url = server.url
    try:
        service = await client.verify.v2.services.create_async(friendly_name="Async")
        number = fresh_number()
        verifications = client.verify.v2.services(service.sid).verifications
        started = await verifications.create_async(to=number, channel="sms")
        assert (started.status, started.sid[:2]) == ("pending", "VE")
        assert isinstance(started.date_created, datetime)
        code = code_in((await asyncio.to_thread(wait_for_texts, stub, number, 1))[0])
        checks = client.verify.v2.services(service.sid).verification_checks
        assert (await checks.create_async(to=number, code=wrong(code))).status == "pending"
        assert (await checks.create_async(to=number, code=code)).status == "approved"
        with pytest.raises(TwilioRestException) as gone:
            await checks.create_async(to=number, code=code)
        assert (gone.value.status, gone.value.code) == (404, 20404)
        fetched = await client.verify.v2.services(service.sid).fetch_async()
        assert fetched.friendly_name == "Async"
    finally:
        await client.http_client.close()
