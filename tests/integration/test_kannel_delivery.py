"""A verification's SMS through a real ``otpgate serve`` to real Kannel and its fake SMSC, and
Kannel's delivery report turning the message ``delivered``, on SQLite and PostgreSQL.

Kannel runs in a network namespace of its own (it listens on every interface); otpgate runs in
the machine's namespace, where PostgreSQL is. Two relays join the loopbacks
(``tests/support/kannel.py``): ``127.0.0.1:<p>`` here reaches smsbox's sendsms port there, and
``127.0.0.1:<otpgate's port>`` there reaches otpgate here, so the receipt URL otpgate builds from
``OTPGATE_PUBLIC_URL`` works unchanged from inside Kannel's namespace.

The fake SMSC reports a message delivered the instant it has it, in a race with smsbox's answer
to otpgate's ``sendsms`` (Kannel's log shows a report fetched before the answer went out), and
otpgate ignores a report for a message it has not yet marked sent. otpgate won that race in
every run seen so far, but a test must not rest on a race: these tests take the SMSC link down
first, so Kannel accepts the message ("3: Queued for later delivery"), otpgate marks it sent,
and when the SMSC reconnects Kannel delivers it and its report arrives, as a real network's
report does, seconds after the send.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Database, code_in
from tests.support.kannel import (
    SENDSMS_PORT,
    UNAVAILABLE,
    Kannel,
    into_namespace,
    out_of_namespace,
    running_kannel,
)
from tests.support.server import Server, running_server

pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@pytest.fixture
def kannel(tmp_path: Path) -> Iterator[Kannel]:
    # otpgate sends no ``from`` when the service has no sender id: Kannel's default applies.
    with running_kannel(tmp_path / "kannel", default_sender="Acme") as running:
        yield running


@pytest.fixture
def server(kannel: Kannel, database: Database, tmp_path: Path) -> Iterator[Server]:
    sendsms = into_namespace(kannel.ns, SENDSMS_PORT)
    env = {
        "OTPGATE_SMS_PROVIDER": "kannel",
        "OTPGATE_KANNEL_URL": kannel.url(sendsms.port),
        "OTPGATE_SECRET_KEY": "kannel-it-secret-" + "k" * 40,
    }
    if database.backend == "postgres":
        env |= {
            "OTPGATE_DATABASE_URL": database.url,
            "OTPGATE_DATABASE_SCHEMA": database.schema,
        }
    (tmp_path / "otpgate").mkdir()
    try:
        with running_server(None, tmp_path / "otpgate", extra_env=env) as running:
            receipts = out_of_namespace(kannel.ns, running.port)
            try:
                yield running
            finally:
                receipts.close()
    finally:
        sendsms.close()


def wait_for(read: Any, predicate: Any, what: str, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if predicate(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {value}"
        time.sleep(0.1)


def test_a_verification_sms_reaches_the_smsc_and_its_report_makes_it_delivered(
    server: Server, kannel: Kannel
) -> None:
    kannel.stop_smsc()
    with httpx.Client(base_url=server.url, headers=server.auth(), timeout=10) as http:
        started = http.post(
            "/v1/verifications", json={"service_id": server.service_id, "to": "+34600000001"}
        )
        assert started.status_code == 201, started.text
        vid = started.json()["id"]

        def message() -> dict[str, Any]:
            answer = http.get(f"/v1/verifications/{vid}")
            assert answer.status_code == 200, answer.text
            messages: list[dict[str, Any]] = answer.json()["messages"]
            return messages[0]

        sent = wait_for(message, lambda m: m["status"] == "sent", "the message to be sent")
        assert sent["provider"] == "kannel"

        kannel.start_smsc()
        (arrived,) = kannel.new_messages(1, timeout=20)
        assert (arrived.sender, arrived.receiver, arrived.kind) == ("Acme", "+34600000001", "text")
        assert "Acme" in arrived.text

        wait_for(message, lambda m: m["status"] == "delivered", "the report to arrive")

        checked = http.post(f"/v1/verifications/{vid}/check", json={"code": code_in(arrived.text)})
        assert checked.json()["status"] == "approved"

    # otpgate's log never shows the code, the Kannel password or the receipt token.
    log = server.log()
    assert code_in(arrived.text) not in log
    assert "Kannel-s3cret-pw" not in log
    assert "token=" not in log


def test_a_plain_sms_in_greek_arrives_as_ucs2_and_is_delivered(
    server: Server, kannel: Kannel
) -> None:
    text = "Γεια σας! Η παραγγελία σας στάλθηκε."
    kannel.stop_smsc()
    with httpx.Client(base_url=server.url, headers=server.auth(), timeout=10) as http:
        queued = http.post("/v1/messages", json={"to": "+306900000001", "text": text})
        assert queued.status_code == 202, queued.text
        assert queued.json()["encoding"] == "UCS-2"
        mid = queued.json()["id"]

        def status() -> str:
            answer = http.get(f"/v1/messages/{mid}")
            assert answer.status_code == 200, answer.text
            value: str = answer.json()["status"]
            return value

        wait_for(status, lambda s: s == "sent", "the message to be sent")
        kannel.start_smsc()
        (arrived,) = kannel.new_messages(1, timeout=20)
        assert (arrived.receiver, arrived.kind, arrived.text) == ("+306900000001", "ucs-2", text)
        wait_for(status, lambda s: s == "delivered", "the report to arrive")
