"""Delivery workers as processes of their own (``otpgate worker``, the scale mode).

Real processes throughout: ``otpgate serve`` with ``OTPGATE_EMBEDDED_WORKER=false`` queues, one
or more ``otpgate worker`` processes send through the LabsMobile provider to its loopback stub,
on PostgreSQL (and SQLite where one worker is supported). The stub counts every send that
reaches it by ``subid`` (one per message), answered or not, so a duplicate cannot hide.

* two workers share 2,000 messages: each reaches the provider exactly once, both work;
* a worker killed (SIGKILL) while the provider holds its request: after the lease lapses a new
  worker sends the message once more, with the same text, and the code approves;
* SIGTERM and SIGINT stop a worker gracefully: the send in flight finishes and is recorded;
* a worker whose PostgreSQL stops answering carries on once it answers again;
* an API process without the embedded worker queues and sends nothing itself;
* one worker process per SQLite database.

Nothing here times anything: every wait polls for a state, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from otpgate.adapters.providers.labsmobile import subid_for
from otpgate.adapters.storage.engine import create_engine
from otpgate.adapters.storage.tables import metadata
from otpgate.bootstrap import build
from otpgate.domain.model import Channel, OutboundMessage, Principal, SendReceipt
from otpgate.services.verification import StartRequest
from tests.conftest import (
    POSTGRES_URL,
    Database,
    code_in,
    make_settings,
    run_in_thread,
)
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import Server, run_otpgate, running_server, wait_until
from tests.support.tcp_proxy import TcpProxy
from tests.support.workers import WorkerProcess

SECRET = "workers-secret-" + "w" * 40
#: Generous: a loaded CI machine may be many times slower than a laptop.
DEADLINE = 180.0


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as running:
        yield running


@pytest.fixture(autouse=True)
def fresh_stub(stub: LabsMobileStub) -> Iterator[None]:
    stub.reset()
    yield
    stub.reset()  # also ends any send still held for a killed worker


@pytest.fixture
def postgres_env(postgres_schema: str) -> dict[str, str]:
    """Settings for the session's PostgreSQL schema, every table emptied."""

    async def empty() -> None:
        engine = create_engine(POSTGRES_URL, schema=postgres_schema, pool_size=1)
        async with engine.begin() as conn:
            names = ", ".join(f'"{t.name}"' for t in reversed(metadata.sorted_tables))
            await conn.execute(text(f"TRUNCATE {names} CASCADE"))
        await engine.dispose()

    run_in_thread(empty())
    return {
        "OTPGATE_DATABASE_URL": POSTGRES_URL,
        "OTPGATE_DATABASE_SCHEMA": postgres_schema,
        "OTPGATE_SECRET_KEY": SECRET,
    }


def query(env: dict[str, str], sql: str, **params: Any) -> list[dict[str, Any]]:
    """Rows of ``sql`` on the database ``env`` names (a look behind the API)."""
    url = env.get("OTPGATE_DATABASE_URL") or f"sqlite:///{env['OTPGATE_DATA_DIR']}/otpgate.db"
    schema = env.get("OTPGATE_DATABASE_SCHEMA", "")

    async def run() -> list[dict[str, Any]]:
        engine = create_engine(url, schema=schema, pool_size=1)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(text(sql), params)
                return [dict(row._mapping) for row in result]
        finally:
            await engine.dispose()

    rows: list[dict[str, Any]] = run_in_thread(run())
    return rows


def message_statuses(env: dict[str, str]) -> dict[str, int]:
    rows = query(env, "SELECT status, count(*) AS n FROM messages GROUP BY status")
    return {row["status"]: int(row["n"]) for row in rows}


def start_verification(server: Server, to: str) -> str:
    answer = httpx.post(
        f"{server.url}/v1/verifications",
        json={"service_id": server.service_id, "to": to},
        headers=server.auth(),
        timeout=30,
    )
    assert answer.status_code == 201, answer.text
    vid: str = answer.json()["id"]
    return vid


