"""The ``otpgate`` command as a user runs it: each command in its own process, the client
commands against a real ``otpgate serve`` (SQLite, LabsMobile provider pointed at a loopback
stub), the server-side commands on that server's own database.

What scripts rely on is asserted for every command: with ``--json`` standard output parses as
exactly one JSON document; the exit status is 0 (success), 1 (``verify check``: not valid),
2 (bad usage), 3 (refused, ``code: detail`` on stderr) or 4 (unreachable).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otpgate.bootstrap import build
from otpgate.client import OtpgateClient
from otpgate.domain.model import Principal
from otpgate.errors import (
    DestinationBlocked,
    InvalidPhoneNumber,
    InvalidRequest,
    NotFound,
    Unavailable,
)
from otpgate.services.verification import StartRequest
from tests.conftest import Database, FrozenClock, RecordingSender, code_in, make_settings
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import (
    KEY_PATTERN,
    OTPGATE,
    Server,
    free_port,
    run_otpgate,
    running_server,
)

LOCKOUT_THRESHOLD = 3


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="cli@example.com") as running:
        yield running


@pytest.fixture(scope="module")
def server(stub: LabsMobileStub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module; each test uses services and destinations of its own.
    Lookups are not cached, so what a server-side command changes is seen at once."""
    extra_env = {
        "OTPGATE_LOOKUP_CACHE_SECONDS": "0",
        "OTPGATE_LOCKOUT_THRESHOLD": str(LOCKOUT_THRESHOLD),
    }
    with running_server(stub, tmp_path_factory.mktemp("cli"), extra_env=extra_env) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_stub(stub: LabsMobileStub) -> None:
    stub.reset()


