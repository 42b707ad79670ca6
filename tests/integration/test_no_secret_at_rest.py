"""No secret at rest and none in the logs, on every backend.

A session through the real app and the real LabsMobile sender (against the loopback stub)
creates API keys (also under an ``Idempotency-Key``, and replays that), starts, resends and
checks codes. Afterwards the SQLite database files (database, WAL, shared memory) or every
PostgreSQL table of the schema, and everything logged at DEBUG, are searched for every secret
that passed through: API keys, codes, the provider's token, the master secret and the keys
derived from it. None may appear.

Storage errors must not carry bound values either: a driver error is translated into one of
otpgate's errors whose text, and whose whole chain of causes, holds none of the statement's
parameters (phone numbers, digests).
"""

from __future__ import annotations

import base64
import io
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from otpgate.adapters.providers.labsmobile import LabsMobileSender
from otpgate.adapters.storage import statements as q
from otpgate.adapters.storage.executor import Conflict, StorageError
from otpgate.adapters.storage.store import SqlStore, verification_values
from otpgate.adapters.storage.tables import metadata
from otpgate.bootstrap import build, derive_keys
from otpgate.domain.model import Principal
from otpgate.entrypoints import logs
from otpgate.entrypoints.api.app import create_app
from otpgate.errors import OtpgateError
from otpgate.services.verification import StartRequest
from tests.conftest import TEST_SECRET, Database, FrozenClock, code_in, make_settings
from tests.support.labsmobile_stub import LabsMobileStub


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as running:
        yield running


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    """Everything otpgate logs, as production configures it, at DEBUG."""
    logs.configure("DEBUG", as_json=True)
    buffer = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffer)
    try:
        yield buffer
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)


def forms(secret: str | bytes) -> list[bytes]:
    """The ways a secret could be written down: as it is, in hex, in base64."""
    raw = secret.encode() if isinstance(secret, str) else secret
    found = [raw, raw.hex().encode(), base64.b64encode(raw), base64.urlsafe_b64encode(raw)]
    return [f.rstrip(b"=") for f in found if len(f) >= 8]


async def stored_bytes(database: Database) -> bytes:
    """Every byte the database keeps: the SQLite files, or every row of every table."""
    if database.sqlite_path is not None:
        files = [
            database.sqlite_path.with_name(database.sqlite_path.name + s)
            for s in ("", "-wal", "-shm")
        ]
        return b"".join(f.read_bytes() for f in files if f.exists())
    dump = []
    async with database.sql() as conn:
        for table in metadata.sorted_tables:
            query = f'SELECT row_to_json(t)::text FROM "{table.name}" t'  # noqa: S608 - our names
            rows = await conn.execute(text(query))
            dump += [row[0] for row in rows]
    return "\n".join(dump).encode()


