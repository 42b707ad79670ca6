"""Test numbers (a service's ``test_numbers``: E.164 number → fixed code), on every backend,
through the real app and storage.

A start to a test number answers 201 like any start, but nothing reaches a provider (the
recording sender sees nothing, no outbox row is ever due), no credit is used (a prepaid account
with no balance and a price table loaded), no spend cap counts it, and only the fixed code
approves it. The verification and its message say ``test: true``; so do the log line of the
start and the metrics. Resends and checks work as usual. A bad ``test_numbers`` is refused with
400 naming it and changes nothing.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from otpgate.domain.billing import BillingMode
from tests.conftest import Api

TEST_NUMBER = "+34600000099"
FIXED = "424242"
OTHER = "+34600000001"


async def with_test_number(api: Api, **fields: Any) -> dict[str, Any]:
    response = await api.http.patch(
        f"/v1/services/{api.service_id}",
        json={"test_numbers": {TEST_NUMBER: FIXED}, **fields},
        headers=api.auth(),
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def rows(api: Api, table: str) -> list[dict[str, Any]]:
    async with api.database.sql() as conn:
        found = await conn.execute(text(f"SELECT * FROM {table}"))  # noqa: S608 - fixed names
        return [dict(row._mapping) for row in found]


async def test_a_test_number_sends_nothing_and_approves_with_its_fixed_code_only(
    api: Api,
) -> None:
    shown = await with_test_number(api)
    assert shown["test_numbers"] == {TEST_NUMBER: FIXED}
    started = await api.start(TEST_NUMBER)
    assert started.status_code == 201, started.text
    body = started.json()
    assert body["test"] is True and body["status"] == "pending"
    [message] = body["messages"]
    assert message["test"] is True
    assert (message["status"], message["provider"], message["price"]) == ("sent", "test", None)
    await api.deliver()
    assert api.sender.sent == []
    [stored] = await rows(api, "messages")
    assert stored["status"] == "sent" and stored["test"] and stored["attempts"] == 0
    # any other code is a wrong code, counted as usual
    wrong = await api.check(body["id"], "000000")
    assert wrong.json() == {
        "id": body["id"],
        "status": "pending",
        "valid": False,
        "remaining_attempts": 4,
    }
    right = await api.check(body["id"], FIXED)
    assert (right.json()["status"], right.json()["valid"]) == ("approved", True)
    shown_after = await api.http.get(f"/v1/verifications/{body['id']}", headers=api.auth())
    assert shown_after.json()["test"] is True
    assert shown_after.json()["messages"][0]["test"] is True


async def test_other_numbers_are_not_test_numbers(api: Api) -> None:
    await with_test_number(api)
    started = await api.start(OTHER)
    assert started.status_code == 201
    assert started.json()["test"] is False
    assert started.json()["messages"][0]["test"] is False
    await api.deliver()
    assert [s.to for s in api.sender.sent] == [OTHER]
    # the fixed code of the test number is not this verification's code
    assert (await api.check(started.json()["id"], FIXED)).json()["valid"] is False


async def test_a_resend_to_a_test_number_sends_nothing_either(api: Api) -> None:
    await with_test_number(api)
    started = (await api.start(TEST_NUMBER)).json()
    api.clock.advance(30)
    again = await api.http.post(
        f"/v1/verifications/{started['id']}/resend", json={}, headers=api.auth()
    )
    assert again.status_code == 200, again.text
    assert again.json()["send_attempts"] == 2
    assert [m["test"] for m in again.json()["messages"]] == [True, True]
    await api.deliver()
    assert api.sender.sent == []
    assert (await api.check(started["id"], FIXED)).json()["valid"] is True


async def test_a_test_number_uses_no_credit_and_no_spend_cap(api: Api) -> None:
    """A prepaid account without credit, a price table, and a service cap of 0 credits: only
    the test number gets through, and no ledger entry or spend counter is written."""
    account = await api.container.access.create_account("Shop", billing=BillingMode.PREPAID)
    key = (await api.container.access.create_key(account.id, name="ci")).secret
    await api.container.billing.import_prices("country,credits\nES,1\n")
    auth = {"Authorization": f"Bearer {key}"}
    created = await api.http.post(
        "/v1/services",
        json={"name": "Shop", "test_numbers": {TEST_NUMBER: FIXED}, "daily_spend_cap": "0"},
        headers=auth,
    )
    service = created.json()["id"]
    test = await api.http.post(
        "/v1/verifications", json={"service_id": service, "to": TEST_NUMBER}, headers=auth
    )
    assert test.status_code == 201, test.text
    real = await api.http.post(
        "/v1/verifications", json={"service_id": service, "to": OTHER}, headers=auth
    )
    assert (real.status_code, real.json()["code"]) == (402, "insufficient_credit")
    await api.deliver()
    assert api.sender.sent == []
    assert await rows(api, "ledger") == []
    # the real start was refused by the cap (caps come before credit); the test number had
    # counted nothing against it
    assert [r["spent_units"] for r in await rows(api, "spend_counters")] == [0]
    balance = await api.http.get("/v1/account", headers=auth)
    assert balance.json()["balance"] == "0"


async def test_the_start_log_line_and_the_metrics_mark_a_test(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    await with_test_number(api)
    with caplog.at_level(logging.INFO, logger="otpgate.services.verification"):
        await api.start(TEST_NUMBER)
        await api.start(OTHER)
    started = [r for r in caplog.records if r.getMessage() == "verification started"]
    assert [(getattr(r, "test", None), getattr(r, "to", None)) for r in started] == [
        (True, "+34******099"),
        (False, "+34******001"),
    ]
    assert all(FIXED not in r.getMessage() and FIXED not in str(r.__dict__) for r in started)
    metrics = (await api.http.get("/metrics")).text
    assert 'otpgate_test_verification_total{kind="start"} 1.0' in metrics
    assert 'otpgate_verification_started_total{channel="sms"} 1.0' in metrics


@pytest.mark.parametrize(
    ("numbers", "why"),
    [
        ({TEST_NUMBER: "12345"}, "must be 6 digits"),
        ({TEST_NUMBER: "12345A"}, "must be 6 digits"),
        ({TEST_NUMBER: 424242}, "must be a string"),
        ({"34600000099": FIXED}, "E.164"),
        ({"+34 600 000 099": FIXED}, "E.164"),
        ({"+34100000000": FIXED}, "E.164"),  # not an assigned number
        ([TEST_NUMBER], "dictionary"),  # refused by the body shape
        ({f"+3460000{n:04d}": FIXED for n in range(101)}, "at most 100"),
    ],
)
async def test_a_bad_test_numbers_field_is_refused_and_changes_nothing(
    api: Api, numbers: Any, why: str
) -> None:
    before = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    refused = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"test_numbers": numbers}, headers=api.auth()
    )
    assert refused.status_code == 400, refused.text
    problem = refused.json()
    assert (problem["code"], problem["param"]) == ("invalid_request", "test_numbers")
    assert why in problem["detail"]
    after = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    assert after == before
    created = await api.http.post(
        "/v1/services", json={"name": "New", "test_numbers": numbers}, headers=api.auth()
    )
    assert created.status_code == 400
    listed = await api.http.get("/v1/services", headers=api.auth())
    assert [s["name"] for s in listed.json()["data"]] == ["Acme"]


async def test_changing_the_code_rules_must_keep_the_test_codes_valid(api: Api) -> None:
    await with_test_number(api)
    refused = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"code_length": 8}, headers=api.auth()
    )
    assert (refused.status_code, refused.json()["param"]) == (400, "test_numbers")
    both = await api.http.patch(
        f"/v1/services/{api.service_id}",
        json={"code_length": 8, "test_numbers": {TEST_NUMBER: "12345678"}},
        headers=api.auth(),
    )
    assert both.status_code == 200
    cleared = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"test_numbers": None}, headers=api.auth()
    )
    assert cleared.json()["test_numbers"] == {}


async def test_labsmobile_send_code_to_a_test_number_inherits(api: Api) -> None:
    """LabsMobile's OTP API goes through the same start: nothing sent, the fixed code checks."""
    await with_test_number(api)
    token = base64.b64encode(f"{api.account_id}:{api.key}".encode()).decode()
    auth = {"Authorization": f"Basic {token}"}

    async def otp(operation: str, **params: Any) -> httpx.Response:
        return await api.http.get(f"/otp/{operation}", params=params, headers=auth)

    sent = await otp("sendCode", env="Acme", phone_number=TEST_NUMBER[1:], message="%CODE%")
    assert sent.text == "1", sent.headers.get("x-otpgate-error")
    await api.deliver()
    assert api.sender.sent == []
    assert (await otp("checkCode", env="Acme", phone_number=TEST_NUMBER[1:])).text == "0"
    assert (
        await otp("validateCode", env="Acme", phone_number=TEST_NUMBER[1:], code="111111")
    ).text == "0"
    assert (
        await otp("validateCode", env="Acme", phone_number=TEST_NUMBER[1:], code=FIXED)
    ).text == "1"
    assert (await otp("checkCode", env="Acme", phone_number=TEST_NUMBER[1:])).text == "1"


