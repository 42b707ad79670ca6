"""otpgate as a user runs it: ``otpgate serve`` in its own process on SQLite, sending through
the LabsMobile provider to a loopback stub of LabsMobile's documented JSON API, driven over real
HTTP, with the CLI for set-up and as a client. Afterwards neither the database files nor the
server's output hold the code (S2, S18)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import code_in
from tests.support.labsmobile_stub import LabsMobileStub

OTPGATE = str(Path(sys.executable).with_name("otpgate"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    env: dict[str, str]
    data_dir: Path
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    key: str
    username: str
    service_id: str

    def output(self) -> bytes:
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def cli(self, *args: str, extra_env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [OTPGATE, *args],
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode()


@pytest.fixture
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="ops@example.com") as running:
        yield running


@pytest.fixture
def server(stub: LabsMobileStub, tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "var"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "OTPGATE_DATA_DIR": str(data_dir),
        "OTPGATE_SMS_PROVIDER": "labsmobile",
        "OTPGATE_LABSMOBILE_URL": stub.url,
        "OTPGATE_LABSMOBILE_USERNAME": stub.username,
        "OTPGATE_LABSMOBILE_TOKEN": stub.token,
        "OTPGATE_PUBLIC_URL": url,
        "OTPGATE_LOG_LEVEL": "DEBUG",
    }
    stdout_path, stderr_path = tmp_path / "stdout.log", tmp_path / "stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [OTPGATE, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "server did not answer /healthz"
            time.sleep(0.1)
        banner = stderr_path.read_text()
        key = re.search(r"otpgate_[A-Za-z0-9_-]{43}", banner)
        assert key, banner
        account = httpx.get(
            f"{url}/v1/account", headers={"Authorization": f"Bearer {key.group(0)}"}
        ).json()
        service = httpx.post(
            f"{url}/v1/services",
            json={"name": "Acme"},
            headers={"Authorization": f"Bearer {key.group(0)}"},
        ).json()
        yield Server(
            url,
            env,
            data_dir,
            process,
            stdout_path,
            stderr_path,
            key.group(0),
            account["username"],
            service["id"],
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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


def test_cli_admin_and_client_commands(server: Server, stub: LabsMobileStub) -> None:
    account = json.loads(
        server.cli(
            "accounts", "create", "--name", "Shop", "--username", "shop@example.com", "--json"
        )
    )
    assert set(account) == {"id", "name", "username"}
    assert account["username"] == "shop@example.com"
    key = json.loads(
        server.cli("keys", "create", "--name", "ci", "--account", account["id"], "--json")
    )
    assert set(key) == {"id", "key", "account_id"} and key["account_id"] == account["id"]
    default_key = json.loads(server.cli("keys", "create", "--name", "ops", "--json"))
    me = httpx.get(
        f"{server.url}/v1/account", headers={"Authorization": f"Bearer {default_key['key']}"}
    ).json()
    assert default_key["account_id"] == me["id"] and me["is_admin"] is True
    service = json.loads(
        server.cli(
            "services",
            "create",
            "--name",
            "Shop",
            "--account",
            account["id"],
            "--code-length",
            "8",
            "--json",
        )
    )
    assert service["code_length"] == 8

    client_env = {"OTPGATE_URL": server.url, "OTPGATE_API_KEY": key["key"]}
    started = json.loads(
        server.cli(
            "verify",
            "start",
            "--service",
            service["id"],
            "--to",
            "+34600000005",
            extra_env=client_env,
        )
    )
    assert started["status"] == "pending"
    stub.wait_for_messages(1, timeout=10)
    code = code_in(stub.messages[-1].body["message"])
    checked = json.loads(
        server.cli("verify", "check", "--id", started["id"], "--code", code, extra_env=client_env)
    )
    assert checked["valid"] is True
    status = json.loads(server.cli("verify", "status", "--id", started["id"], extra_env=client_env))
    assert status["status"] == "approved"
    refused = subprocess.run(
        [OTPGATE, "verify", "start", "--service", service["id"], "--to", "+34910000000"],
        env={**server.env, **client_env},
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == 1
    assert b"unsupported_number_type" in refused.stderr