def verification(server: Server, vid: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/v1/verifications/{vid}", headers=server.auth(), timeout=30)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


def message_status(server: Server, vid: str) -> str:
    status: str = verification(server, vid)["messages"][0]["status"]
    return status


def check(server: Server, vid: str, code: str) -> dict[str, Any]:
    answer = httpx.post(
        f"{server.url}/v1/verifications/{vid}/check",
        json={"code": code},
        headers=server.auth(),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


def scale_mode(database_env: dict[str, str], **more: str) -> dict[str, str]:
    """The API's settings: no embedded worker, JSON logs, plus ``database_env`` and ``more``."""
    return {
        "OTPGATE_EMBEDDED_WORKER": "false",
        "OTPGATE_LOG_JSON": "true",
        "OTPGATE_LOG_LEVEL": "INFO",
        **database_env,
        **more,
    }


# --- the scale mode: the API queues, a worker sends ---------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_api_without_embedded_worker_queues_and_a_worker_process_sends(
    backend: str, stub: LabsMobileStub, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database_env = request.getfixturevalue("postgres_env") if backend == "postgresql" else {}
    with running_server(stub, tmp_path, extra_env=scale_mode(database_env)) as server:
        vids = [start_verification(server, f"+3460000{i:04d}") for i in range(3)]
        # Queued without a lease: the API process neither sent them nor took them to send.
        rows = query(server.env, "SELECT status, lease_until, attempts FROM messages")
        assert [(r["status"], r["lease_until"], r["attempts"]) for r in rows] == [
            ("queued", None, 0)
        ] * 3
        assert stub.arrivals == 0
        assert all(message_status(server, vid) == "queued" for vid in vids)

        worker = WorkerProcess.start(server.env, tmp_path / "worker.log")
        try:
            started = worker.wait_started()
            assert started["providers"] == [{"name": "labsmobile", "type": "labsmobile"}]
            assert started["database"] == backend
            assert started["lease_seconds"] == 30
            sent = stub.wait_for_messages(3, timeout=DEADLINE)
            wait_until(
                lambda: all(message_status(server, vid) == "sent" for vid in vids),
                timeout=DEADLINE,
                what="three messages recorded as sent",
            )
            assert worker.terminate() == 0
        finally:
            worker.ensure_stopped()
        assert stub.token not in worker.log()  # the start line names providers, no secret
        by_to = {r.msisdns[0]: code_in(r.body["message"]) for r in sent}
        for vid in vids:
            to = verification(server, vid)["to"].removeprefix("+")
            assert check(server, vid, by_to[to])["status"] == "approved"
        assert stub.arrivals == 3


def test_one_worker_process_per_sqlite_database(stub: LabsMobileStub, tmp_path: Path) -> None:
    with running_server(stub, tmp_path, extra_env=scale_mode({})) as server:
        first = WorkerProcess.start(server.env, tmp_path / "first.log")
        try:
            first.wait_started()
            second = run_otpgate("worker", env=server.env)
            assert second.returncode == 2, second.stderr
            assert "another otpgate worker already runs on this SQLite database" in second.stderr
            assert "OTPGATE_DATABASE_URL" in second.stderr
            first.kill()  # even a killed worker leaves the database to the next one
        finally:
            first.ensure_stopped()
        vid = start_verification(server, "+34600000001")
        after = WorkerProcess.start(server.env, tmp_path / "after.log")
        try:
            after.wait_started()
            stub.wait_for_messages(1, timeout=DEADLINE)
            wait_until(lambda: message_status(server, vid) == "sent", timeout=DEADLINE, what="sent")
            assert after.terminate() == 0
        finally:
            after.ensure_stopped()


# --- acceptance: two workers, 2,000 messages, each delivered once -----------------------------


def test_two_workers_on_postgresql_send_2000_messages_each_exactly_once(
    stub: LabsMobileStub, tmp_path: Path, postgres_env: dict[str, str]
) -> None:
    total = 2000
    with running_server(stub, tmp_path, extra_env=scale_mode(postgres_env)) as server:
        workers = [WorkerProcess.start(server.env, tmp_path / f"worker-{n}.log") for n in (1, 2)]
        try:
            for worker in workers:
                worker.wait_started()
            # One LabsMobile-style request queues the lot (one message per recipient).
            recipients = [{"msisdn": f"346{i:08d}"} for i in range(total)]
            answer = httpx.post(
                f"{server.url}/json/send",
                json={"message": "Your parcel is on its way", "recipient": recipients},
                auth=(server.username, server.key),
                timeout=120,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["code"] == "0", answer.text
            stub.wait_for_messages(total, timeout=DEADLINE)
            wait_until(
                lambda: message_statuses(server.env) == {"sent": total},
                timeout=DEADLINE,
                what="every message recorded as sent",
            )
            for worker in workers:
                assert worker.terminate() == 0
        finally:
            for worker in workers:
                worker.ensure_stopped()

    ids = [row["id"] for row in query(server.env, "SELECT id FROM messages")]
    assert len(ids) == total
    arrivals = stub.arrivals_by_subid()
    # Each message reached the provider exactly once, and nothing else did.
    assert set(arrivals) == {subid_for(i) for i in ids}
    assert sorted(set(arrivals.values())) == [1]
    assert stub.arrivals == total
    assert len(stub.messages) == total
    # Both workers did part of the work, and between them all of it, none twice.
    first, second = (set(w.sent_ids()) for w in workers)
    assert first and second, (len(first), len(second))
    assert not first & second
    assert first | second == set(ids)
    attempts = query(server.env, "SELECT DISTINCT attempts FROM messages")
    assert [row["attempts"] for row in attempts] == [1]


# --- acceptance: SIGKILL between claim and provider answer -------------------------------------


def test_a_worker_killed_mid_send_is_replaced_and_the_code_is_sent_at_most_once_more(
    stub: LabsMobileStub, tmp_path: Path, postgres_env: dict[str, str]
) -> None:
    short_lease = {
        "OTPGATE_DELIVERY_LEASE_SECONDS": "6",
        # Long enough that the killed worker cannot give up on its send before the kill.
        "OTPGATE_PROVIDER_TIMEOUT_SECONDS": "5",
    }
    with running_server(
        stub, tmp_path, extra_env=scale_mode(postgres_env, **short_lease)
    ) as server:
        vid = start_verification(server, "+34600000001")
        stub.hold_next(1)  # the provider takes the first request and does not answer
        killed = WorkerProcess.start(server.env, tmp_path / "killed.log")
        try:
            killed.wait_started()
            stub.wait_for_held(1, timeout=DEADLINE)
            killed.kill()  # SIGKILL: between the claim and the provider's answer
        finally:
            killed.ensure_stopped()
        assert killed.process.returncode == -signal.SIGKILL
        (row,) = query(server.env, "SELECT id, status, lease_until, attempts FROM messages")
        assert (row["status"], row["attempts"]) == ("queued", 1)
        assert row["lease_until"] is not None  # the dead worker's lease, still running
        subid = subid_for(row["id"])

        replacement = WorkerProcess.start(server.env, tmp_path / "replacement.log")
        try:
            replacement.wait_started()
            (answered,) = stub.wait_for_messages(1, timeout=DEADLINE)
            wait_until(
                lambda: message_status(server, vid) == "sent",
                timeout=DEADLINE,
                what="the message recorded as sent",
            )
            assert replacement.terminate() == 0
        finally:
            replacement.ensure_stopped()

        # Sent once more, not more: two requests reached the provider, the same text both times.
        assert answered.subid == subid
        assert stub.arrivals_for(subid) == 2
        assert stub.arrivals == 2
        first, again = stub.arrived(subid)
        assert first["message"] == again["message"]
        assert first["recipient"] == again["recipient"]
        assert replacement.sent_ids() == [row["id"]]
        (after,) = query(server.env, "SELECT status, attempts FROM messages")
        assert (after["status"], after["attempts"]) == ("sent", 2)
        # The code the phone got twice approves the verification.
        result = check(server, vid, code_in(again["message"]))
        assert result["status"] == "approved"


# --- graceful stop -------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_lets_the_send_in_flight_finish_and_records_it(
    sig: signal.Signals, stub: LabsMobileStub, tmp_path: Path, postgres_env: dict[str, str]
) -> None:
    with running_server(stub, tmp_path, extra_env=scale_mode(postgres_env)) as server:
        worker = WorkerProcess.start(server.env, tmp_path / "worker.log")
        try:
            worker.wait_started()
            stub.hold_next(1)
            vid = start_verification(server, "+34600000001")
            stub.wait_for_held(1, timeout=DEADLINE)
            worker.signal(sig)
            wait_until(
                lambda: bool(worker.logged("worker received a stop signal")),
                timeout=DEADLINE,
                what="the worker to take the signal",
            )
            assert worker.process.poll() is None  # still finishing its send
            stub.release_held()
            assert worker.wait(timeout=DEADLINE) == 0
        finally:
            worker.ensure_stopped()
        # Recorded before the process ended: nobody else could have written it.
        assert message_status(server, vid) == "sent"
        assert stub.arrivals == 1
        (stopped,) = worker.logged("worker stopped")
        assert stopped["unrecorded_sends"] == 0


# --- PostgreSQL lost for a while -------------------------------------------------------------


class ThreadedProxy:
    """:class:`TcpProxy` on an event loop of its own, for tests that block."""

    def __init__(self, host: str, port: int) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.proxy = self._call(TcpProxy(host, port).start())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def hang(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.hang)

    def recover(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.recover)

    def close(self) -> None:
        self._call(self.proxy.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def test_a_worker_that_loses_postgresql_for_a_while_carries_on(
    stub: LabsMobileStub, tmp_path: Path, postgres_env: dict[str, str]
) -> None:
    real = make_url(POSTGRES_URL)
    proxy = ThreadedProxy(real.host or "127.0.0.1", real.port or 5432)
    try:
        with running_server(stub, tmp_path, extra_env=scale_mode(postgres_env)) as server:
            # The worker reaches PostgreSQL through the proxy; the API directly.
            proxied = real.set(host="127.0.0.1", port=proxy.proxy.port)
            worker_env = {
                **server.env,
                "OTPGATE_DATABASE_URL": proxied.render_as_string(hide_password=False),
                "OTPGATE_DATABASE_TIMEOUT_SECONDS": "1",
            }
            worker = WorkerProcess.start(worker_env, tmp_path / "worker.log")
            try:
                worker.wait_started()
                before = start_verification(server, "+34600000001")
                stub.wait_for_messages(1, timeout=DEADLINE)
                wait_until(
                    lambda: message_status(server, before) == "sent",
                    timeout=DEADLINE,
                    what="the first message sent",
                )
                proxy.hang()  # PostgreSQL stops answering the worker
                during = start_verification(server, "+34600000002")
                wait_until(
                    lambda: bool(worker.logged("storage unavailable; dispatcher retries shortly")),
                    timeout=DEADLINE,
                    what="the worker to notice the outage",
                )
                assert stub.arrivals == 1  # the new message could not be claimed meanwhile
                assert message_status(server, during) == "queued"
                proxy.recover()
                stub.wait_for_messages(2, timeout=DEADLINE)
                wait_until(
                    lambda: message_status(server, during) == "sent",
                    timeout=DEADLINE,
                    what="the message queued during the outage sent",
                )
                assert worker.process.poll() is None
                assert worker.terminate() == 0
            finally:
                worker.ensure_stopped()
            assert stub.arrivals == 2
    finally:
        proxy.close()


# --- a send never outlasts its lease -----------------------------------------------------------


class SenderIgnoringItsTimeout:
    """A provider adapter that never returns by itself (a bug, or a library that rounds its
    timeout up): the dispatcher's own limit is all that ends its sends."""

    name = "hanging"
    channels = frozenset({Channel.SMS})

    def __init__(self) -> None:
        self.in_flight = 0

    async def send(self, message: OutboundMessage) -> SendReceipt:
        self.in_flight += 1
        try:
            await asyncio.Event().wait()
            raise AssertionError("not reached")
        finally:
            self.in_flight -= 1

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_send_is_abandoned_before_its_lease_lapses(
    database: Database, tmp_path: Path
) -> None:
    """The dispatcher gives a send its timeout plus a grace second, but never past its lease:
    once the lease lapses another worker may claim the message, and a send still running here
    would be a second copy in flight, whose outcome would overwrite the other's (the tally of
    unanswered sends, the lease). The provider timeout is valid (shorter than the lease), the
    grace second is not: a second dispatcher polls until it can claim the message, and at that
    moment this one must have let go of its send."""
    settings = make_settings(
        database, tmp_path, delivery_lease_seconds=2, provider_timeout_seconds=1.5
    )
    sender = SenderIgnoringItsTimeout()
    container = build(settings, sender=sender)  # the system clock: leases lapse in real time
    try:
        account, _ = await container.access.ensure_default_account()
        me = Principal(account=account, key_id="test")
        service = await container.catalog.create(me, {"name": "Acme"})
        await container.verifications.start(
            me, StartRequest(service_id=service.id, to="+34600000001")
        )
        assert await container.dispatcher.dispatch_due() == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while sender.in_flight == 0:
            assert loop.time() < deadline, "the send never started"
            await asyncio.sleep(0.01)
        while not (
            claimed := await container.storage.claim_due(
                now=datetime.now(UTC), lease_seconds=30, limit=1
            )
        ):
            assert loop.time() < deadline, "the message was never claimable again"
            await asyncio.sleep(0.01)
        assert len(claimed) == 1
        assert sender.in_flight == 0  # given up before anyone else could claim the message
    finally:
        await container.aclose()