async def test_a_test_number_uses_no_rate_limit(api: Api) -> None:
    """With one start per number allowed, a test number still starts again and again (and a
    real number is refused its second start)."""
    await with_test_number(api, rate_limits={"per_number": {"limit": 1, "window_seconds": 3600}})
    for _ in range(3):
        started = await api.start(TEST_NUMBER)
        assert started.status_code == 201, started.text
        cancel = f"/v1/verifications/{started.json()['id']}/cancel"
        assert (await api.http.post(cancel, headers=api.auth())).status_code == 200
    first = await api.start(OTHER)
    assert first.status_code == 201
    cancel = f"/v1/verifications/{first.json()['id']}/cancel"
    assert (await api.http.post(cancel, headers=api.auth())).status_code == 200
    refused = await api.start(OTHER)
    assert (refused.status_code, refused.json()["code"]) == (429, "rate_limited")


async def test_removing_a_test_number_ends_its_code_and_the_next_start_is_real(api: Api) -> None:
    await with_test_number(api)
    first = (await api.start(TEST_NUMBER)).json()
    removed = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"test_numbers": None}, headers=api.auth()
    )
    assert removed.status_code == 200, removed.text

    # The published fixed code approves nothing once the number is no longer a test number.
    late = await api.check(first["id"], FIXED)
    assert (late.json()["status"], late.json()["valid"]) == ("canceled", False)
    started = await api.start(TEST_NUMBER)
    assert started.status_code == 201, started.text
    again = started.json()
    assert again["id"] != first["id"] and again["test"] is False
    await api.deliver()
    assert [sms.to for sms in api.sender.sent] == [TEST_NUMBER]  # a real code, really sent
    refused = await api.check(again["id"], FIXED)
    assert refused.json()["valid"] is False


