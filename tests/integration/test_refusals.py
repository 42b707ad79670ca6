"""Every refusal is problem+json with a stable code, and changes nothing (API.md §2)."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from sqlalchemy import func, select

from otpgate.adapters.storage import tables as t
from tests.conftest import Api


async def counts(api: Api) -> tuple[int, int]:
    async with api.database.sql() as conn:
        verifications = (
            await conn.execute(select(func.count()).select_from(t.verifications))
        ).scalar_one()
        messages = (await conn.execute(select(func.count()).select_from(t.messages))).scalar_one()
    return verifications, messages


def assert_problem(response: Any, status: int, code: str, param: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["code"] == code and body["status"] == status
    assert body["type"] == f"/errors/{code}"
    assert body["title"] and body["detail"]
    if param is not None:
        assert body.get("param") == param


@pytest.mark.parametrize(
    ("fields", "status", "code", "param"),
    [
        ({"to": "+3460000000"}, 400, "invalid_phone_number", "to"),  # too short
        ({"to": "+34 999 999 999"}, 400, "invalid_phone_number", "to"),  # unassigned range
        ({"to": "not a number"}, 400, "invalid_phone_number", "to"),
        ({"to": "600000001"}, 400, "invalid_phone_number", "to"),  # national without country
        ({"to": "+34910000000"}, 400, "unsupported_number_type", "to"),  # Madrid fixed line
        ({"to": "+34900000000"}, 400, "unsupported_number_type", "to"),  # toll free
        ({"to": "+34803000000"}, 400, "unsupported_number_type", "to"),  # premium rate
        ({"to": "+447911123456", "service": "es_only"}, 403, "country_not_allowed", "to"),
        ({"channel": "voice"}, 403, "channel_not_allowed", "channel"),
        ({"channel": "fax"}, 400, "invalid_request", "channel"),
        ({"service_id": "svc_00000000000000000000000000000000"}, 404, "not_found", None),
        ({"locale": "not a locale"}, 400, "invalid_request", "locale"),
        ({"context": {"amount": "1"}, "extra": 1}, 400, "invalid_request", "extra"),
        ({"context": {"iban": "x"}}, 400, "invalid_request", "context.iban"),
        ({"context": {"amount": "x" * 33}}, 400, "invalid_request", "context.amount"),
        ({"context": {"amount": 12}}, 400, "invalid_request", "context.amount"),
        ({"custom_code": "12345"}, 400, "invalid_request", "custom_code"),
        ({"custom_code": "12345a"}, 400, "invalid_request", "custom_code"),
        ({"to": 34600000000}, 400, "invalid_request", "to"),
    ],
)
async def test_refused_start_stores_and_sends_nothing(
    api: Api, fields: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    fields = dict(fields)  # the parameters are shared by both backends' runs
    es_only = await api.new_service(allowed_countries=["ES"])
    body: dict[str, Any] = {"service_id": api.service_id, "to": "+34600000001"}
    if fields.pop("service", None) == "es_only":
        body["service_id"] = es_only
    body.update(fields)
    response = await api.http.post("/v1/verifications", json=body, headers=api.auth())
    assert_problem(response, status, code, param)
    await api.deliver()
    assert await counts(api) == (0, 0)
    assert api.sender.sent == []


async def test_national_format_with_country_is_accepted(api: Api) -> None:
    response = await api.start("600 000 001", country="ES")
    assert response.status_code == 201
    assert response.json()["to"] == "+34600000001"


async def test_malformed_bodies(api: Api) -> None:
    raw = await api.http.post(
        "/v1/verifications",
        content=b"{not json",
        headers={**api.auth(), "content-type": "application/json"},
    )
    assert_problem(raw, 400, "invalid_request")
    assert "param" not in raw.json()
    missing = await api.http.post(
        "/v1/verifications", json={"to": "+34600000001"}, headers=api.auth()
    )
    assert_problem(missing, 400, "invalid_request", "service_id")
    check = await api.http.post(
        "/v1/verifications/ver_x/check", json={"code": "123456"}, headers=api.auth()
    )
    assert_problem(check, 404, "not_found")
    vid = (await api.start()).json()["id"]
    empty = await api.check(vid, "")
    assert_problem(empty, 400, "invalid_request", "code")
    huge = await api.check(vid, "1" * 65)
    assert_problem(huge, 400, "invalid_request", "code")
    status = await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())
    assert status.json()["check_attempts"] == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer otpgate_wrong"},
        {"Authorization": "Bearer "},
        {"Authorization": "Token abc"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
    ],
)
async def test_unauthorized(api: Api, headers: dict[str, str]) -> None:
    response = await api.http.post(
        "/v1/verifications",
        headers=headers,
        json={"service_id": api.service_id, "to": "+34600000001"},
    )
    assert_problem(response, 401, "unauthorized")
    assert "Bearer" in response.headers["WWW-Authenticate"]
    assert await counts(api) == (0, 0)


async def test_basic_auth_needs_the_keys_own_username(api: Api) -> None:
    account = (await api.http.get("/v1/account", headers=api.auth())).json()
    good = base64.b64encode(f"{account['username']}:{api.key}".encode()).decode()
    ok = await api.http.get("/v1/account", headers={"Authorization": f"Basic {good}"})
    assert ok.status_code == 200 and ok.json()["id"] == api.account_id
    bad = base64.b64encode(f"someone@else:{api.key}".encode()).decode()
    refused = await api.http.get("/v1/account", headers={"Authorization": f"Basic {bad}"})
    assert_problem(refused, 401, "unauthorized")


async def test_another_accounts_objects_are_not_found(api: Api) -> None:
    vid = (await api.start()).json()["id"]
    other = await api.http.post(
        "/v1/accounts", json={"name": "Other", "username": "o@x.test"}, headers=api.auth()
    )
    assert other.status_code == 201
    key = await api.http.post(
        "/v1/keys", json={"name": "k", "account_id": other.json()["id"]}, headers=api.auth()
    )
    assert key.status_code == 201
    theirs = {"Authorization": f"Bearer {key.json()['key']}"}
    for method, path, body in [
        ("GET", f"/v1/verifications/{vid}", None),
        ("POST", f"/v1/verifications/{vid}/check", {"code": "123456"}),
        ("POST", f"/v1/verifications/{vid}/resend", None),
        ("POST", f"/v1/verifications/{vid}/cancel", None),
        ("GET", f"/v1/services/{api.service_id}", None),
        ("PATCH", f"/v1/services/{api.service_id}", {"ttl_seconds": 120}),
        ("DELETE", f"/v1/services/{api.service_id}", None),
        ("POST", "/v1/verifications", {"service_id": api.service_id, "to": "+34600000002"}),
        (
            "POST",
            "/v1/verifications/check",
            {"service_id": api.service_id, "to": "+34600000001", "code": "123456"},
        ),
    ]:
        response = await api.http.request(method, path, json=body, headers=theirs)
        assert_problem(response, 404, "not_found")
    listed = await api.http.get("/v1/verifications", headers=theirs)
    assert listed.json()["data"] == []
    accounts = await api.http.get("/v1/accounts", headers=theirs)
    assert_problem(accounts, 403, "forbidden")
    mine = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
    assert mine["check_attempts"] == 0 and mine["status"] == "pending"


async def test_revoked_key_is_refused(api: Api) -> None:
    created = (await api.http.post("/v1/keys", json={"name": "temp"}, headers=api.auth())).json()
    assert created["key"].startswith("otpgate_")
    temp = {"Authorization": f"Bearer {created['key']}"}
    assert (await api.http.get("/v1/account", headers=temp)).status_code == 200
    listed = (await api.http.get("/v1/keys", headers=api.auth())).json()["data"]
    assert created["id"] in [k["id"] for k in listed]
    assert all("key" not in k for k in listed)
    assert (
        await api.http.delete(f"/v1/keys/{created['id']}", headers=api.auth())
    ).status_code == 204
    assert_problem(await api.http.get("/v1/account", headers=temp), 401, "unauthorized")
    again = await api.http.delete(f"/v1/keys/{created['id']}", headers=api.auth())
    assert_problem(again, 404, "not_found")


async def test_unknown_route_is_problem_json(api: Api) -> None:
    assert_problem(await api.http.get("/v1/nothing", headers=api.auth()), 404, "not_found")
