"""Acceptance: the SMS-pumping scenario (issue 9), and what blocks and the safe list promise.

The scenario runs on the detector alone, on SQLite and PostgreSQL, with a frozen clock that
moves 0.2 s per start (about 5 starts a second from 4 concurrent clients).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from otpgate.adapters.storage import tables as t
from tests.conftest import Api
from tests.support import pumping

HOUR = 3_600

#: Rate limits far above anything these tests send: they watch the detector alone (the
#: scenario test keeps the default limits, to show both work together).
NO_LIMITS = {
    name: {"limit": 100_000, "window_seconds": 1}
    for name in ("per_number", "per_prefix", "per_country", "per_ip", "per_service")
}


@pytest.fixture
async def detector_alone(api: Api) -> None:
    response = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"rate_limits": NO_LIMITS}, headers=api.auth()
    )
    assert response.status_code == 200, response.text


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


async def test_pumped_prefixes_are_blocked_and_legitimate_users_pass(api: Api) -> None:
    outcome = await pumping.run(api)
    # At most 60 messages reached the provider for the two bad prefixes, in total.
    assert outcome.bad_sent_total <= 60, outcome
    # Both are blocked, not merely refused: listed in /v1/blocks as prefixes of PH.
    listed = {b["value"]: b for b in outcome.blocks}
    for prefix in pumping.BAD_PREFIXES:
        block = listed[prefix]
        assert block["kind"] == "prefix" and block["country"] == "PH"
        assert block["automatic"] is True
        assert _parse(block["expires_at"]) - _parse(block["created_at"]) == _hours(12)
        assert outcome.bad_blocked_at.get(prefix) is not None
    # No other prefix was blocked, and at most 2 legitimate verifications were refused.
    assert set(listed) == set(pumping.BAD_PREFIXES)
    assert len(outcome.good_refused) <= 2, outcome.good_refused
    assert outcome.good_approved >= pumping.GOOD_STARTS - 2
    # A start to a blocked prefix answers 403 destination_blocked with retry_after, and
    # stores and sends nothing.
    before = await _counts(api)
    sent = len(api.sender.sent)
    response = await api.start(pumping.BAD_PREFIXES[0] + "999")
    _assert_blocked(response)
    await api.deliver()
    assert await _counts(api) == before and len(api.sender.sent) == sent


async def test_a_safe_listed_number_in_a_blocked_prefix_still_gets_its_code(api: Api) -> None:
    prefix = await _pump_until_blocked(api, pumping.BAD_PREFIXES[0])
    safe = prefix + "777"
    _assert_blocked(await api.start(safe))
    added = await api.http.post("/v1/safe-list", json={"number": safe}, headers=api.auth())
    assert added.status_code == 201, added.text
    assert added.json()["kind"] == "number" and added.json()["value"] == safe
    started = await api.start(safe)
    assert started.status_code == 201, started.text
    await api.deliver()
    code = api.sender.codes_to(safe)[-1]
    checked = await api.check(started.json()["id"], code)
    assert checked.json()["valid"] is True
    # Another number of the prefix is still refused; a safe-listed prefix passes them all.
    _assert_blocked(await api.start(prefix + "778"))
    entry = await api.http.post("/v1/safe-list", json={"prefix": prefix}, headers=api.auth())
    assert entry.status_code == 201
    assert (await api.start(prefix + "778")).status_code == 201
    listed = await api.http.get("/v1/safe-list", headers=api.auth())
    assert {e["value"] for e in listed.json()["data"]} == {safe, prefix}
    # Removing the entry puts the number back under the block.
    removed = await api.http.delete(f"/v1/safe-list/{entry.json()['id']}", headers=api.auth())
    assert removed.status_code == 204
    _assert_blocked(await api.start(prefix + "779"))
    again = await api.http.delete(f"/v1/safe-list/{entry.json()['id']}", headers=api.auth())
    assert again.status_code == 404 and again.json()["code"] == "not_found"


async def test_lifting_a_block_lets_starts_through_and_a_repeat_lasts_24_hours(
    api: Api, detector_alone: None
) -> None:
    prefix = await _pump_until_blocked(api, pumping.BAD_PREFIXES[1])
    (block,) = await _blocks(api)
    assert _parse(block["expires_at"]) - _parse(block["created_at"]) == _hours(12)
    lifted = await api.http.delete(f"/v1/blocks/{block['id']}", headers=api.auth())
    assert lifted.status_code == 204
    assert await _blocks(api) == []
    assert (await api.start(prefix + "500")).status_code == 201
    # The pumping goes on: the prefix is blocked again, for twice as long.
    await _pump_until_blocked(api, prefix, first=501)
    (repeat,) = await _blocks(api)
    assert repeat["id"] != block["id"]
    assert _parse(repeat["expires_at"]) - _parse(repeat["created_at"]) == _hours(24)
    gone = await api.http.delete(f"/v1/blocks/{block['id']}", headers=api.auth())
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"


async def test_a_block_expires_by_itself(api: Api, detector_alone: None) -> None:
    prefix = await _pump_until_blocked(api, pumping.BAD_PREFIXES[0])
    response = await api.start(prefix + "900")
    retry_after = _assert_blocked(response)
    assert 12 * HOUR - 60 <= retry_after <= 12 * HOUR
    api.clock.advance(12 * HOUR + 1)
    assert (await api.start(prefix + "900")).status_code == 201
    assert await _blocks(api) == []


async def test_an_operator_blocks_a_whole_country_and_lifts_it(api: Api) -> None:
    created = await api.http.post(
        "/v1/blocks",
        json={"country": "fr", "duration_seconds": 7_200, "reason": "not our market"},
        headers=api.auth(),
    )
    assert created.status_code == 201, created.text
    block = created.json()
    assert block["kind"] == "country" and block["value"] == "FR" and block["country"] == "FR"
    assert block["automatic"] is False and block["reason"] == "not our market"
    assert _parse(block["expires_at"]) - _parse(block["created_at"]) == _hours(2)
    # Every account's starts obey it: a second account's too.
    other = await _second_account_key(api)
    retry = _assert_blocked(await api.start("+33612345678"))
    assert retry == 7_200
    other_service = await api.http.post(
        "/v1/services", json={"name": "Other"}, headers=api.auth(other)
    )
    refused = await api.http.post(
        "/v1/verifications",
        json={"service_id": other_service.json()["id"], "to": "+33612345679"},
        headers=api.auth(other),
    )
    _assert_blocked(refused)
    # Plain messages obey blocks too.
    message = await api.http.post(
        "/v1/messages", json={"to": "+33612345670", "text": "hello"}, headers=api.auth()
    )
    _assert_blocked(message)
    # Only admin keys see, create and lift blocks.
    for method, path, body in (
        ("GET", "/v1/blocks", None),
        ("POST", "/v1/blocks", {"country": "ES"}),
        ("DELETE", f"/v1/blocks/{block['id']}", None),
    ):
        answer = await api.http.request(method, path, json=body, headers=api.auth(other))
        assert answer.status_code == 403 and answer.json()["code"] == "forbidden"
    assert [b["id"] for b in await _blocks(api)] == [block["id"]]
    lifted = await api.http.delete(f"/v1/blocks/{block['id']}", headers=api.auth())
    assert lifted.status_code == 204
    assert (await api.start("+33612345678")).status_code == 201


async def test_bad_block_requests_change_nothing(api: Api) -> None:
    for body, param in (
        ({}, "country"),
        ({"country": "FR", "prefix": "+336"}, "prefix"),
        ({"country": "France"}, "country"),
        ({"prefix": "336123"}, "prefix"),
        ({"prefix": "+33"}, "prefix"),
        ({"country": "FR", "duration_seconds": 10}, "duration_seconds"),
        ({"country": "FR", "until": "never"}, "until"),
    ):
        response = await api.http.post("/v1/blocks", json=body, headers=api.auth())
        assert response.status_code == 400, (body, response.text)
        assert response.json()["code"] == "invalid_request"
        assert response.json().get("param") == param, (body, response.json())
    assert await _blocks(api) == []


async def test_the_deny_list_refuses_before_anything_is_stored(api: Api) -> None:
    denied = await api.http.post("/v1/deny-list", json={"country": "IT"}, headers=api.auth())
    assert denied.status_code == 201, denied.text
    again = await api.http.post("/v1/deny-list", json={"country": "it"}, headers=api.auth())
    assert again.status_code == 200 and again.json()["id"] == denied.json()["id"]
    prefix = await api.http.post("/v1/deny-list", json={"prefix": "+3461234"}, headers=api.auth())
    assert prefix.status_code == 201
    before = await _counts(api)
    italy = await api.start("+393123456789")
    assert italy.status_code == 403 and italy.json()["code"] == "country_not_allowed"
    spain = await api.start("+34612345678")
    assert spain.status_code == 403 and spain.json()["code"] == "destination_blocked"
    assert "retry_after" not in spain.json()
    assert await _counts(api) == before and api.sender.sent == []
    assert (await api.start("+34622345678")).status_code == 201
    listed = await api.http.get("/v1/deny-list", headers=api.auth())
    assert {(e["kind"], e["value"]) for e in listed.json()["data"]} == {
        ("country", "IT"),
        ("prefix", "+3461234"),
    }
    # A safe list takes no country; a deny list takes no number.
    refused = await api.http.post("/v1/safe-list", json={"country": "IT"}, headers=api.auth())
    assert refused.status_code == 400 and refused.json()["param"] == "country"
    refused = await api.http.post(
        "/v1/deny-list", json={"number": "+34612345678"}, headers=api.auth()
    )
    assert refused.status_code == 400 and refused.json()["param"] == "number"
    removed = await api.http.delete(f"/v1/deny-list/{denied.json()['id']}", headers=api.auth())
    assert removed.status_code == 204
    assert (await api.start("+393123456789")).status_code == 201


async def test_voip_numbers_get_sms_codes_only_when_the_service_allows_them(api: Api) -> None:
    voip = "+445612345678"  # a UK VoIP number (056)
    refused = await api.start(voip)
    assert refused.status_code == 400 and refused.json()["code"] == "unsupported_number_type"
    service = await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())
    assert service.json()["allow_voip"] is False and service.json()["fraud_guard"] == "standard"
    changed = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"allow_voip": True}, headers=api.auth()
    )
    assert changed.status_code == 200 and changed.json()["allow_voip"] is True
    assert (await api.start(voip)).status_code == 201


async def test_fraud_guard_off_never_blocks_but_obeys_blocks(
    api: Api, detector_alone: None
) -> None:
    changed = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"fraud_guard": "off"}, headers=api.auth()
    )
    assert changed.status_code == 200 and changed.json()["fraud_guard"] == "off"
    for i in range(40):
        api.clock.advance(1)
        assert (await api.start(f"{pumping.BAD_PREFIXES[0]}{i:03d}")).status_code == 201
    assert await _blocks(api) == []
    wrong = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"fraud_guard": "paranoid"}, headers=api.auth()
    )
    assert wrong.status_code == 400 and wrong.json()["param"] == "fraud_guard"
    created = await api.http.post(
        "/v1/blocks", json={"prefix": pumping.BAD_PREFIXES[0]}, headers=api.auth()
    )
    assert created.status_code == 201
    _assert_blocked(await api.start(pumping.BAD_PREFIXES[0] + "999"))


async def test_codes_held_up_by_a_provider_outage_are_not_counted_as_unconverted(
    api: Api, detector_alone: None
) -> None:
    """Starts to one range whose codes have not gone out yet (nothing delivered them): however
    old, they are no evidence of pumping, and the range is never blocked."""
    prefix = "+34612345"
    for i in range(30):
        api.clock.advance(2)
        response = await api.start(f"{prefix}{i:03d}")
        assert response.status_code == 201, response.text
    assert await _blocks(api) == []


async def test_a_burst_of_users_still_typing_their_codes_is_not_blocked(
    api: Api, detector_alone: None
) -> None:
    """Twelve people of one number range start within seconds and check 6 s later (inside
    the grace period): the range is never blocked."""
    prefix = "+34612345"
    started = []
    for i in range(12):
        api.clock.advance(0.5)
        response = await api.start(f"{prefix}{i:03d}")
        assert response.status_code == 201, response.text
        started.append((response.json()["id"], f"{prefix}{i:03d}"))
    await api.deliver()
    api.clock.advance(6)
    for verification_id, number in started:
        checked = await api.check(verification_id, api.sender.codes_to(number)[-1])
        assert checked.json()["valid"] is True
    api.clock.advance(60)
    assert (await api.start(f"{prefix}100")).status_code == 201
    assert await _blocks(api) == []


# --- helpers ----------------------------------------------------------------------------------


async def _pump_until_blocked(api: Api, prefix: str, *, first: int = 0) -> str:
    """Unchecked starts to the prefix, 0.5 s apart, until it is blocked; returns the prefix."""
    for i in range(first, first + 200):
        api.clock.advance(0.5)
        response = await api.start(f"{prefix}{i % 1000:03d}")
        await api.deliver()  # a code that never went out is no evidence
        if response.status_code == 403:
            _assert_blocked(response)
            return prefix
        # The prefix rate limit (10 per 10 minutes) refuses starts before the detector has
        # seen enough of them decided; a block must still come.
        assert response.status_code in (201, 429), response.text
    raise AssertionError("the prefix was never blocked")


def _assert_blocked(response: Any) -> int:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["code"] == "destination_blocked"
    assert body["retry_after"] >= 1
    assert response.headers["Retry-After"] == str(body["retry_after"])
    retry: int = body["retry_after"]
    return retry


async def _blocks(api: Api) -> list[dict[str, Any]]:
    response = await api.http.get("/v1/blocks", headers=api.auth())
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


async def _counts(api: Api) -> tuple[int, int]:
    async with api.database.sql() as conn:
        verifications = (
            await conn.execute(select(func.count()).select_from(t.verifications))
        ).scalar_one()
        messages = (await conn.execute(select(func.count()).select_from(t.messages))).scalar_one()
    return verifications, messages


async def _second_account_key(api: Api) -> str:
    account = await api.http.post("/v1/accounts", json={"name": "Other"}, headers=api.auth())
    assert account.status_code == 201, account.text
    key = await api.http.post(
        "/v1/keys", json={"name": "k", "account_id": account.json()["id"]}, headers=api.auth()
    )
    assert key.status_code == 201, key.text
    secret: str = key.json()["key"]
    return secret


def _hours(n: int) -> Any:
    from datetime import timedelta

    return timedelta(hours=n)