async def test_a_changed_fixed_code_replaces_the_old_one(api: Api) -> None:
    await with_test_number(api)
    first = (await api.start(TEST_NUMBER)).json()
    changed = await api.http.patch(
        f"/v1/services/{api.service_id}",
        json={"test_numbers": {TEST_NUMBER: "515151"}},
        headers=api.auth(),
    )
    assert changed.status_code == 200, changed.text

    late = await api.check(first["id"], FIXED)
    assert (late.json()["status"], late.json()["valid"]) == ("canceled", False)
    again = (await api.start(TEST_NUMBER)).json()
    assert again["id"] != first["id"] and again["test"] is True
    assert (await api.check(again["id"], FIXED)).json()["valid"] is False
    assert (await api.check(again["id"], "515151")).json()["status"] == "approved"
    await api.deliver()
    assert api.sender.sent == []


async def test_a_number_that_becomes_a_test_number_gets_a_test_verification(api: Api) -> None:
    real = (await api.start(OTHER)).json()
    await api.deliver()
    made = await api.http.patch(
        f"/v1/services/{api.service_id}",
        json={"test_numbers": {OTHER: FIXED}},
        headers=api.auth(),
    )
    assert made.status_code == 200, made.text

    started = await api.start(OTHER)
    assert started.status_code == 201, started.text
    test = started.json()
    assert test["id"] != real["id"] and test["test"] is True
    await api.deliver()
    assert [sms.to for sms in api.sender.sent] == [OTHER]  # only the first, real, send
    assert (await api.check(test["id"], FIXED)).json()["status"] == "approved"
    superseded = await api.http.get(f"/v1/verifications/{real['id']}", headers=api.auth())
    assert superseded.json()["status"] == "canceled"
