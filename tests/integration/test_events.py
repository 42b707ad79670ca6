"""Events to a service's webhook and the audit log, on every backend, through the real app.

The webhook receiver is a real aiohttp server on loopback; deliveries go through the real
outbound adapter, and every signature is checked with the ``standardwebhooks`` library (whose
check also refuses timestamps more than five minutes from the real time, so these tests set
the frozen clock to now).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from sqlalchemy import text
from standardwebhooks import Webhook

from otpgate.domain.model import MessageStatus, Principal
from otpgate.domain.ports import DeliveryReport
from tests.conftest import Api, Database, make_settings, serving
from tests.support.server import free_port


class Receiver:
    """An integrator's webhook endpoint on loopback."""

    def __init__(self) -> None:
        self.posts: list[tuple[bytes, dict[str, str]]] = []
        self.failing = 0  # answer 500 to this many posts first
        self._runner: web.AppRunner | None = None
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token=integrator-token"

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append((await request.read(), dict(request.headers)))
        if self.failing:
            self.failing -= 1
            return web.Response(status=500)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    await hook.start()
    yield hook
    await hook.stop()


async def hooked_service(api: Api, url: str) -> tuple[str, str]:
    """A service with a webhook: its id and its signing secret."""
    api.clock.current = datetime.now(UTC).replace(microsecond=0)
    response = await api.http.post(
        "/v1/services", json={"name": "Hooked", "webhook_url": url}, headers=api.auth()
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["webhook_secret"].startswith("whsec_")
    return body["id"], body["webhook_secret"]


async def started(api: Api, service_id: str, to: str) -> tuple[str, str]:
    """Start a verification and deliver its code: its id and the code."""
    response = await api.http.post(
        "/v1/verifications", json={"service_id": service_id, "to": to}, headers=api.auth()
    )
    assert response.status_code == 201, response.text
    await api.deliver()
    return response.json()["id"], api.sender.codes_to(to)[-1]


async def event_rows(database: Database) -> list[tuple[str, str]]:
    async with database.sql() as conn:
        rows = await conn.execute(text("SELECT type, status FROM events ORDER BY created_at"))
        return [(r[0], r[1]) for r in rows]


async def test_events_are_signed_delivered_and_listed(api: Api, receiver: Receiver) -> None:
    service_id, secret = await hooked_service(api, receiver.url)
    approved_id, code = await started(api, service_id, "+34600000101")
    failing_id, other_code = await started(api, service_id, "+34600000102")
    # Approved with the right code; the other exhausts its five attempts with wrong ones.
    answer = await api.check(approved_id, code)
    assert answer.json()["valid"] is True
    wrong = "000000" if other_code != "000000" else "111111"
    for _ in range(5):
        await api.check(failing_id, wrong)
    # The provider reports the first message delivered (through the real receipt service).
    (message,) = (m for m in api.sender.sent if m.to == "+34600000101")
    assert await api.container.receipts.record(
        "recording", DeliveryReport(message.message_id, MessageStatus.DELIVERED)
    )
    await api.container.event_sender.drain()

    documents = [Webhook(secret).verify(body, headers) for body, headers in receiver.posts]
    by_type = {d["type"]: d for d in documents}
    assert sorted(by_type) == [
        "message.delivered",
        "verification.approved",
        "verification.max_attempts_reached",
    ]
    assert by_type["verification.approved"]["data"] == {
        "verification_id": approved_id,
        "service_id": service_id,
        "channel": "sms",
        "status": "approved",
        "check_attempts": 0,
    }
    assert by_type["verification.max_attempts_reached"]["data"]["verification_id"] == failing_id
    delivered = by_type["message.delivered"]["data"]
    assert delivered["message_id"] == message.message_id
    assert delivered["verification_id"] == approved_id and delivered["status"] == "delivered"
    # No code, no message text, no number in any payload.
    for body, headers in receiver.posts:
        assert headers["webhook-signature"].startswith("v1,")
        assert headers["webhook-id"].startswith("evt_")
        for secret_text in (code, other_code, "600000101", "600000102", message.text[:20]):
            assert secret_text.encode() not in body

    listed = await api.http.get("/v1/events", headers=api.auth())
    assert listed.status_code == 200
    events = listed.json()["data"]
    assert {e["id"] for e in events} == {h["webhook-id"] for _, h in receiver.posts}
    assert all(e["status"] == "delivered" and e["attempts"] == 1 for e in events)
    assert all(e["delivered_at"] and e["last_error"] is None for e in events)
    assert "whsec_" not in listed.text and secret.removeprefix("whsec_") not in listed.text
    only = await api.http.get(
        "/v1/events", params={"type": "message.delivered", "limit": 1}, headers=api.auth()
    )
    assert [e["type"] for e in only.json()["data"]] == ["message.delivered"]


async def test_a_failed_delivery_is_retried_with_the_same_webhook_id(
    api: Api, receiver: Receiver
) -> None:
    service_id, secret = await hooked_service(api, receiver.url)
    verification_id, code = await started(api, service_id, "+34600000201")
    await api.check(verification_id, code)
    receiver.failing = 1
    assert await api.container.event_sender.send_due() == 1
    (event,) = (await api.http.get("/v1/events", headers=api.auth())).json()["data"]
    assert (event["status"], event["attempts"]) == ("pending", 1)
    assert "HTTP 500" in event["last_error"]
    assert await api.container.event_sender.send_due() == 0  # not before its backoff
    api.clock.advance(7)  # past the first backoff: 5 s and up to 25 % jitter
    assert await api.container.event_sender.send_due() == 1
    first, second = receiver.posts
    assert first[1]["webhook-id"] == second[1]["webhook-id"] == event["id"]
    assert first[0] == second[0]  # the same body
    assert int(second[1]["webhook-timestamp"]) > int(first[1]["webhook-timestamp"])
    Webhook(secret).verify(second[0], second[1])
    (event,) = (await api.http.get("/v1/events", headers=api.auth())).json()["data"]
    assert (event["status"], event["attempts"]) == ("delivered", 2)
    api.clock.advance(3600)
    assert await api.container.event_sender.send_due() == 0


async def test_a_rotated_secret_signs_from_then_on(api: Api, receiver: Receiver) -> None:
    service_id, old = await hooked_service(api, receiver.url)
    rotated = await api.http.post(f"/v1/services/{service_id}/webhook-secret", headers=api.auth())
    assert rotated.status_code == 200
    new = rotated.json()["webhook_secret"]
    assert new != old and new.startswith("whsec_")
    verification_id, code = await started(api, service_id, "+34600000301")
    await api.check(verification_id, code)
    await api.container.event_sender.drain()
    ((body, headers),) = receiver.posts
    Webhook(new).verify(body, headers)
    with pytest.raises(Exception, match="signature"):
        Webhook(old).verify(body, headers)


async def test_a_service_without_a_webhook_emits_nothing(api: Api) -> None:
    verification_id, code = await started(api, api.service_id, "+34600000401")
    assert (await api.check(verification_id, code)).json()["valid"] is True
    assert await event_rows(api.database) == []


async def test_a_forbidden_address_is_never_called(
    database: Database, tmp_path: Path, receiver: Receiver
) -> None:
    """In production loopback is refused: the hook on loopback is never called, and the event
    is given up at once with the reason."""
    settings = make_settings(database, tmp_path, env="production")
    async with serving(settings, database) as api:
        service_id, _ = await hooked_service(api, receiver.url)
        verification_id, code = await started(api, service_id, "+34600000501")
        await api.check(verification_id, code)
        assert await api.container.event_sender.send_due() == 1
        api.clock.advance(86_400)
        assert await api.container.event_sender.send_due() == 0
        (event,) = (await api.http.get("/v1/events", headers=api.auth())).json()["data"]
    assert receiver.posts == []
    assert event["status"] == "failed" and "loopback" in event["last_error"]
    assert "integrator-token" not in event["last_error"]


# --- the audit log ---------------------------------------------------------------------------


async def audit(api: Api, key: str | None = None, **params: Any) -> list[dict[str, Any]]:
    response = await api.http.get("/v1/audit", params=params, headers=api.auth(key))
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["data"]
    return entries


async def test_security_actions_are_audited_with_before_and_after(
    database: Database, tmp_path: Path
) -> None:
    settings = make_settings(database, tmp_path, lockout_threshold=3)
    async with serving(settings, database) as api:

        def later() -> None:  # entries of one second would list in id order
            api.clock.advance(1)

        admin_key_id = (await api.http.get("/v1/keys", headers=api.auth())).json()["data"][0]["id"]
        later()
        created = await api.http.post("/v1/keys", json={"name": "ci"}, headers=api.auth())
        key_id = created.json()["id"]
        later()
        assert (await api.http.delete(f"/v1/keys/{key_id}", headers=api.auth())).status_code == 204
        later()
        changed = await api.http.patch(
            f"/v1/services/{api.service_id}",
            json={"code_length": 8, "webhook_url": "https://hooks.example/p?token=s3cr3t"},
            headers=api.auth(),
        )
        assert changed.status_code == 200
        later()
        await api.http.post(f"/v1/services/{api.service_id}/webhook-secret", headers=api.auth())
        later()
        # Three wrong codes lock the destination; the operator clears it.
        verification_id, code = await started(api, api.service_id, "+34600000601")
        wrong = "00000000" if code != "00000000" else "11111111"
        for _ in range(3):
            await api.check(verification_id, wrong)
        later()
        account = await api.container.access.get_account(api.account_id)
        await api.container.verifications.clear_lockout(
            Principal(account=account, key_id="cli"), api.service_id, "+34600000601"
        )
        later()
        assert (
            await api.http.delete(f"/v1/services/{api.service_id}", headers=api.auth())
        ).status_code == 204
        entries = await audit(api)
        by_action = {e["action"]: e for e in entries}
        assert [e["action"] for e in entries][:7] == [
            "service.deleted",
            "lockout.cleared",
            "lockout.imposed",
            "service.webhook_secret_rotated",
            "service.updated",
            "key.revoked",
            "key.created",
        ]
        # then the fixture's: its service, and the admin key made on the first start
        assert sorted(e["action"] for e in entries[7:]) == ["key.created", "service.created"]
        assert all(e["account_id"] == api.account_id for e in entries)
        by_action["key.created"] = entries[6]
        assert by_action["key.created"]["target"] == key_id
        assert by_action["key.created"]["actor"] == admin_key_id
        assert by_action["key.revoked"]["after"] == {"id": key_id, "revoked": True}
        updated = by_action["service.updated"]
        assert updated["target"] == api.service_id and updated["actor"] == admin_key_id
        assert updated["before"]["code_length"] == 6 and updated["after"]["code_length"] == 8
        assert updated["before"]["webhook_url"] is None
        assert updated["after"]["webhook_url"] == "https://hooks.example/…"  # no token kept
        imposed = by_action["lockout.imposed"]["after"]
        assert imposed["to"] == "+34******601" and imposed["consecutive_failures"] == 3
        cleared = by_action["lockout.cleared"]
        assert cleared["actor"] == "cli" and cleared["after"]["consecutive_failures"] == 0
        assert cleared["before"]["locked_until"] is not None
        assert by_action["service.deleted"]["after"] is None
        assert by_action["service.deleted"]["before"]["code_length"] == 8
        assert by_action["service.webhook_secret_rotated"]["after"] is None
        everything = json.dumps(entries)
        assert "s3cr3t" not in everything and "whsec_" not in everything
        assert "600000601" not in everything

        # Filters and pages.
        assert [e["action"] for e in await audit(api, action="key.revoked")] == ["key.revoked"]
        first = await api.http.get("/v1/audit", params={"limit": 3}, headers=api.auth())
        cursor = first.json()["next_cursor"]
        rest = await audit(api, cursor=cursor, limit=50)
        assert [e["id"] for e in first.json()["data"] + rest] == [e["id"] for e in entries]

        # Another (non-admin) account sees its own entries only.
        other = await api.container.access.create_account("Tenant")
        issued = await api.container.access.create_key(other.id, name="tenant")
        own = await audit(api, issued.secret)
        assert [(e["action"], e["actor"]) for e in own] == [("key.created", "cli")]
        assert own[0]["target"] == issued.key.id
        refused = await api.http.get(
            "/v1/audit", params={"account_id": api.account_id}, headers=api.auth(issued.secret)
        )
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("application/problem+json")
        # The admin sees every account's, or one account's.
        assert {e["account_id"] for e in await audit(api)} == {api.account_id, other.id}
        assert [e["action"] for e in await audit(api, account_id=other.id)] == ["key.created"]


async def test_the_audit_log_holds_no_fixed_code_or_full_number(
    database: Database, tmp_path: Path
) -> None:
    """Test numbers, their fixed codes and safe-listed numbers are settings too, but an audit
    entry never holds a code or a full number: numbers are masked, codes left out, and the rate
    limits shown as the API shows them."""
    async with serving(make_settings(database, tmp_path), database) as api:
        changed = await api.http.patch(
            f"/v1/services/{api.service_id}",
            json={
                "test_numbers": {"+34600000505": "918273"},
                "rate_limits": {"per_number": {"limit": 3, "window_seconds": 600}},
            },
            headers=api.auth(),
        )
        assert changed.status_code == 200, changed.text
        safe = await api.http.post(
            "/v1/safe-list", json={"number": "+34600000777"}, headers=api.auth()
        )
        assert safe.status_code == 201, safe.text
        removed = await api.http.delete(f"/v1/safe-list/{safe.json()['id']}", headers=api.auth())
        assert removed.status_code == 204, removed.text

        entries = await audit(api)
        everything = json.dumps(entries)
        for secret in ("918273", "600000505", "600000777"):
            assert secret not in everything
        updated = next(e for e in entries if e["action"] == "service.updated")
        assert updated["after"]["test_numbers"] == ["+34******505"]
        assert updated["before"]["test_numbers"] == []
        assert updated["after"]["rate_limits"]["per_number"] == {"limit": 3, "window_seconds": 600}
        assert updated["after"]["rate_limits"]["fail_open"] is False
        added = next(e for e in entries if e["action"] == "safe_list.added")
        assert added["after"]["value"] == "+34******777" and added["after"]["kind"] == "number"
        gone = next(e for e in entries if e["action"] == "safe_list.removed")
        assert gone["before"]["value"] == "+34******777"


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        ("/v1/events", {"type": "verification.nope"}, 400, "invalid_request"),
        ("/v1/events", {"limit": "0"}, 400, "invalid_request"),
        ("/v1/events", {"cursor": "not-a-cursor"}, 400, "invalid_request"),
        ("/v1/events", {"service_id": "x" * 65}, 400, "invalid_request"),
        ("/v1/audit", {"action": "drop table;"}, 400, "invalid_request"),
        ("/v1/audit", {"limit": "201"}, 400, "invalid_request"),
        ("/v1/audit", {"cursor": "AAAA"}, 400, "invalid_request"),
    ],
)
async def test_bad_parameters_are_refused_as_problems(
    api: Api, path: str, params: dict[str, str], status: int, code: str
) -> None:
    response = await api.http.get(path, params=params, headers=api.auth())
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == code


async def test_the_new_routes_need_a_key_and_a_real_service(api: Api) -> None:
    for method, path in (
        ("GET", "/v1/events"),
        ("GET", "/v1/audit"),
        ("POST", f"/v1/services/{api.service_id}/webhook-secret"),
    ):
        response = await api.http.request(method, path)
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    missing = await api.http.post("/v1/services/svc_nope/webhook-secret", headers=api.auth())
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    before = await audit(api)
    # the refusals changed nothing: the fixture's admin key and service only
    assert sorted(e["action"] for e in before) == ["key.created", "service.created"]