def document_of(done: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document on standard output, on one line (``json.loads`` refuses
    anything more)."""
    assert done.stdout.endswith("}\n") and done.stdout.count("\n") == 1, (done.stdout, done.stderr)
    return json.loads(done.stdout)


def ok(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return document_of(done)


def refused(done: subprocess.CompletedProcess[str], code: str) -> dict[str, Any]:
    """A refusal: exit status 3, ``code: detail`` on stderr and, with ``--json``, the problem
    document on stdout."""
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.startswith(f"{code}: "), done.stderr
    problem: dict[str, Any] = document_of(done)
    assert problem["code"] == code and problem["type"] == f"/errors/{code}"
    assert problem["detail"] in done.stderr
    return problem


def usage_error(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr


def new_service(server: Server, *options: str) -> dict[str, Any]:
    """A service made with ``services create``, without the webhook secret shown once."""
    service: dict[str, Any] = ok(
        server.run("services", "create", "--name", "Shop", *options, "--json")
    )
    assert service.pop("webhook_secret").startswith("whsec_")
    return service


def code_of(stub: LabsMobileStub, nth: int) -> str:
    """The code in the ``nth`` (1-based) message the stub accepted, once it has arrived."""
    return code_in(stub.wait_for_messages(nth, timeout=10)[nth - 1].body["message"])


def wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


# --- first start ------------------------------------------------------------------------------


def test_first_start_banner_shows_the_basic_username_and_a_basic_curl_line(server: Server) -> None:
    banner = server.stderr_path.read_text()
    assert f"API key:         {server.key}" in banner
    shown = re.search(r"Basic username:\s+(\S+)", banner)
    assert shown and shown.group(1) == server.username
    assert f"export OTPGATE_API_KEY={server.key}" in banner
    curl = re.search(r'curl -s -u "([^:"]+):\$OTPGATE_API_KEY" (\S+)', banner)
    assert curl, banner
    username, url = curl.groups()
    assert username == server.username and url == f"{server.url}/v1/account"
    # The line works as printed, once the key is in OTPGATE_API_KEY.
    answer = httpx.get(url, auth=(username, server.key))
    assert answer.status_code == 200 and answer.json()["username"] == server.username


def test_admin_command_on_a_fresh_database_shows_the_banner_on_stderr_only(
    tmp_path: Path,
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OTPGATE_DATA_DIR": str(tmp_path)}
    first = run_otpgate("accounts", "show", "--json", env=env)
    account = ok(first)
    assert account["is_admin"] is True and account["name"] == "default"
    key = KEY_PATTERN.search(first.stderr)
    assert key and re.search(rf"Basic username:\s+{account['username']}\b", first.stderr)
    assert "otpgate_" not in first.stdout
    assert f'curl -s -u "{account["username"]}:$OTPGATE_API_KEY"' in first.stderr

    again = run_otpgate("accounts", "show", "--json", env=env)
    assert ok(again) == account
    assert "otpgate_" not in again.stderr  # shown once
    keys = ok(run_otpgate("keys", "list", "--json", env=env))
    assert [k["name"] for k in keys["data"]] == ["admin"] and keys["next_cursor"] is None
    assert all("key" not in k for k in keys["data"])
    assert ok(run_otpgate("db", "upgrade", "--json", env=env)) == {"status": "up_to_date"}


# --- verify: the client commands ------------------------------------------------------------


def test_verify_start_status_and_check_with_json(server: Server, stub: LabsMobileStub) -> None:
    service = new_service(server)
    start = (
        "verify",
        "start",
        "--service",
        service["id"],
        "--to",
        "600 000 010",
        "--country",
        "ES",
        "--locale",
        "es",
        "--context",
        "amount=EUR 25",
        "--context",
        "payee=ACME",
        "--metadata",
        "order=42",
        "--idempotency-key",
        "signup-10",
        "--json",
    )
    started = ok(server.run(*start))
    assert started["to"] == "+34600000010" and started["status"] == "pending"
    assert started["service_id"] == service["id"]
    assert started["context"] == {"amount": "EUR 25", "payee": "ACME"}
    assert started["metadata"] == {"order": "42"}
    assert len(started["messages"]) == 1 and started["send_attempts"] == 1
    assert ok(server.run(*start))["id"] == started["id"]  # the same key, the same answer

    text = stub.wait_for_messages(1, timeout=10)[0].body["message"]
    assert "EUR 25" in text and "ACME" in text and text.startswith("Codigo")
    code = code_of(stub, 1)
    context = ("--context", "amount=EUR 25", "--context", "payee=ACME")
    check = ("verify", "check", "--id", started["id"], *context, "--json")

    not_valid = server.run(*check[:-1], "--code", wrong(code), "--json")
    assert not_valid.returncode == 1, not_valid.stderr
    assert document_of(not_valid) == {
        "id": started["id"],
        "status": "pending",
        "valid": False,
        "remaining_attempts": 4,
    }
    # The right code for another context is not valid either (the context is bound to it).
    other = server.run(
        "verify", "check", "--id", started["id"], "--code", code, "--context", "amount=EUR 99"
    )
    assert other.returncode == 1

    valid = server.run(*check, "--code", code)
    assert valid.returncode == 0, valid.stderr
    assert document_of(valid) == {
        "id": started["id"],
        "status": "approved",
        "valid": True,
        "remaining_attempts": 3,
    }
    status = ok(server.run("verify", "status", "--id", started["id"], "--json"))
    assert status["status"] == "approved" and status["check_attempts"] == 2
    assert status["metadata"] == {"order": "42"}


def test_verify_check_by_destination(server: Server, stub: LabsMobileStub) -> None:
    started = ok(
        server.run(
            "verify", "start", "--service", server.service_id, "--to", "+34600000011", "--json"
        )
    )
    code = code_of(stub, 1)
    by_destination = ("verify", "check", "--service", server.service_id, "--to", "+34 600 000 011")

    not_valid = server.run(*by_destination, "--code", wrong(code), "--json")
    assert not_valid.returncode == 1
    assert document_of(not_valid)["id"] == started["id"]
    assert document_of(not_valid)["valid"] is False

    valid = ok(server.run(*by_destination, "--code", code, "--json"))
    assert valid["id"] == started["id"] and valid["valid"] is True
    assert valid["status"] == "approved"

    nothing = server.run(
        "verify", "check", "--service", server.service_id, "--to", "+34600000099", "--code", code
    )
    assert nothing.returncode == 3 and nothing.stderr.startswith("not_found: ")


def test_verify_resend_and_cancel(server: Server, stub: LabsMobileStub) -> None:
    service = new_service(server, "--resend-interval-seconds", "0")
    started = ok(
        server.run("verify", "start", "--service", service["id"], "--to", "+34600000012", "--json")
    )
    resent = ok(server.run("verify", "resend", "--id", started["id"], "--json"))
    assert resent["id"] == started["id"] and resent["send_attempts"] == 2
    assert len(resent["messages"]) == 2
    assert code_of(stub, 1) == code_of(stub, 2)  # the same code, sent again

    canceled = ok(server.run("verify", "cancel", "--id", started["id"], "--json"))
    assert canceled["id"] == started["id"] and canceled["status"] == "canceled"
    # Cancelling again shows it unchanged; a canceled verification is not sent nor checked.
    assert ok(server.run("verify", "cancel", "--id", started["id"], "--json")) == canceled
    refused(server.run("verify", "resend", "--id", started["id"], "--json"), "invalid_request")
    late = server.run("verify", "check", "--id", started["id"], "--code", code_of(stub, 1))
    assert late.returncode == 1
    status = ok(server.run("verify", "status", "--id", started["id"], "--json"))
    assert status["status"] == "canceled" and status["send_attempts"] == 2


def test_verify_list_filters_and_pages(server: Server, stub: LabsMobileStub) -> None:
    service = new_service(server)
    numbers = ["+34600000013", "+34600000014", "+34600000015"]
    ids = [
        ok(server.run("verify", "start", "--service", service["id"], "--to", to, "--json"))["id"]
        for to in numbers
    ]
    ok(server.run("verify", "cancel", "--id", ids[1], "--json"))

    def listed(*options: str) -> dict[str, Any]:
        page: dict[str, Any] = ok(
            server.run("verify", "list", "--service", service["id"], *options, "--json")
        )
        return page

    everything = listed()
    assert [v["id"] for v in everything["data"]] == ids[::-1]  # newest first
    assert everything["next_cursor"] is None
    assert [v["id"] for v in listed("--status", "canceled")["data"]] == [ids[1]]
    assert [v["id"] for v in listed("--status", "pending")["data"]] == [ids[2], ids[0]]
    assert [v["id"] for v in listed("--to", "+34 600 000 013")["data"]] == [ids[0]]

    first = listed("--limit", "2")
    assert [v["id"] for v in first["data"]] == [ids[2], ids[1]] and first["next_cursor"]
    rest = listed("--limit", "2", "--cursor", first["next_cursor"])
    assert [v["id"] for v in rest["data"]] == [ids[0]] and rest["next_cursor"] is None

    refused(server.run("verify", "list", "--status", "lost", "--json"), "invalid_request")
    refused(server.run("verify", "list", "--cursor", "forged", "--json"), "invalid_request")
    usage_error(server.run("verify", "list", "--limit", "0", "--json"))


def test_human_output(server: Server, stub: LabsMobileStub) -> None:
    started = server.run("verify", "start", "--service", server.service_id, "--to", "+34600000016")
    assert started.returncode == 0, started.stderr
    match = re.search(r"verification (ver_[0-9a-f]{32})", started.stdout)
    assert match, started.stdout
    vid = match.group(1)
    assert re.search(r"status\s+pending", started.stdout)
    assert re.search(r"to\s+\+34600000016", started.stdout)
    assert started.stdout.lstrip()[0] != "{"

    code = code_of(stub, 1)
    not_valid = server.run("verify", "check", "--id", vid, "--code", wrong(code))
    assert not_valid.returncode == 1
    assert not_valid.stdout.strip() == (
        f"not valid: verification {vid} is pending, 4 check attempt(s) left"
    )
    valid = server.run("verify", "check", "--id", vid, "--code", code)
    assert valid.returncode == 0
    assert valid.stdout.strip() == f"valid: verification {vid} is approved"

    table = server.cli("verify", "list", "--to", "+34600000016")
    row = next(line for line in table.splitlines() if vid in line)
    assert "approved" in row and "+34600000016" in row and server.service_id in row
    services = server.cli("services", "list")
    assert any(server.service_id in line and "Acme" in line for line in services.splitlines())
    missing = server.run("verify", "status", "--id", "ver_missing")
    assert missing.returncode == 3 and missing.stdout == ""
    assert missing.stderr.strip() == "not_found: no such verification"


def test_client_exit_codes(server: Server) -> None:
    unknown = server.run("verify", "status", "--id", "ver_missing", "--json")
    problem = refused(unknown, "not_found")
    assert problem["status"] == 404

    usage_error(server.run("verify", "status", "--id", "x", extra_env={"OTPGATE_API_KEY": ""}))
    assert (
        "OTPGATE_API_KEY"
        in server.run("verify", "status", "--id", "x", extra_env={"OTPGATE_API_KEY": ""}).stderr
    )
    refused(
        server.run(
            "verify", "status", "--id", "x", "--json", extra_env={"OTPGATE_API_KEY": "otpgate_x"}
        ),
        "unauthorized",
    )
    usage_error(server.run("verify", "check", "--id", "ver_x", "--json"))  # no --code
    usage_error(server.run("verify", "check", "--code", "123456", "--json"))  # no target
    usage_error(
        server.run(
            "verify", "check", "--id", "ver_x", "--service", "svc_x", "--to", "+34600000017",
            "--code", "123456", "--json",
        )
    )  # fmt: skip
    usage_error(server.run("verify", "check", "--service", "svc_x", "--code", "1", "--json"))
    usage_error(server.run("verify", "--url", "ftp://example", "status", "--id", "x"))
    usage_error(server.run("verify", "stop", "--id", "x"))

    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = server.run(
        "verify", "status", "--id", "x", "--json", extra_env={"OTPGATE_URL": closed}
    )
    assert unreachable.returncode == 4
    assert unreachable.stderr.startswith(f"unavailable: cannot reach otpgate at {closed}")
    assert document_of(unreachable)["code"] == "unavailable"


def test_bad_input_is_refused_and_changes_nothing(server: Server) -> None:
    service = new_service(server)
    start = ("verify", "start", "--service", service["id"], "--json", "--to")
    assert refused(server.run(*start, "12345"), "invalid_phone_number")["param"] == "to"
    refused(server.run(*start, "+34910000000"), "unsupported_number_type")  # a landline
    unknown = server.run(
        "verify", "start", "--service", "svc_nope", "--to", "+34600000018", "--json"
    )
    assert refused(unknown, "not_found")["param"] == "service_id"
    assert (
        refused(server.run(*start, "+34600000018", "--context", "colour=red"), "invalid_request")[
            "param"
        ]
        == "context.colour"
    )
    usage_error(server.run(*start, "+34600000018", "--context", "amount"))
    usage_error(server.run(*start, "+34600000018", "--metadata", "=1"))
    usage_error(
        server.run(*start, "+34600000018", "--context", "amount=1", "--context", "amount=2")
    )
    # Nothing was stored (nor, therefore, sent).
    assert ok(server.run("verify", "list", "--service", service["id"], "--json"))["data"] == []


# --- server-side commands on the server's database ------------------------------------------


def test_services_allow_multipart_flag(server: Server) -> None:
    created = new_service(server, "--allow-multipart")
    assert created["allow_multipart"] is True
    assert new_service(server)["allow_multipart"] is False
    updated = ok(
        server.run("services", "update", "--id", created["id"], "--no-allow-multipart", "--json")
    )
    assert updated["allow_multipart"] is False
    kept = ok(
        server.run("services", "update", "--id", created["id"], "--ttl-seconds", "120", "--json")
    )
    assert kept["allow_multipart"] is False


def test_services_list_show_update(server: Server) -> None:
    auth = {"Authorization": f"Bearer {server.key}"}
    created = new_service(server, "--code-length", "8", "--allowed-country", "ES")
    assert created["code_length"] == 8 and created["allowed_countries"] == ["ES"]
    listed = ok(server.run("services", "list", "--limit", "200", "--json"))
    assert created in listed["data"]
    assert ok(server.run("services", "show", "--id", created["id"], "--json")) == created

    updated = ok(
        server.run(
            "services", "update", "--id", created["id"], "--code-length", "7",
            "--ttl-seconds", "120", "--json",
        )
    )  # fmt: skip
    assert updated["code_length"] == 7 and updated["ttl_seconds"] == 120
    unchanged = {k: v for k, v in created.items() if k not in ("code_length", "ttl_seconds")}
    assert {k: v for k, v in updated.items() if k in unchanged and k != "updated_at"} == {
        k: v for k, v in unchanged.items() if k != "updated_at"
    }
    seen = httpx.get(f"{server.url}/v1/services/{created['id']}", headers=auth).json()
    assert seen["code_length"] == 7  # the running server sees the change

    bad = server.run("services", "update", "--id", created["id"], "--code-length", "99", "--json")
    assert refused(bad, "invalid_request")["param"] == "code_length"
    assert ok(server.run("services", "show", "--id", created["id"], "--json")) == updated
    refused(
        server.run("services", "update", "--id", "svc_nope", "--name", "X", "--json"), "not_found"
    )
    refused(server.run("services", "show", "--id", "svc_nope", "--json"), "not_found")
    refused(server.run("services", "list", "--account", "acc_nope", "--json"), "not_found")
    usage_error(server.run("services", "update", "--code-length", "7"))  # no --id

    human = server.cli("services", "show", "--id", created["id"])
    assert re.search(r"code length\s+7", human) and f"service {created['id']}" in human


def test_services_take_the_abuse_and_delivery_settings(
    server: Server, stub: LabsMobileStub
) -> None:
    created = new_service(
        server,
        "--channel", "sms", "--channel", "email", "--fallback-after-seconds", "60",
        "--fraud-guard", "strict", "--allow-voip", "--no-custom-code",
        "--daily-spend-cap", "12.5", "--test-number", "+34600000090=424242",
        "--rate-limit", "per_number=5/3600", "--rate-limit", "per_prefix=20/600",
        "--rate-limits-fail-open", "--webhook-url", "https://hooks.example.com/otp",
    )  # fmt: skip
    assert created["channels"] == ["sms", "email"] and created["fallback_after_seconds"] == 60
    assert (created["fraud_guard"], created["allow_voip"], created["custom_code_enabled"]) == (
        "strict",
        True,
        False,
    )
    assert created["daily_spend_cap"] == "12.5"
    assert created["test_numbers"] == {"+34600000090": "424242"}
    assert created["webhook_url"] == "https://hooks.example.com/otp"
    limits = created["rate_limits"]
    assert limits["per_number"] == {"limit": 5, "window_seconds": 3600}
    assert limits["per_prefix"] == {"limit": 20, "window_seconds": 600}
    assert limits["per_ip"] == {"limit": 100, "window_seconds": 3600}  # left out: the default
    assert limits["fail_open"] is True

    # The test number works as the service says: nothing is sent, the fixed code approves.
    started = ok(
        server.run("verify", "start", "--service", created["id"], "--to", "+34600000090", "--json")
    )
    assert started["test"] is True
    checked = ok(server.run("verify", "check", "--id", started["id"], "--code", "424242", "--json"))
    assert checked["status"] == "approved"
    assert stub.messages == []

    # On update, the kinds given change and the service's other limits stay as they are:
    # flipping fail-open alone loosens nothing.
    flipped = ok(
        server.run(
            "services", "update", "--id", created["id"], "--rate-limits-fail-closed",
            "--rate-limit", "per_ip=50/3600", "--json",
        )
    )  # fmt: skip
    assert flipped["rate_limits"]["fail_open"] is False
    assert flipped["rate_limits"]["per_number"] == {"limit": 5, "window_seconds": 3600}
    assert flipped["rate_limits"]["per_prefix"] == {"limit": 20, "window_seconds": 600}
    assert flipped["rate_limits"]["per_ip"] == {"limit": 50, "window_seconds": 3600}

    reset = ok(
        server.run(
            "services", "update", "--id", created["id"], "--reset", "daily_spend_cap",
            "--reset", "test_numbers", "--reset", "rate_limits", "--no-allow-voip", "--json",
        )
    )  # fmt: skip
    assert (reset["daily_spend_cap"], reset["test_numbers"], reset["allow_voip"]) == (
        None,
        {},
        False,
    )
    assert reset["rate_limits"]["per_number"] == {"limit": 10, "window_seconds": 3600}
    assert reset["rate_limits"]["fail_open"] is False
    assert reset["fraud_guard"] == "strict"  # not given, not changed


def test_services_refuse_bad_abuse_settings_and_change_nothing(server: Server) -> None:
    service = new_service(server)
    update = ("services", "update", "--id", service["id"], "--json")
    for option, value, param in [
        ("--fraud-guard", "loud", "fraud_guard"),
        ("--daily-spend-cap", "-3", "daily_spend_cap"),
        ("--daily-spend-cap", "1.00001", "daily_spend_cap"),
        ("--test-number", "+34600000091=12", "test_numbers"),  # not the code length
        ("--test-number", "+3460=123456", "test_numbers"),  # not a valid number
        ("--rate-limit", "per_bogus=5/60", "rate_limits"),
        ("--rate-limit", "per_number=0/60", "rate_limits"),
        ("--channel", "pigeon", "channels"),
        ("--webhook-url", "ftp://hooks.example.com", "webhook_url"),
    ]:
        assert refused(server.run(*update, option, value), "invalid_request")["param"] == param
    for bad in [
        ("--rate-limit", "per_number=5"),
        ("--rate-limit", "per_number=x/60"),
        ("--rate-limit", "per_number=５/60"),  # a fullwidth digit
        ("--test-number", "+34600000091"),
        ("--reset", "name"),
        ("--reset", "bogus"),
        ("--reset", "fraud_guard", "--fraud-guard", "off"),
    ]:
        usage_error(server.run(*update, *bad))
    shown = ok(server.run("services", "show", "--id", service["id"], "--json"))
    assert shown == service


def test_services_rotate_webhook_secret(server: Server) -> None:
    created = ok(server.run("services", "create", "--name", "Hooks", "--json"))
    first = created["webhook_secret"]
    rotated = ok(server.run("services", "rotate-webhook-secret", "--id", created["id"], "--json"))
    assert rotated["service_id"] == created["id"]
    assert rotated["webhook_secret"].startswith("whsec_") and rotated["webhook_secret"] != first
    # Shown once: the service itself never shows it.
    assert "webhook_secret" not in ok(
        server.run("services", "show", "--id", created["id"], "--json")
    )
    audit = httpx.get(
        f"{server.url}/v1/audit", headers={"Authorization": f"Bearer {server.key}"}
    ).json()
    rotations = [e for e in audit["data"] if e["action"] == "service.webhook_secret_rotated"]
    assert [e["target"] for e in rotations if e["target"] == created["id"]] == [created["id"]]
    assert first not in json.dumps(audit) and rotated["webhook_secret"] not in json.dumps(audit)
    refused(
        server.run("services", "rotate-webhook-secret", "--id", "svc_nope", "--json"), "not_found"
    )


def test_keys_create_list_and_revoke(server: Server) -> None:
    account = ok(server.run("accounts", "create", "--name", "Keys Inc", "--json"))
    issued = ok(server.run("keys", "create", "--name", "ci", "--account", account["id"], "--json"))
    assert issued["account_id"] == account["id"] and issued["name"] == "ci"
    assert KEY_PATTERN.fullmatch(issued["key"]) and issued["revoked_at"] is None
    auth = {"Authorization": f"Bearer {issued['key']}"}
    assert httpx.get(f"{server.url}/v1/account", headers=auth).json()["id"] == account["id"]

    keys = ok(server.run("keys", "list", "--account", account["id"], "--json"))
    assert [k["id"] for k in keys["data"]] == [issued["id"]]
    assert "key" not in keys["data"][0]
    assert issued["id"] not in server.cli("keys", "list", "--json")  # the default account's

    # Keys are revoked within their own account.
    refused(server.run("keys", "revoke", "--id", issued["id"], "--json"), "not_found")
    revoked = ok(
        server.run("keys", "revoke", "--id", issued["id"], "--account", account["id"], "--json")
    )
    assert revoked["id"] == issued["id"] and revoked["revoked_at"] is not None
    assert "key" not in revoked
    assert httpx.get(f"{server.url}/v1/account", headers=auth).status_code == 401
    listed = ok(server.run("keys", "list", "--account", account["id"], "--json"))
    assert listed["data"] == [revoked]
    again = server.run("keys", "revoke", "--id", issued["id"], "--account", account["id"], "--json")
    refused(again, "not_found")
    human = server.cli("keys", "create", "--name", "ops", "--account", account["id"])
    assert KEY_PATTERN.search(human) and "shown once" in human


def test_accounts_create_list_and_show(server: Server) -> None:
    created = ok(
        server.run(
            "accounts", "create", "--name", "Shop", "--username", "shop@example.com", "--json"
        )
    )
    assert created["username"] == "shop@example.com" and created["is_admin"] is False
    assert set(created) == {
        "id",
        "name",
        "username",
        "is_admin",
        "created_at",
        "billing",
        "balance",
        "daily_spend_cap",
    }
    # An account made with the CLI is prepaid and starts with no credit, and no spend cap.
    assert (created["billing"], created["balance"]) == ("prepaid", "0")
    assert created["daily_spend_cap"] is None
    assert ok(server.run("accounts", "show", "--id", created["id"], "--json")) == created
    capped = ok(
        server.run("accounts", "update", "--id", created["id"], "--daily-cap", "12.5", "--json")
    )
    assert capped == {**created, "daily_spend_cap": "12.5"}
    refused(
        server.run("accounts", "update", "--id", created["id"], "--daily-cap", "-1", "--json"),
        "invalid_request",
    )
    uncapped = ok(
        server.run("accounts", "update", "--id", created["id"], "--daily-cap", "none", "--json")
    )
    assert uncapped == created
    default = ok(server.run("accounts", "show", "--json"))
    assert default["is_admin"] is True and default["username"] == server.username
    assert default["billing"] == "unlimited"  # the embedded default needs no set-up

    everything = ok(server.run("accounts", "list", "--limit", "200", "--json"))
    assert default in everything["data"] and created in everything["data"]
    first = ok(server.run("accounts", "list", "--limit", "1", "--json"))
    assert len(first["data"]) == 1 and first["next_cursor"]
    second = ok(
        server.run("accounts", "list", "--limit", "1", "--cursor", first["next_cursor"], "--json")
    )
    assert second["data"] and second["data"][0] != first["data"][0]

    refused(server.run("accounts", "show", "--id", "acc_nope", "--json"), "not_found")
    taken = server.run(
        "accounts", "create", "--name", "Again", "--username", "shop@example.com", "--json"
    )
    assert refused(taken, "invalid_request")["param"] == "username"
    bad = server.run("accounts", "create", "--name", "X", "--username", "not valid", "--json")
    refused(bad, "invalid_request")
    assert created["id"] in server.cli("accounts", "list", "--limit", "200")


def test_lockouts_clear(server: Server, stub: LabsMobileStub) -> None:
    service = new_service(server, "--resend-interval-seconds", "0")
    start = ("verify", "start", "--service", service["id"], "--to", "+34600000019", "--json")
    started = ok(server.run(*start))
    code = code_of(stub, 1)
    for _ in range(LOCKOUT_THRESHOLD):
        assert (
            server.run("verify", "check", "--id", started["id"], "--code", wrong(code)).returncode
            == 1
        )
    blocked = refused(server.run(*start), "destination_blocked")
    assert blocked["retry_after"] > 0
    # Locked: even the right code is not valid now.
    assert server.run("verify", "check", "--id", started["id"], "--code", code).returncode == 1

    clear = ("lockouts", "clear", "--service", service["id"], "--json", "--to")
    cleared = ok(server.run(*clear, "+34 600 000 019"))
    assert cleared["to"] == "+34600000019" and cleared["service_id"] == service["id"]
    assert cleared["was_locked_until"] is not None
    assert ok(server.run(*start))["id"] == started["id"]  # sent again: not blocked any more
    assert server.run("verify", "check", "--id", started["id"], "--code", code).returncode == 0
    assert ok(server.run(*clear, "+34600000019"))["was_locked_until"] is None

    refused(server.run(*clear, "not a number"), "invalid_phone_number")
    other = ("lockouts", "clear", "--service", "svc_nope", "--to", "+34600000019", "--json")
    refused(server.run(*other), "not_found")
    human = server.cli("lockouts", "clear", "--service", service["id"], "--to", "+34600000019")
    assert human.strip() == (
        f"lockout cleared for +34600000019 in {service['id']} (it was not locked)"
    )


# --- prices and credit ------------------------------------------------------------------------

GOOD_PRICES = "country,credits\nES,1.0\nFR,1.5\n*,2\n"
#: The table GOOD_PRICES makes, as ``prices list --json`` and ``GET /v1/prices`` show it.
GOOD_PRICE_LIST = {
    "data": [
        {"country": "*", "prefix": None, "name": "Every other country", "credits": "2"},
        {"country": "ES", "prefix": "34", "name": "Spain", "credits": "1"},
        {"country": "FR", "prefix": "33", "name": "France", "credits": "1.5"},
    ]
}


def ensure_good_prices(server: Server, tmp_path: Path) -> None:
    """The table of GOOD_PRICES, imported unless it is the one loaded already."""
    if api_prices(server) != GOOD_PRICE_LIST:
        ok(import_prices(server, tmp_path, GOOD_PRICES, "--json"))
    assert api_prices(server) == GOOD_PRICE_LIST


def import_prices(server: Server, tmp_path: Path, text: str | bytes, *options: str) -> Any:
    """``otpgate prices import`` of a file holding ``text``: the whole CompletedProcess."""
    path = tmp_path / "prices.csv"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return server.run("prices", "import", str(path), *options)


def api_prices(server: Server, *countries: str) -> Any:
    answer = httpx.get(
        f"{server.url}/v1/prices", params=[("country", c) for c in countries], headers=server.auth()
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_prices_import_and_list(server: Server, tmp_path: Path) -> None:
    imported = ok(import_prices(server, tmp_path, GOOD_PRICES, "--json"))
    assert imported == GOOD_PRICE_LIST
    assert ok(server.run("prices", "list", "--json")) == GOOD_PRICE_LIST
    assert api_prices(server) == GOOD_PRICE_LIST  # the running server uses the new table

    # A country without a line of its own shows the `*` price, under its own name and code.
    some = ok(server.run("prices", "list", "--country", "es", "--country", "DE", "--json"))
    assert some == {
        "data": [
            {"country": "ES", "prefix": "34", "name": "Spain", "credits": "1"},
            {"country": "DE", "prefix": "49", "name": "Germany", "credits": "2"},
        ]
    }
    assert some == api_prices(server, "es", "DE")
    bad = refused(server.run("prices", "list", "--country", "ZZ", "--json"), "invalid_request")
    assert bad["param"] == "country"

    human = server.cli("prices", "list")
    assert re.search(r"ES\s+│\s+Spain\s+│\s+\+34\s+│\s+1\b", human), human
    assert re.search(r"\*\s+│\s+Every other country\s+│\s+-\s+│\s+2\b", human), human
    assert "imported 3 price(s)" in import_prices(server, tmp_path, GOOD_PRICES).stdout

    # The import replaces the whole table: without `*`, other countries have no price.
    # A spreadsheet's byte order mark and CRLF line ends are fine, and `-` reads stdin.
    replaced = subprocess.run(
        [OTPGATE, "prices", "import", "-", "--json"],
        input="\ufeffcountry,credits\r\nPT,0.0725\r\n\r\n",
        env=server.client_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    only_pt = {
        "data": [{"country": "PT", "prefix": "351", "name": "Portugal", "credits": "0.0725"}]
    }
    assert ok(replaced) == only_pt
    assert api_prices(server) == only_pt
    assert ok(server.run("prices", "list", "--country", "ES", "--json")) == {"data": []}
    # A header alone empties the table: messages then carry no price.
    assert ok(import_prices(server, tmp_path, "country,credits\n", "--json")) == {"data": []}
    assert "no prices" in server.cli("prices", "list")


@pytest.mark.parametrize(
    ("content", "line", "why"),
    [
        ("country,credits\nES,1\nXX,1\n", 3, "is not an ISO 3166-1 alpha-2 country code"),
        ("country,credits\nES,1\nFR,-1.5\n", 3, "cannot be negative"),
        ("country,credits\nES,1,5\n", 2, "expected two fields"),
        ("country,credits\nES,1.00001\n", 2, "must be a number of credits"),
        ("country,credits\nES,one\n", 2, "must be a number of credits"),
        ("country,credits\nES,1e3\n", 2, "must be a number of credits"),
        ("ES,1\nFR,2\n", 1, "header country,credits"),
        ("", 1, "header country,credits"),
        ("country,credits\nES,1\nFR,1\nes,2\n", 4, "ES appears twice"),
        (b"country,credits\nES,1\nFR,\xff1\n", 3, "not UTF-8"),
    ],
    ids=[
        "unknown-country",
        "negative",
        "three-fields",
        "five-decimals",
        "text",
        "exponent",
        "no-header",
        "empty",
        "repeated-country",
        "not-utf8",
    ],
)
def test_a_bad_price_file_is_refused_naming_the_line_and_changes_nothing(
    server: Server, tmp_path: Path, content: str | bytes, line: int, why: str
) -> None:
    ensure_good_prices(server, tmp_path)
    bad = import_prices(server, tmp_path, content, "--json")
    problem = refused(bad, "invalid_request")
    assert problem["param"] == f"line {line}"
    assert why in problem["detail"]
    if line > 1:
        assert problem["detail"].startswith(f"line {line}: ")
    assert why in bad.stderr
    assert api_prices(server) == GOOD_PRICE_LIST  # the previous table stays, all of it


def test_prices_import_of_a_missing_file_is_a_usage_error(server: Server, tmp_path: Path) -> None:
    ensure_good_prices(server, tmp_path)
    usage_error(server.run("prices", "import", str(tmp_path / "missing.csv"), "--json"))
    usage_error(server.run("prices", "import", "--json"))  # no FILE
    assert api_prices(server) == GOOD_PRICE_LIST


def new_account(server: Server, *options: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A new account made with the CLI, and the headers of a key of its own."""
    account: dict[str, Any] = ok(
        server.run("accounts", "create", "--name", "Billed", *options, "--json")
    )
    issued = ok(server.run("keys", "create", "--name", "k", "--account", account["id"], "--json"))
    return account, {"Authorization": f"Bearer {issued['key']}"}


def api_account(server: Server, auth: dict[str, str]) -> Any:
    answer = httpx.get(f"{server.url}/v1/account", headers=auth)
    assert answer.status_code == 200, answer.text
    return answer.json()


def api_ledger(server: Server, auth: dict[str, str]) -> Any:
    answer = httpx.get(f"{server.url}/v1/account/ledger", headers=auth)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_credit_add_shows_in_the_account_and_the_ledger(server: Server) -> None:
    account, auth = new_account(server)
    assert (account["billing"], account["balance"]) == ("prepaid", "0")
    add = ("credit", "add", "--account", account["id"], "--json")
    first = ok(server.run(*add, "--credits", "20", "--note", "order 1042"))
    assert first["kind"] == "topup" and first["credits"] == "20" and first["balance"] == "20"
    assert first["note"] == "order 1042" and first["message_id"] is None
    assert first["id"].startswith("led_")
    second = ok(server.run(*add, "--credits", "0.0725"))
    assert (second["credits"], second["balance"], second["note"]) == ("0.0725", "20.0725", None)

    seen = api_account(server, auth)
    assert (seen["id"], seen["billing"], seen["balance"]) == (account["id"], "prepaid", "20.0725")
    assert ok(server.run("accounts", "show", "--id", account["id"], "--json")) == seen
    listed = ok(server.run("accounts", "list", "--limit", "200", "--json"))
    assert seen in listed["data"]

    ledger = {"data": [second, first], "next_cursor": None}  # newest first
    assert api_ledger(server, auth) == ledger
    assert ok(server.run("credit", "ledger", "--account", account["id"], "--json")) == ledger
    page = ok(server.run("credit", "ledger", "--account", account["id"], "--limit", "1", "--json"))
    assert page["data"] == [second] and page["next_cursor"]
    rest = ok(
        server.run(
            "credit", "ledger", "--account", account["id"], "--limit", "1",
            "--cursor", page["next_cursor"], "--json",
        )
    )  # fmt: skip
    assert rest == {"data": [first], "next_cursor": None}

    human = server.cli("credit", "add", "--account", account["id"], "--credits", "1.5")
    assert re.search(r"credits\s+\+1\.5\b", human) and re.search(r"balance\s+21\.5725\b", human)
    assert api_account(server, auth)["balance"] == "21.5725"
    table = server.cli("credit", "ledger", "--account", account["id"])
    assert first["id"] in table and "order 1042" in table
    shown = server.cli("accounts", "show", "--id", account["id"])
    assert re.search(r"billing\s+prepaid", shown) and re.search(r"balance\s+21\.5725", shown)
    row = next(
        line
        for line in server.cli("accounts", "list", "--limit", "200").splitlines()
        if account["id"] in line
    )
    assert "prepaid" in row and "21.5725" in row
    refused(server.run("credit", "ledger", "--account", "acc_nope", "--json"), "not_found")
    refused(
        server.run("credit", "ledger", "--account", account["id"], "--cursor", "x", "--json"),
        "invalid_request",
    )


@pytest.fixture(scope="module")
def topped_up(server: Server) -> tuple[dict[str, Any], dict[str, str]]:
    """A prepaid account topped up once with 3 credits (which the tests using it keep)."""
    account, auth = new_account(server)
    ok(server.run("credit", "add", "--account", account["id"], "--credits", "3", "--json"))
    return account, auth


@pytest.mark.parametrize(
    ("credits", "why"),
    [
        ("-5", "must be a number of credits"),
        ("0", "must be more than 0"),
        ("0.0000", "must be more than 0"),
        ("1.00001", "at most 4 decimals"),
        ("ten", "must be a number of credits"),
        ("1e3", "must be a number of credits"),
        ("+5", "must be a number of credits"),
        ("", "must be a number of credits"),
        ("1000000000.0001", "is larger than"),
    ],
)
def test_credit_add_refuses_a_bad_amount_and_changes_nothing(
    server: Server, topped_up: tuple[dict[str, Any], dict[str, str]], credits: str, why: str
) -> None:
    account, auth = topped_up
    before = api_ledger(server, auth)
    assert len(before["data"]) == 1
    bad = server.run("credit", "add", "--account", account["id"], f"--credits={credits}", "--json")
    problem = refused(bad, "invalid_request")
    assert problem["param"] == "credits" and why in problem["detail"]
    assert api_account(server, auth)["balance"] == "3"
    assert api_ledger(server, auth) == before


def test_credit_add_refuses_an_unknown_account_a_bad_note_and_bad_usage(server: Server) -> None:
    unknown = server.run("credit", "add", "--account", "acc_nope", "--credits", "5", "--json")
    assert refused(unknown, "not_found")["param"] == "account"
    account, auth = new_account(server)
    add = ("credit", "add", "--account", account["id"], "--credits", "5", "--json")
    assert refused(server.run(*add, "--note", "x" * 201), "invalid_request")["param"] == "note"
    assert refused(server.run(*add, "--note", "a\nb"), "invalid_request")["param"] == "note"
    usage_error(server.run("credit", "add", "--account", account["id"], "--json"))  # no credits
    usage_error(server.run("credit", "add", "--credits", "5", "--json"))  # no account
    usage_error(server.run("credit", "ledger", "--json"))  # no account
    usage_error(server.run("credit", "ledger", "--account", account["id"], "--limit", "0"))
    assert api_account(server, auth)["balance"] == "0"
    assert api_ledger(server, auth) == {"data": [], "next_cursor": None}


def test_accounts_create_billing(server: Server) -> None:
    prepaid, prepaid_auth = new_account(server, "--billing", "prepaid")
    unlimited, unlimited_auth = new_account(server, "--billing", "unlimited")
    assert (prepaid["billing"], prepaid["balance"]) == ("prepaid", "0")
    assert (unlimited["billing"], unlimited["balance"]) == ("unlimited", "0")
    assert api_account(server, prepaid_auth)["billing"] == "prepaid"
    assert api_account(server, unlimited_auth)["billing"] == "unlimited"
    assert re.search(
        r"billing\s+unlimited",
        server.cli("accounts", "create", "--name", "Free", "--billing", "unlimited"),
    )

    # An unlimited account can be topped up too; the CLI says the credit is not spent.
    topped = server.run("credit", "add", "--account", unlimited["id"], "--credits", "2", "--json")
    assert ok(topped)["balance"] == "2"
    assert f"note: {unlimited['id']} is unlimited" in topped.stderr
    assert (
        "unlimited"
        not in server.run("credit", "add", "--account", prepaid["id"], "--credits", "2").stderr
    )

    everyone = ok(server.run("accounts", "list", "--limit", "200", "--json"))["data"]
    for value in ("nope", "Prepaid", ""):
        bad = server.run("accounts", "create", "--name", "Bad", "--billing", value, "--json")
        usage_error(bad)
        assert "--billing" in bad.stderr
    assert ok(server.run("accounts", "list", "--limit", "200", "--json"))["data"] == everyone


def test_prices_and_credit_govern_what_a_prepaid_account_sends(
    server: Server, stub: LabsMobileStub, tmp_path: Path
) -> None:
    """The CLI's table and top-ups, end to end: each accepted SMS lowers the balance by its
    price, a send the balance cannot cover is refused, a top-up makes it possible again."""
    ok(import_prices(server, tmp_path, "country,credits\nES,1.0\nFR,1.5\n", "--json"))
    account, auth = new_account(server)
    service = ok(
        server.run(
            "services", "create", "--name", "Paid", "--account", account["id"],
            "--resend-interval-seconds", "0", "--json",
        )
    )  # fmt: skip
    ok(server.run("credit", "add", "--account", account["id"], "--credits", "2.5", "--json"))
    key = {"OTPGATE_API_KEY": auth["Authorization"].removeprefix("Bearer ")}

    def start(to: str) -> subprocess.CompletedProcess[str]:
        return server.run(
            "verify", "start", "--service", service["id"], "--to", to, "--json", extra_env=key
        )

    ok(start("+34600000031"))
    assert api_account(server, auth)["balance"] == "1.5"
    ok(start("+33612345678"))
    assert api_account(server, auth)["balance"] == "0"
    refused(start("+34600000032"), "insufficient_credit")
    # No price and no `*` for Germany: a prepaid account cannot be billed there.
    refused(start("+4915112345678"), "country_not_allowed")
    assert api_account(server, auth)["balance"] == "0"
    stub.wait_for_messages(2, timeout=10)

    topup = ok(server.run("credit", "add", "--account", account["id"], "--credits", "1", "--json"))
    ok(start("+34600000032"))
    ledger = ok(server.run("credit", "ledger", "--account", account["id"], "--json"))["data"]
    assert [(e["kind"], e["credits"], e["balance"]) for e in ledger] == [
        ("debit", "-1", "0"),
        ("topup", "1", "1"),
        ("debit", "-1.5", "0"),
        ("debit", "-1", "1.5"),
        ("topup", "2.5", "2.5"),
    ]
    assert ledger[1] == topup
    assert all(e["message_id"] for e in ledger if e["kind"] == "debit")
    assert api_ledger(server, auth)["data"] == ledger


# --- the Python client the CLI uses ---------------------------------------------------------


def test_python_client_against_the_server(server: Server) -> None:
    with OtpgateClient(server.url, api_key=server.key) as client:
        assert client.get_account()["username"] == server.username
        service = client.create_service("Client", code_length=4)
        assert service["code_length"] == 4
        # The create alone shows the webhook signing secret.
        assert service.pop("webhook_secret").startswith("whsec_")
        assert client.get_service(service["id"]) == service
        assert service["id"] in [s["id"] for s in client.list_services(limit=200)["data"]]
        updated = client.update_service(service["id"], ttl_seconds=300)
        assert updated["ttl_seconds"] == 300 and updated["code_length"] == 4
        with pytest.raises(InvalidRequest) as invalid:
            client.update_service(service["id"], code_length=3)
        assert invalid.value.param == "code_length"

        issued = client.create_key("sdk")
        assert issued["key"].startswith("otpgate_")
        assert issued["id"] in [k["id"] for k in client.list_keys()["data"]]
        client.revoke_key(issued["id"])
        with pytest.raises(NotFound):
            client.revoke_key(issued["id"])
        with pytest.raises(NotFound):
            client.get_verification("ver_missing")
        with pytest.raises(InvalidPhoneNumber):
            client.start_verification(service["id"], "12345")
    offline = OtpgateClient(f"http://127.0.0.1:{free_port()}", api_key=server.key)
    with offline, pytest.raises(Unavailable):
        offline.get_account()


# --- the service method behind `lockouts clear`, on every backend ------------------------------


async def test_clear_lockout_lifts_the_lock_and_refuses_bad_input(
    database: Database, tmp_path: Path
) -> None:
    settings = make_settings(database, tmp_path, lockout_threshold=2)
    container = build(settings, sender=RecordingSender(), clock=FrozenClock())
    try:
        account, _ = await container.access.ensure_default_account()
        admin = Principal(account=account, key_id="test")
        other_account = await container.access.create_account("Other")
        other = Principal(account=other_account, key_id="test")
        service = await container.catalog.create(
            admin, {"name": "Acme", "resend_interval_seconds": 0}
        )
        to = "+34600000021"
        started, _ = await container.verifications.start(admin, StartRequest(service.id, to))
        for _ in range(2):
            result = await container.verifications.check(admin, started.id, "00000000")
            assert result.valid is False
        with pytest.raises(DestinationBlocked):
            await container.verifications.start(admin, StartRequest(service.id, to))

        # Refusals change nothing: the destination stays locked.
        with pytest.raises(NotFound):
            await container.verifications.clear_lockout(other, service.id, to)
        with pytest.raises(NotFound):
            await container.verifications.clear_lockout(admin, "svc_nope", to)
        with pytest.raises(InvalidPhoneNumber):
            await container.verifications.clear_lockout(admin, service.id, "12345")
        with pytest.raises(DestinationBlocked):
            await container.verifications.start(admin, StartRequest(service.id, to))

        e164, locked_until = await container.verifications.clear_lockout(
            admin, service.id, "600 000 021", country="ES"
        )
        assert e164 == to and locked_until is not None
        assert locked_until > container.verifications.now()
        await container.verifications.start(admin, StartRequest(service.id, to))  # not blocked
        assert await container.verifications.clear_lockout(admin, service.id, to) == (to, None)
    finally:
        await container.aclose()