@pytest.fixture
async def session(
    database: Database, tmp_path: Path, stub: LabsMobileStub, log_text: io.StringIO
) -> tuple[list[str | bytes], bytes, str, str | None]:
    """Run the session; return every secret that passed through, what storage holds, what was
    logged, and the ``key`` of the replayed key creation."""
    stub.reset()
    clock = FrozenClock()
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    container = build(make_settings(database, tmp_path), sender=sender, clock=clock)
    keys = derive_keys(TEST_SECRET.encode())
    secrets: list[str | bytes] = [
        TEST_SECRET,
        stub.token,
        keys.digest,
        keys.sealing,
        keys.receipts,
        keys.webhooks,
        keys.receipt_token(sender.name),
    ]
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        _, issued = await container.access.ensure_default_account()
        assert issued is not None
        secrets.append(issued.secret)
        auth = {"Authorization": f"Bearer {issued.secret}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            # Keys: plain, under an Idempotency-Key, and that request replayed.
            plain = await http.post("/v1/keys", json={"name": "plain"}, headers=auth)
            assert plain.status_code == 201
            secrets.append(plain.json()["key"])
            once = {**auth, "Idempotency-Key": "key-once"}
            first = await http.post("/v1/keys", json={"name": "idem"}, headers=once)
            assert first.status_code == 201 and first.json()["key"].startswith("otpgate_")
            secrets.append(first.json()["key"])
            replay = await http.post("/v1/keys", json={"name": "idem"}, headers=once)
            assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
            assert replay.json()["id"] == first.json()["id"]
            replayed_key = replay.json()["key"]

            # Codes: 10 digits, so that no code can turn up in stored bytes by chance.
            # Webhook signing secrets: issued with the service (under an Idempotency-Key, and
            # replayed without it), then rotated; events are queued for the hook.
            service_body = {
                "name": "Acme",
                "code_length": 10,
                "resend_interval_seconds": 30,
                "webhook_url": "http://127.0.0.1:9/hook",
            }
            once_service = {**auth, "Idempotency-Key": "service-once"}
            service = await http.post("/v1/services", json=service_body, headers=once_service)
            assert service.status_code == 201
            service_id = service.json()["id"]
            issued_secret = service.json()["webhook_secret"]
            assert issued_secret.startswith("whsec_")
            service_replay = await http.post(
                "/v1/services", json=service_body, headers=once_service
            )
            assert service_replay.json()["webhook_secret"] is None
            rotated = await http.post(f"/v1/services/{service_id}/webhook-secret", headers=auth)
            assert rotated.status_code == 200
            for whsec in (issued_secret, rotated.json()["webhook_secret"]):
                secrets += [whsec, base64.b64decode(whsec.removeprefix("whsec_"))]
            started = []
            for n, to in enumerate(("+34600000001", "+34600000002", "+34600000003")):
                headers = {**auth, "Idempotency-Key": f"start-{n}"}
                body = {"service_id": service_id, "to": to, "context": {"amount": "9.99 EUR"}}
                response = await http.post("/v1/verifications", json=body, headers=headers)
                assert response.status_code == 201
                started.append(response.json()["id"])
            await container.dispatcher.drain()
            clock.advance(31)
            resent = await http.post(f"/v1/verifications/{started[0]}/resend", headers=auth)
            assert resent.status_code == 200
            await container.dispatcher.drain()
            sent = [(m.msisdns[0], code_in(m.body["message"])) for m in stub.messages]
            assert len(sent) == 4
            secrets += [code for _, code in sent]
            code_to = dict(sent)
            assert len(set(sent)) == 3  # the resend sent the same code again
            codes = [code_to[to[1:]] for to in ("+34600000001", "+34600000002")]

            async def check(vid: str, code: str) -> bool:
                answer = await http.post(
                    f"/v1/verifications/{vid}/check",
                    json={"code": code, "context": {"amount": "9.99 EUR"}},
                    headers=auth,
                )
                assert answer.status_code == 200
                valid: bool = answer.json()["valid"]
                return valid

            assert not await check(started[0], codes[1])  # another verification's code
            assert await check(started[0], codes[0])
            assert await check(started[1], codes[1])
            # The third stays pending: its sealed code is in storage, encrypted.
            await container.event_sender.drain()  # nothing listens: the events stay pending
            events = await http.get("/v1/events", headers=auth)
            assert [e["type"] for e in events.json()["data"]] == ["verification.approved"] * 2
    held = await stored_bytes(database)
    return secrets, held, log_text.getvalue(), replayed_key


async def test_no_secret_is_stored_or_logged(
    session: tuple[list[str | bytes], bytes, str, str | None],
) -> None:
    secrets, held, logged, replayed_key = session
    assert len(held) > 1000 and "verification started" in logged  # the search has material
    for secret in secrets:
        for form in forms(secret):
            assert form not in held, f"a secret is stored ({form[:4]!r}…)"
            assert form.decode("latin-1") not in logged, f"a secret is logged ({form[:4]!r}…)"
    # A replayed key creation cannot show the key: it was never kept.
    assert replayed_key is None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


async def test_storage_errors_carry_no_bound_values(database: Database, tmp_path: Path) -> None:
    container = build(make_settings(database, tmp_path))
    store = container.storage
    assert isinstance(store, SqlStore)
    try:
        account, _ = await container.access.ensure_default_account()
        principal = Principal(account=account, key_id="test")
        service = await container.catalog.create(principal, {"name": "Acme"})
        verification, _ = await container.verifications.start(
            principal, StartRequest(service_id=service.id, to="+34612345678")
        )
        values = verification_values(verification)
        secrets = [b"34612345678", verification.code_digest.hex().encode()]
        failures: list[OtpgateError | Conflict | StorageError] = []
        # A second pending row for the number: a unique violation, whose driver text quotes
        # the key (service id and phone number).
        with pytest.raises(Conflict) as conflict:
            await store.executor.run(q.INSERT_VERIFICATION, **{**values, "v_id": "ver_" + "0" * 32})
        failures.append(conflict.value)
        # A value too long for its column (PostgreSQL refuses it; SQLite keeps it).
        long_number = "+3461234567899" * 30
        secrets.append(long_number.encode())
        try:
            await store.executor.run(
                q.INSERT_VERIFICATION, **{**values, "v_id": "ver_" + "1" * 32, "v_to": long_number}
            )
        except StorageError as exc:
            failures.append(exc)
        if database.backend == "postgres":
            assert len(failures) == 2
        for failure in failures:
            text_ = "".join(traceback.format_exception(failure))
            for chained in _chain(failure):
                text_ += str(chained) + repr(chained)
            for secret in secrets:
                assert secret.decode() not in text_
                assert secret.decode()[-9:] not in text_
    finally:
        await container.aclose()
