"""The verification flow through the real HTTP API on SQLite and PostgreSQL (API.md §4)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from otpgate.adapters.storage import tables as t
from tests.conftest import Api, Database, code_in, make_settings, serving


async def started(api: Api, to: str = "+34600000001", **fields: Any) -> tuple[str, str]:
    """Start a verification, deliver it, and return (id, code as the phone received it)."""
    response = await api.start(to, **fields)
    assert response.status_code == 201, response.text
    await api.deliver()
    return response.json()["id"], code_in(api.sender.sent[-1].text)


def wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


async def test_full_flow_wrong_then_right_then_replay(api: Api) -> None:
    vid, code = await started(api)

    body = (await api.check(vid, wrong(code))).json()
    assert body == {"id": vid, "status": "pending", "valid": False, "remaining_attempts": 4}

    body = (await api.check(vid, code)).json()
    assert body == {"id": vid, "status": "approved", "valid": True, "remaining_attempts": 4}

    again = await api.check(vid, code)
    assert again.status_code == 200
    assert again.json()["valid"] is False
    assert again.json()["status"] == "approved"


async def test_a_code_is_valid_only_for_its_own_verification(api: Api) -> None:
    first, first_code = await started(api, "+34600000001")
    second, second_code = await started(api, "+34600000002")
    if first_code == second_code:  # one chance in a million; the test needs different codes
        pytest.skip("the two random codes happen to be equal")
    assert (await api.check(second, first_code)).json()["valid"] is False
    assert (await api.check(first, second_code)).json()["valid"] is False
    assert (await api.check(second, second_code)).json()["valid"] is True


async def test_start_returns_the_documented_object_without_the_code(api: Api) -> None:
    response = await api.start("+34600000001", metadata={"user": "42"})
    assert response.status_code == 201
    body = response.json()
    assert body["id"].startswith("ver_") and len(body["id"]) == 36
    assert body["status"] == "pending"
    assert body["to"] == "+34600000001"
    assert body["check_attempts"] == 0 and body["max_check_attempts"] == 5
    assert body["send_attempts"] == 1 and body["max_send_attempts"] == 5
    assert body["metadata"] == {"user": "42"}
    assert body["expires_at"].endswith("Z")
    (message,) = body["messages"]
    assert message["status"] == "queued"
    assert message["segments"] == 1 and message["encoding"] == "GSM-7"
    await api.deliver()
    code = code_in(api.sender.sent[-1].text)
    assert code not in response.text
    status = await api.http.get(f"/v1/verifications/{body['id']}", headers=api.auth())
    assert status.json()["messages"][0]["status"] == "sent"
    assert status.json()["messages"][0]["provider"] == "recording"


async def test_fifty_concurrent_right_checks_approve_exactly_once(api: Api) -> None:
    vid, code = await started(api)
    answers = await asyncio.gather(*(api.check(vid, code) for _ in range(50)))
    assert all(a.status_code == 200 for a in answers)
    assert sum(a.json()["valid"] for a in answers) == 1


async def test_fifty_concurrent_wrong_checks_stop_at_the_cap(api: Api) -> None:
    vid, code = await started(api)
    answers = await asyncio.gather(*(api.check(vid, wrong(code)) for _ in range(50)))
    assert all(a.status_code == 200 and a.json()["valid"] is False for a in answers)
    status = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
    assert status["check_attempts"] == status["max_check_attempts"] == 5
    assert status["status"] == "max_attempts_reached"
    late = (await api.check(vid, code)).json()
    assert late == {
        "id": vid,
        "status": "max_attempts_reached",
        "valid": False,
        "remaining_attempts": 0,
    }


async def test_resend_sends_the_same_code_with_cooldown_and_cap(api: Api) -> None:
    vid, code = await started(api)
    too_soon = await api.start()
    assert too_soon.status_code == 429
    assert too_soon.headers["content-type"] == "application/problem+json"
    assert too_soon.json()["code"] == "resend_too_soon"
    assert too_soon.json()["retry_after"] == 30
    assert too_soon.headers["Retry-After"] == "30"

    for send in range(2, 6):
        api.clock.advance(30)
        again = await api.start()
        assert again.status_code == 200, again.text
        assert again.json()["id"] == vid
        assert again.json()["send_attempts"] == send
        await api.deliver()
    assert api.sender.codes_to("+34600000001") == [code] * 5

    api.clock.advance(30)
    sixth = await api.start()
    assert sixth.status_code == 429
    assert sixth.json()["code"] == "max_send_attempts_reached"
    # The explicit resend endpoint follows the same rules.
    explicit = await api.http.post(f"/v1/verifications/{vid}/resend", headers=api.auth())
    assert explicit.json()["code"] == "max_send_attempts_reached"
    await api.deliver()
    assert len(api.sender.sent) == 5
    assert (await api.check(vid, code)).json()["valid"] is True


async def test_resend_endpoint_and_partial_retry_after(api: Api) -> None:
    vid, code = await started(api)
    api.clock.advance(12.5)
    early = await api.http.post(f"/v1/verifications/{vid}/resend", headers=api.auth())
    assert early.status_code == 429
    assert early.json()["retry_after"] == 18  # 17.5 s rounded up
    api.clock.advance(17.5)
    ok = await api.http.post(f"/v1/verifications/{vid}/resend", json={}, headers=api.auth())
    assert ok.status_code == 200
    await api.deliver()
    assert api.sender.codes_to("+34600000001") == [code, code]


async def test_expiry_is_reported_at_once_and_refuses_the_right_code(api: Api) -> None:
    vid, code = await started(api)
    api.clock.advance(600)
    status = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
    assert status["status"] == "expired"
    assert (await api.check(vid, code)).json() == {
        "id": vid,
        "status": "expired",
        "valid": False,
        "remaining_attempts": 5,
    }
    # A new start after expiry creates a new verification with a new code.
    again = await api.start()
    assert again.status_code == 201 and again.json()["id"] != vid


async def test_cancel(api: Api) -> None:
    vid, code = await started(api)
    canceled = await api.http.post(f"/v1/verifications/{vid}/cancel", headers=api.auth())
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert (await api.check(vid, code)).json()["status"] == "canceled"
    assert (await api.check(vid, code)).json()["valid"] is False
    again = await api.http.post(f"/v1/verifications/{vid}/cancel", headers=api.auth())
    assert again.json()["status"] == "canceled"


async def test_context_binds_the_code_to_the_transaction(api: Api) -> None:
    context = {"amount": "12.50 EUR", "payee": "Tienda SL"}
    vid, code = await started(api, context=context)
    text_ = api.sender.sent[-1].text
    assert "12.50 EUR" in text_ and "Tienda SL" in text_
    assert (await api.check(vid, code)).json()["valid"] is False  # no context
    other = {"amount": "12.51 EUR", "payee": "Tienda SL"}
    assert (await api.check(vid, code, context=other)).json()["valid"] is False
    body = (await api.check(vid, code, context=context)).json()
    assert body["valid"] is True and body["remaining_attempts"] == 3


async def test_new_context_supersedes_the_pending_verification(api: Api) -> None:
    first, first_code = await started(api, context={"amount": "1.00 EUR", "payee": "A"})
    api.clock.advance(30)
    response = await api.start(context={"amount": "2.00 EUR", "payee": "A"})
    assert response.status_code == 201
    second = response.json()
    assert second["id"] != first
    assert second["send_attempts"] == 2  # the send budget carries over (S9)
    old = (await api.check(first, first_code, context={"amount": "1.00 EUR", "payee": "A"})).json()
    assert old == {"id": first, "status": "canceled", "valid": False, "remaining_attempts": 5}


async def test_superseding_cannot_get_around_the_resend_limits(api: Api) -> None:
    await started(api, custom_code="111111")
    too_soon = await api.start(custom_code="222222")
    assert too_soon.status_code == 429 and too_soon.json()["code"] == "resend_too_soon"
    for n in range(2, 6):
        api.clock.advance(30)
        response = await api.start(custom_code=f"{n}{n}{n}{n}{n}{n}")
        assert response.status_code == 201 and response.json()["send_attempts"] == n
        await api.deliver()
    api.clock.advance(30)
    capped = await api.start(custom_code="999999")
    assert capped.status_code == 429 and capped.json()["code"] == "max_send_attempts_reached"
    await api.deliver()
    assert len(api.sender.sent) == 5


async def test_context_that_would_need_two_segments_is_refused(api: Api) -> None:
    # Cyrillic is outside GSM-7: the message would turn UCS-2 and need two segments.
    response = await api.start(context={"amount": "1234567890.00 EUR", "payee": "Ж" * 32})
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request" and response.json()["param"] == "context"
    await api.deliver()
    assert api.sender.sent == []
    listed = await api.http.get("/v1/verifications", headers=api.auth())
    assert listed.json()["data"] == []


@pytest.mark.parametrize(
    ("context", "param"),
    [
        ({"amount": "10 EUR\nCode: 123456"}, "context.amount"),  # a forged line of its own
        ({"payee": "Shop\r"}, "context.payee"),
        ({"payee": "\u202eopohS"}, "context.payee"),  # shown reversed
        ({"payee": "Sh\u200bop"}, "context.payee"),  # a zero-width space
        ({"amount": "10\u2028EUR"}, "context.amount"),  # a line separator
        ({"amount": "10\tEUR"}, "context.amount"),
    ],
)
async def test_a_context_shows_as_it_is_or_is_refused(
    api: Api, context: dict[str, str], param: str
) -> None:
    response = await api.start(context=context)
    assert response.status_code == 400, response.text
    assert (response.json()["code"], response.json()["param"]) == ("invalid_request", param)
    await api.deliver()
    assert api.sender.sent == []
    listed = await api.http.get("/v1/verifications", headers=api.auth())
    assert listed.json()["data"] == []


async def test_a_pending_code_sealed_under_an_old_key_is_replaced(api: Api) -> None:
    vid, _ = await started(api)
    # Simulate a master-key rotation: the stored ciphertext no longer authenticates.
    async with api.database.sql() as conn:
        await conn.execute(
            t.verifications.update()
            .where(t.verifications.c.id == vid)
            .values(code_sealed=b"x" * 40)
        )
    api.clock.advance(30)
    resend = await api.http.post(f"/v1/verifications/{vid}/resend", headers=api.auth())
    assert resend.status_code == 400 and resend.json()["param"] == "id"
    status = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
    assert status["status"] == "failed"
    fresh = await api.start()
    assert fresh.status_code == 201 and fresh.json()["id"] != vid


async def test_check_by_destination_uses_the_latest_verification(api: Api) -> None:
    vid, code = await started(api)
    body = {"service_id": api.service_id, "to": "+34 600 000 001", "code": f"{code[:3]} {code[3:]}"}
    response = await api.http.post("/v1/verifications/check", json=body, headers=api.auth())
    assert response.json() == {
        "id": vid,
        "status": "approved",
        "valid": True,
        "remaining_attempts": 5,
    }
    never = {**body, "to": "+34600000009"}
    missing = await api.http.post("/v1/verifications/check", json=never, headers=api.auth())
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"


async def test_custom_and_alphanumeric_codes(api: Api) -> None:
    service = await api.new_service(code_type="alphanumeric", code_length=8)
    response = await api.http.post(
        "/v1/verifications",
        headers=api.auth(),
        json={"service_id": service, "to": "+34600000003", "custom_code": "ABCD2345"},
    )
    assert response.status_code == 201, response.text
    await api.deliver()
    assert "ABCD2345" in api.sender.sent[-1].text
    ok = await api.check(response.json()["id"], "abcd-2345")
    assert ok.json()["valid"] is True

    bad = await api.http.post(
        "/v1/verifications",
        headers=api.auth(),
        json={"service_id": service, "to": "+34600000004", "custom_code": "ABC0"},
    )
    assert bad.status_code == 400
    assert bad.json()["code"] == "invalid_request" and bad.json()["param"] == "custom_code"


async def test_generated_alphanumeric_codes_avoid_look_alikes(api: Api) -> None:
    service = await api.new_service(code_type="alphanumeric", code_length=10)
    for n in range(5):
        await api.http.post(
            "/v1/verifications",
            headers=api.auth(),
            json={"service_id": service, "to": f"+3460000001{n}"},
        )
    await api.deliver()
    for sms in api.sender.sent:
        code = code_in(sms.text)
        assert len(code) == 10 and not set(code) & set("01OI")


async def test_list_with_cursor_and_filters(api: Api) -> None:
    ids = []
    for n in range(5):
        response = await api.start(f"+3460000002{n}")
        ids.append(response.json()["id"])
        api.clock.advance(1)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await api.http.get("/v1/verifications", params=params, headers=api.auth())).json()
        seen += [v["id"] for v in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    one = await api.http.get("/v1/verifications", params={"to": "+34600000022"}, headers=api.auth())
    assert [v["id"] for v in one.json()["data"]] == [ids[2]]
    await api.http.post(f"/v1/verifications/{ids[0]}/cancel", headers=api.auth())
    canceled = await api.http.get(
        "/v1/verifications", params={"status": "canceled"}, headers=api.auth()
    )
    assert [v["id"] for v in canceled.json()["data"]] == [ids[0]]
    bad = await api.http.get("/v1/verifications", params={"limit": 0}, headers=api.auth())
    assert bad.status_code == 400 and bad.json()["param"] == "limit"
    bad = await api.http.get("/v1/verifications", params={"cursor": "nope"}, headers=api.auth())
    assert bad.status_code == 400 and bad.json()["param"] == "cursor"


@pytest.mark.parametrize(
    "fields",
    [
        ["2026-11-27T12:00:00", "ver_x"],  # no time zone
        ["2026-11-27", "ver_x"],  # a date only
        ["2026-11-27T12:00:00+00:00", 7],  # an id that is not a string
        [17, "ver_x"],
        {"a": 1},
    ],
)
async def test_forged_cursors_are_refused_not_500(api: Api, fields: object) -> None:
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).decode().rstrip("=")
    for path in ("/v1/verifications", "/v1/services", "/v1/accounts"):
        bad = await api.http.get(path, params={"cursor": forged}, headers=api.auth())
        assert bad.status_code == 400, (path, bad.text)
        assert bad.json()["param"] == "cursor"


@pytest.fixture
async def unthrottled_checks(database: Database, tmp_path: Path) -> AsyncIterator[Api]:
    """The app with the per-destination check rate limit (60 an hour by default) out of the
    way, so a test can reach the 100-failure lockout within the frozen clock's hour."""
    settings = make_settings(database, tmp_path, rate_limit_checks=1_000)
    async with serving(settings, database) as running:
        yield running


