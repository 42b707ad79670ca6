"""Storage that hangs, fails and recovers, on both backends.

* SQLite, another process holds the write lock: requests that need it answer ``503
  unavailable`` after the lock timeout while the event loop keeps serving (``/healthz``
  answers meanwhile), ``/readyz`` reports it, and everything works once the lock is gone.
* SQLite, the disk fills up under a real server (``otpgate serve`` on a small tmpfs) with
  messages in flight: starts answer ``503``, ``/readyz`` reports it, nothing is sent twice
  (also after the leases of the messages in flight lapsed while the disk was full), the
  server recovers by itself when space comes back, and shuts down cleanly on SIGTERM.
* PostgreSQL stops answering (a loopback proxy holds every byte): requests answer ``503``
  instead of hanging, ``/readyz`` reports it, and once the database answers again requests
  succeed and no accepted verification is lost.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import POSTGRES_URL, Api, Database, make_settings, serving
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import running_server, wait_until
from tests.support.tcp_proxy import TcpProxy


def problem_code(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/problem+json")
    code: str = response.json()["code"]
    return code


# --- SQLite: a write lock held by another process ------------------------------------------


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_held_write_lock_fails_fast_without_blocking_the_loop(api: Api) -> None:
    assert api.database.sqlite_path is not None
    blocker = sqlite3.connect(api.database.sqlite_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process takes the write lock
        start = asyncio.create_task(api.start("+34600000001"))
        health = asyncio.create_task(api.http.get("/healthz"))
        done, _ = await asyncio.wait({start, health}, return_when=asyncio.FIRST_COMPLETED)
        # The start waits for the lock without holding the event loop: health answers first.
        assert health in done and (await health).status_code == 200
        refused = await asyncio.wait_for(start, timeout=10)
        assert refused.status_code == 503 and problem_code(refused) == "unavailable"
        assert refused.headers["Retry-After"] == "1"
        ready = await api.http.get("/readyz")
        assert ready.status_code == 503 and problem_code(ready) == "unavailable"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await api.http.get("/readyz")).status_code == 200
    accepted = await api.start("+34600000001")
    assert accepted.status_code == 201
    await api.deliver()
    assert len(api.sender.sent) == 1  # the refused start left nothing behind to send


# --- SQLite: the disk fills up ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs: a real file system that runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Take every free byte of ``disk``; the returned file gives them back when deleted."""
    filler = disk / "filler"
    # Unbuffered: the write that meets the full disk is the last one, nothing is left to flush.
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(descriptor, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(descriptor)
    return filler


def test_a_full_disk_answers_503_sends_nothing_twice_and_recovers(
    small_disk: Path, tmp_path: Path
) -> None:
    with (
        LabsMobileStub() as stub,
        running_server(
            stub,
            tmp_path,
            extra_env={
                "OTPGATE_DATA_DIR": str(small_disk / "var"),
                "OTPGATE_LOG_LEVEL": "INFO",
                # Short leases, so that they lapse while the disk is full.
                "OTPGATE_DELIVERY_LEASE_SECONDS": "2",
                "OTPGATE_PROVIDER_TIMEOUT_SECONDS": "1.5",
            },
        ) as server,
    ):
        http = httpx.Client(base_url=server.url, headers=server.auth(), timeout=30)
        service = server.service_id

        def start(n: int) -> httpx.Response:
            return http.post(
                "/v1/verifications", json={"service_id": service, "to": f"+3460000{n:04d}"}
            )

        # Five codes whose sends are in flight (the provider answers after a second) when the
        # disk fills up: their sent-marks cannot be written.
        stub.delay_seconds = 1.0
        in_flight = [start(n).json()["id"] for n in range(5)]
        filler = fill(small_disk)
        refused = start(99)
        assert refused.status_code == 503 and problem_code(refused) == "unavailable"
        ready = http.get("/readyz")
        assert ready.status_code == 503 and problem_code(ready) == "unavailable"
        assert http.get("/healthz").status_code == 200
        wait_until(lambda: stub.arrivals >= 5, timeout=10, what="the five sends")
        # The leases of the five (2 s) lapse while the disk is still full; the claim loop
        # keeps trying to write, and must not send them again.
        wait_until(lambda: len(stub.messages) >= 5, timeout=10, what="the five answers")
        lapse = http.get("/readyz")  # a request in between: the server is alive and degraded
        assert lapse.status_code == 503
        stub.delay_seconds = 0.0
        # Real time must pass for the leases to lapse (the server's clock is the system's):
        # this sleep is the scenario, not a wait for something to happen.
        time.sleep(3)
        filler.unlink()  # space comes back

        wait_until(lambda: http.get("/readyz").status_code == 200, timeout=15, what="ready")
        accepted = start(100)
        assert accepted.status_code == 201

        def statuses() -> list[str]:
            return [
                m["status"]
                for vid in [*in_flight, accepted.json()["id"]]
                for m in http.get(f"/v1/verifications/{vid}").json()["messages"]
            ]

        wait_until(lambda: statuses() == ["sent"] * 6, timeout=15, what="six sent messages")
        per_number: dict[str, int] = {}
        for message in stub.messages:
            for msisdn in message.msisdns:
                per_number[msisdn] = per_number.get(msisdn, 0) + 1
        assert sorted(per_number.values()) == [1] * 6, per_number  # nothing sent twice
        http.close()
        # A clean shutdown after the episode: SIGTERM ends the process within its grace.
        assert server.stop(grace_seconds=15) in (0, -15), server.log()[-3000:]


# --- PostgreSQL: the database stops answering -----------------------------------------------


@pytest.fixture
async def proxied_api(database: Database, tmp_path: Path) -> AsyncIterator[tuple[Api, TcpProxy]]:
    """The app on PostgreSQL through a proxy the test can make hang."""
    real = make_url(POSTGRES_URL)
    proxy = await TcpProxy(real.host or "127.0.0.1", real.port or 5432).start()
    url = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        async with serving(make_settings(database, tmp_path, database_url=url), database) as api:
            yield api, proxy
    finally:
        await proxy.aclose()


@pytest.mark.parametrize("database", ["postgres"], indirect=True)
async def test_a_hanging_database_fails_fast_and_recovers(
    proxied_api: tuple[Api, TcpProxy],
) -> None:
    api, proxy = proxied_api
    before = await api.start("+34600000001")
    assert before.status_code == 201

    proxy.hang()
    # The database stops answering: the request gets 503, not a hang (the wait_for is only a
    # guard that turns a hang into a failure).
    refused = await asyncio.wait_for(api.start("+34600000002"), timeout=20)
    assert refused.status_code == 503 and problem_code(refused) == "unavailable"
    assert "Traceback" not in refused.text
    ready = await asyncio.wait_for(api.http.get("/readyz"), timeout=20)
    assert ready.status_code == 503
    assert (await api.http.get("/healthz")).status_code == 200

    proxy.recover()
    for _ in range(50):  # the first requests may still meet connections that broke
        again = await api.start("+34600000002")
        if again.status_code != 503:
            break
    assert again.status_code == 201, again.text
    assert (await api.http.get("/readyz")).status_code == 200
    # Nothing accepted before the outage was lost: it is still there, and it is delivered.
    kept = await api.http.get(f"/v1/verifications/{before.json()['id']}", headers=api.auth())
    assert kept.status_code == 200 and kept.json()["status"] == "pending"
    await api.deliver()
    assert sorted(s.to for s in api.sender.sent) == ["+34600000001", "+34600000002"]
