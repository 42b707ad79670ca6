"""Idempotency, services, operations endpoints and storage outages through the real app."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from otpgate.bootstrap import build
from otpgate.entrypoints.api.app import create_app
from otpgate.errors import IdempotencyInProgress
from otpgate.settings import Settings
from tests.conftest import TEST_SECRET, Api, RecordingSender
from tests.integration.test_refusals import assert_problem

# --- idempotency (S15) ----------------------------------------------------------------------


async def test_same_idempotency_key_twice_sends_one_sms(api: Api) -> None:
    headers = {**api.auth(), "Idempotency-Key": "order-42"}
    body = {"service_id": api.service_id, "to": "+34600000001"}
    first = await api.http.post("/v1/verifications", json=body, headers=headers)
    second = await api.http.post("/v1/verifications", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert second.headers.get("Idempotent-Replayed") == "true"
    await api.deliver()
    assert len(api.sender.sent) == 1


async def test_same_key_other_body_is_a_mismatch(api: Api) -> None:
    headers = {**api.auth(), "Idempotency-Key": "order-43"}
    ok = await api.http.post(
        "/v1/verifications",
        headers=headers,
        json={"service_id": api.service_id, "to": "+34600000001"},
    )
    assert ok.status_code == 201
    other = await api.http.post(
        "/v1/verifications",
        headers=headers,
        json={"service_id": api.service_id, "to": "+34600000002"},
    )
    assert_problem(other, 422, "idempotency_key_mismatch")
    await api.deliver()
    assert len(api.sender.sent) == 1


async def test_a_refused_request_frees_its_key(api: Api) -> None:
    headers = {**api.auth(), "Idempotency-Key": "order-44"}
    body = {"service_id": api.service_id, "to": "+34600000001"}
    first = await api.http.post("/v1/verifications", json=body, headers=headers)
    assert first.status_code == 201
    # A resend attempt under a new key is refused (too soon) and can be retried later.
    retry_headers = {**api.auth(), "Idempotency-Key": "order-45"}
    refused = await api.http.post("/v1/verifications", json=body, headers=retry_headers)
    assert_problem(refused, 429, "resend_too_soon")
    api.clock.advance(30)
    later = await api.http.post("/v1/verifications", json=body, headers=retry_headers)
    assert later.status_code == 200 and later.json()["send_attempts"] == 2


async def test_a_retry_while_the_first_runs_is_409_and_the_first_still_wins(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first request is held inside its action (after it reserved the key) until the test
    # lets it go, so the retries meet it in progress, whatever the backend's speed.
    gate, entered = asyncio.Event(), asyncio.Event()
    start = api.container.verifications.start

    async def held_start(*args: object, **kwargs: object) -> object:
        entered.set()
        await gate.wait()
        return await start(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(api.container.verifications, "start", held_start)
    headers = {**api.auth(), "Idempotency-Key": "order-46"}
    body = {"service_id": api.service_id, "to": "+34600000001"}
    first = asyncio.create_task(api.http.post("/v1/verifications", json=body, headers=headers))
    await entered.wait()
    retry = await api.http.post("/v1/verifications", json=body, headers=headers)
    assert_problem(retry, 409, "idempotency_in_progress")
    assert retry.headers["Retry-After"] == "1"
    other = await api.http.post(
        "/v1/verifications", json={**body, "to": "+34600000002"}, headers=headers
    )
    assert_problem(other, 422, "idempotency_key_mismatch")
    gate.set()
    assert (await first).status_code == 201
    replay = await api.http.post("/v1/verifications", json=body, headers=headers)
    assert replay.status_code == 201 and replay.json() == (await first).json()
    await api.deliver()
    assert len(api.sender.sent) == 1


async def test_idempotency_keys_are_scoped_per_account(api: Api) -> None:
    other = await api.http.post("/v1/accounts", json={"name": "Other"}, headers=api.auth())
    assert other.status_code == 201
    issued = await api.http.post(
        "/v1/keys", json={"name": "k", "account_id": other.json()["id"]}, headers=api.auth()
    )
    other_auth = {"Authorization": f"Bearer {issued.json()['key']}"}
    other_service = await api.http.post("/v1/services", json={"name": "B"}, headers=other_auth)
    key = {"Idempotency-Key": "shared-key"}
    mine = await api.http.post(
        "/v1/verifications",
        json={"service_id": api.service_id, "to": "+34600000001"},
        headers={**api.auth(), **key},
    )
    theirs = await api.http.post(
        "/v1/verifications",
        json={"service_id": other_service.json()["id"], "to": "+34600000001"},
        headers={**other_auth, **key},
    )
    # The same key in another account is another key: no mismatch, no replay of mine.
    assert mine.status_code == theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs.headers
    assert mine.json()["id"] != theirs.json()["id"]
    # Within one account the key stays bound to its first request, on any endpoint.
    services = await api.http.post(
        "/v1/services", json={"name": "Same"}, headers={**api.auth(), **key}
    )
    assert_problem(services, 422, "idempotency_key_mismatch")
    await api.deliver()
    assert sorted(s.to for s in api.sender.sent) == ["+34600000001", "+34600000001"]


async def test_an_idempotency_key_is_validated(api: Api) -> None:
    too_long = {**api.auth(), "Idempotency-Key": "k" * 256}
    response = await api.http.post("/v1/services", json={"name": "X"}, headers=too_long)
    assert_problem(response, 400, "invalid_request", "Idempotency-Key")


async def test_idempotent_keys_expire_after_a_day(api: Api) -> None:
    headers = {**api.auth(), "Idempotency-Key": "svc-1"}
    first = await api.http.post("/v1/services", json={"name": "X"}, headers=headers)
    api.clock.advance(86_400)
    second = await api.http.post("/v1/services", json={"name": "X"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]


# --- services (API.md §3) ---------------------------------------------------------------------


async def test_service_crud(api: Api) -> None:
    created = await api.http.post(
        "/v1/services",
        headers=api.auth(),
        json={
            "name": "Shop",
            "code_length": 8,
            "ttl_seconds": 300,
            "allowed_countries": ["es", "CO"],
            "sender_id": "SHOP",
            "default_locale": "es",
            "webotp_domain": "shop.example",
            "templates": {"en": "{brand}: {code} is your code"},
        },
    )
    assert created.status_code == 201, created.text
    service = created.json()
    assert service["allowed_countries"] == ["CO", "ES"]
    assert service["code_type"] == "numeric" and service["max_check_attempts"] == 5
    sid = service["id"]
    patched = await api.http.patch(
        f"/v1/services/{sid}", json={"ttl_seconds": 120, "sender_id": None}, headers=api.auth()
    )
    assert patched.status_code == 200
    assert patched.json()["ttl_seconds"] == 120 and patched.json()["sender_id"] is None
    assert patched.json()["code_length"] == 8
    listed = (await api.http.get("/v1/services", headers=api.auth())).json()["data"]
    assert sid in [s["id"] for s in listed]
    assert (await api.http.delete(f"/v1/services/{sid}", headers=api.auth())).status_code == 204
    assert_problem(await api.http.get(f"/v1/services/{sid}", headers=api.auth()), 404, "not_found")


async def test_deleting_a_service_cancels_its_pending_verifications(api: Api) -> None:
    vid = (await api.start()).json()["id"]
    await api.http.delete(f"/v1/services/{api.service_id}", headers=api.auth())
    status = await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())
    assert status.json()["status"] == "canceled"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 41}, "name"),
        ({"name": "A", "code_length": 3}, "code_length"),
        ({"name": "A", "code_length": 11}, "code_length"),
        ({"name": "A", "code_length": True}, "code_length"),
        ({"name": "A", "code_type": "hex"}, "code_type"),
        ({"name": "A", "ttl_seconds": 59}, "ttl_seconds"),
        ({"name": "A", "ttl_seconds": 86_401}, "ttl_seconds"),
        ({"name": "A", "max_check_attempts": 0}, "max_check_attempts"),
        ({"name": "A", "max_check_attempts": 21}, "max_check_attempts"),
        ({"name": "A", "max_send_attempts": 11}, "max_send_attempts"),
        ({"name": "A", "resend_interval_seconds": -1}, "resend_interval_seconds"),
        ({"name": "A", "channels": []}, "channels"),
        ({"name": "A", "channels": ["sms", "sms"]}, "channels"),
        ({"name": "A", "channels": ["pigeon"]}, "channels"),
        ({"name": "A", "allowed_countries": ["ESP"]}, "allowed_countries"),
        ({"name": "A", "sender_id": "TOO LONG SENDER"}, "sender_id"),
        ({"name": "A", "templates": {"en": "no code here"}}, "templates"),
        ({"name": "A", "templates": {"en": "{code} " + "x" * 160}}, "templates"),
        ({"name": "A", "templates": {"en": "{code} {unknown}"}}, "templates"),
        ({"name": "A", "templates": {"en.transaction": "{code} ok"}}, "templates"),
        ({"name": "A", "templates": {"Not A Locale": "{code}"}}, "templates"),
        ({"name": "A", "default_locale": "english"}, "default_locale"),
        ({"name": "A", "webotp_domain": "https://shop.example"}, "webotp_domain"),
        ({"name": "A", "webotp_domain": "a" * 60 + ".example" * 7}, "webotp_domain"),
        ({"name": "A", "android_app_hash": "short"}, "android_app_hash"),
        ({"name": "A", "webhook_url": "ftp://x"}, "webhook_url"),
        ({"name": "A", "colour": "red"}, "colour"),
    ],
)
async def test_invalid_service_fields(api: Api, body: dict[str, object], param: str) -> None:
    before = (await api.http.get("/v1/services", headers=api.auth())).json()["data"]
    response = await api.http.post("/v1/services", json=body, headers=api.auth())
    assert_problem(response, 400, "invalid_request", param)
    after = (await api.http.get("/v1/services", headers=api.auth())).json()["data"]
    assert after == before


async def test_invalid_patch_changes_nothing(api: Api) -> None:
    before = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    response = await api.http.patch(
        f"/v1/services/{api.service_id}",
        json={"ttl_seconds": 120, "code_length": 99},
        headers=api.auth(),
    )
    assert_problem(response, 400, "invalid_request", "code_length")
    after = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    assert after == before


async def test_service_policy_shapes_the_message(api: Api) -> None:
    sid = await api.new_service(
        name="Shop", webotp_domain="shop.example", code_length=8, sender_id="SHOP", ttl_seconds=300
    )
    await api.http.post(
        "/v1/verifications", headers=api.auth(), json={"service_id": sid, "to": "+34600000001"}
    )
    await api.deliver()
    sms = api.sender.sent[-1]
    code = sms.text.rsplit("#", 1)[1]
    assert len(code) == 8 and code.isdigit()
    assert sms.text.splitlines()[-1] == f"@shop.example #{code}"
    assert "Shop" in sms.text and "5 min" in sms.text
    assert sms.sms is not None and sms.sms.sender_id == "SHOP"


# --- operations --------------------------------------------------------------------------------


async def test_health_readiness_metrics_openapi(api: Api) -> None:
    assert (await api.http.get("/healthz")).json() == {"status": "ok"}
    assert (await api.http.get("/readyz")).json() == {"status": "ready"}
    await api.start()
    metrics = await api.http.get("/metrics")
    assert metrics.status_code == 200
    assert 'otpgate_verification_started_total{channel="sms"} 1.0' in metrics.text
    spec = (await api.http.get("/openapi.json")).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer" and schemes["basic"]["scheme"] == "basic"
    assert spec["paths"]["/v1/verifications"]["post"]["security"] == [{"bearer": []}, {"basic": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    for path in (
        "/v1/verifications",
        "/v1/verifications/{verification_id}/check",
        "/v1/verifications/check",
        "/v1/services",
        "/v1/keys",
    ):
        assert path in spec["paths"]
    docs = await api.http.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    page = await api.http.get("/errors/resend_too_soon")
    assert page.status_code == 200 and "429" in page.text
    assert (await api.http.get("/healthz")).headers["x-request-id"].startswith("req_")


async def test_storage_outage_fails_fast_with_503(tmp_path: Path) -> None:
    # Nothing listens on port 1 of loopback: a database that is down.
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        secret_key=TEST_SECRET,
        database_url="postgresql://postgres@127.0.0.1:1/test",
    )
    container = build(settings, sender=RecordingSender())
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            ready = await http.get("/readyz")
            assert_problem(ready, 503, "unavailable")
            assert ready.json()["retry_after"] == 1 and ready.headers["Retry-After"] == "1"
            start = await http.post(
                "/v1/verifications",
                json={"service_id": "svc_x", "to": "+34600000001"},
                headers={"Authorization": "Bearer otpgate_abc"},
            )
            assert_problem(start, 503, "unavailable")
            assert "Traceback" not in start.text
            assert (await http.get("/healthz")).status_code == 200


async def test_a_key_left_in_progress_by_a_dead_process_is_taken_over(api: Api) -> None:
    storage = api.container.storage
    assert await storage.begin(api.account_id, "crashed", "hash-a", api.clock.now()) == (
        "new",
        None,
        None,
    )
    with pytest.raises(IdempotencyInProgress):
        await storage.begin(api.account_id, "crashed", "hash-a", api.clock.now())
    api.clock.advance(301)  # the request's process died without finishing or abandoning
    assert await storage.begin(api.account_id, "crashed", "hash-a", api.clock.now()) == (
        "new",
        None,
        None,
    )
    api.clock.advance(86_400)
    assert await storage.forget_idempotency_keys(api.clock.now()) == 1