async def test_hundred_consecutive_failures_lock_the_destination(unthrottled_checks: Api) -> None:
    api = unthrottled_checks
    service = await api.new_service(max_check_attempts=20, resend_interval_seconds=0)
    to = "+34600000031"
    for _ in range(5):
        response = await api.http.post(
            "/v1/verifications", headers=api.auth(), json={"service_id": service, "to": to}
        )
        assert response.status_code == 201, response.text
        vid = response.json()["id"]
        for _ in range(20):
            assert (await api.check(vid, "000000x")).json()["valid"] is False
    locked = await api.http.post(
        "/v1/verifications", headers=api.auth(), json={"service_id": service, "to": to}
    )
    assert locked.status_code == 403
    assert locked.json()["code"] == "destination_blocked"
    assert locked.json()["retry_after"] > 0
    # Another destination, and the same destination in another service, are not affected.
    other = await api.http.post(
        "/v1/verifications", headers=api.auth(), json={"service_id": service, "to": "+34600000032"}
    )
    assert other.status_code == 201
    assert (await api.start(to)).status_code == 201
    # The cooldown lifts the lock.
    api.clock.advance(86_400)
    assert (
        await api.http.post(
            "/v1/verifications", headers=api.auth(), json={"service_id": service, "to": to}
        )
    ).status_code == 201


async def test_a_success_resets_the_consecutive_failure_count(api: Api) -> None:
    vid, code = await started(api)
    await api.check(vid, wrong(code))
    await api.check(vid, code)
    async with api.database.sql() as conn:
        rows = await conn.execute(select(func.count()).select_from(t.destination_failures))
        assert rows.scalar_one() == 0


async def test_locale_selects_the_template(api: Api) -> None:
    await started(api, locale="es")
    assert "codigo" in api.sender.sent[-1].text
    await started(api, "+34600000005", locale="es-MX")
    assert "codigo" in api.sender.sent[-1].text
    await started(api, "+34600000006", locale="fr")
    assert "Valable" in api.sender.sent[-1].text
    await started(api, "+34600000007", locale="sv")  # no Swedish built-in: English
    assert "Valid" in api.sender.sent[-1].text
