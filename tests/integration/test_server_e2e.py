"""otpgate as a user runs it: ``otpgate serve`` in its own process on SQLite, sending through
the LabsMobile provider to a loopback stub of LabsMobile's documented JSON API, driven over real
HTTP. Afterwards neither the database files nor the server's output hold the code (S2, S18).
The CLI against such a server is tested in ``test_cli.py``."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import code_in
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import Server, running_server


@pytest.fixture
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="ops@example.com") as running:
        yield running


@pytest.fixture
def server(stub: LabsMobileStub, tmp_path: Path) -> Iterator[Server]:
    with running_server(stub, tmp_path) as running:
        yield running


def test_full_flow_through_labsmobile(server: Server, stub: LabsMobileStub) -> None:
    auth = {"Authorization": f"Bearer {server.key}"}
    with httpx.Client(base_url=server.url, headers=auth, timeout=10) as http:
        started = http.post(
            "/v1/verifications", json={"service_id": server.service_id, "to": "+34600000001"}
        )
        assert started.status_code == 201, started.text
        vid = started.json()["id"]
        (request,) = stub.wait_for_messages(1, timeout=10)

        # The stub received the request exactly as LabsMobile documents it.
        assert request.method == "POST" and request.path == "/json/send"
        expected = base64.b64encode(f"{stub.username}:{stub.token}".encode()).decode()
        assert request.headers["authorization"] == f"Basic {expected}"
        assert request.headers["content-type"].startswith("application/json")
        body = request.body
        assert body["recipient"] == [{"msisdn": "34600000001"}]
        message_id = started.json()["messages"][0]["id"]
        assert body["subid"] == message_id.removeprefix("msg_")[:20]
        assert "tpoa" not in body  # no sender_id: the account default applies
        assert body["ackurl"].startswith(f"{server.url}/v1/receipts/labsmobile?token=")
        code = code_in(body["message"])
        assert re.fullmatch(r"\d{6}", code)

        wrong = code[:-1] + str((int(code[-1]) + 1) % 10)
        first = http.post(f"/v1/verifications/{vid}/check", json={"code": wrong}).json()
        assert first == {"id": vid, "status": "pending", "valid": False, "remaining_attempts": 4}
        right = http.post(f"/v1/verifications/{vid}/check", json={"code": code}).json()
        assert right["valid"] is True and right["status"] == "approved"
        again = http.post(f"/v1/verifications/{vid}/check", json={"code": code}).json()
        assert again["valid"] is False

        # A new verification's code fails on another verification.
        other = http.post(
            "/v1/verifications", json={"service_id": server.service_id, "to": "+34600000002"}
        ).json()
        stub.wait_for_messages(2, timeout=10)
        other_code = code_in(stub.messages[1].body["message"])
        third = http.post(
            "/v1/verifications", json={"service_id": server.service_id, "to": "+34600000003"}
        ).json()
        stub.wait_for_messages(3, timeout=10)
        if other_code != code_in(stub.messages[2].body["message"]):
            refused = http.post(
                f"/v1/verifications/{third['id']}/check", json={"code": other_code}
            ).json()
            assert refused["valid"] is False
        assert (
            http.post(f"/v1/verifications/{other['id']}/check", json={"code": other_code}).json()[
                "valid"
            ]
            is True
        )

        # A delivery report without the receipt token is refused and changes nothing; with it,
        # the message becomes delivered.
        bare = httpx.get(
            f"{server.url}/v1/receipts/labsmobile",
            params={"subid": body["subid"], "desc": "DELIVRD", "token": "forged"},
        )
        assert bare.status_code == 403
        status = http.get(f"/v1/verifications/{vid}").json()
        assert status["messages"][0]["status"] == "sent"
        assert stub.deliver_report(body["subid"], "DELIVRD").status_code == 200
        status = http.get(f"/v1/verifications/{vid}").json()
        assert status["messages"][0]["status"] == "delivered"
        ackurl = httpx.URL(stub.report_params(body["subid"], "DELIVRD")[0])
        unknown = ackurl.copy_merge_params({"subid": "ffffffffffffffffffff", "desc": "UNDELIV"})
        ignored = httpx.get(unknown)
        assert ignored.status_code == 200

    # Nothing at rest or in the logs holds a code (S2, S18).
    server.process.terminate()
    server.process.wait(timeout=15)
    files = [p for p in server.data_dir.iterdir() if p.name.startswith("otpgate.db")]
    assert files
    for used in (code, other_code):
        for path in files:
            assert used.encode() not in path.read_bytes(), f"code found in {path.name}"
        assert used.encode() not in server.output()
    assert server.key.encode() not in server.stdout_path.read_bytes()
    assert stub.token.encode() not in server.output()
    # Logs are structured and mask destinations.
    lines = [
        json.loads(line)
        for line in server.stderr_path.read_text().splitlines()
        if line.startswith("{")
    ]
    assert any(line.get("to") == "+34******001" for line in lines)
    assert b"+34600000001" not in server.output()


def test_same_idempotency_key_twice_causes_one_sms(server: Server, stub: LabsMobileStub) -> None:
    headers = {"Authorization": f"Bearer {server.key}", "Idempotency-Key": "signup-7"}
    body = {"service_id": server.service_id, "to": "+34600000004"}
    first = httpx.post(f"{server.url}/v1/verifications", json=body, headers=headers)
    second = httpx.post(f"{server.url}/v1/verifications", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    stub.wait_for_messages(1, timeout=10)
    # No sleep for a second send that should not come: once the one message is recorded as
    # sent, nothing of this verification is left queued, so nothing more can be sent.
    url = f"{server.url}/v1/verifications/{first.json()['id']}"
    auth = {"Authorization": f"Bearer {server.key}"}
    deadline = time.monotonic() + 10
    while (body := httpx.get(url, headers=auth).json())["messages"][0]["status"] == "queued":
        assert time.monotonic() < deadline, body
        time.sleep(0.02)  # the next look at the condition, not a guess at a duration
    assert [m["status"] for m in body["messages"]] == ["sent"]
    assert body["send_attempts"] == 1
    assert len(stub.requests) == len(stub.messages) == 1


def test_basic_auth_with_the_account_username(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/account", auth=(server.username, server.key))
    assert response.status_code == 200
