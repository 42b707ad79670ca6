"""A real otpgate configured with ``OTPGATE_SMS_PROVIDER=smpp`` against node-smpp's SMSC
(``tests/node/smsc.mjs``), on SQLite and PostgreSQL: a verification's SMS reaches the SMSC
with the right data_coding, source and destination, a Greek or Russian text arrives as UCS-2,
and the SMSC's ``deliver_sm`` receipt turns the message ``delivered``.

The dispatcher is driven by the test (``Api.deliver``); the receipt comes on the bind by
itself, through the sink bootstrap attached to the SMPP sender."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otpgate.bootstrap import build
from otpgate.entrypoints.api.app import create_app
from tests.conftest import Api, Database, FrozenClock, code_in, make_settings
from tests.support.smsc import Smsc, smsc_missing

_missing = smsc_missing()
if _missing is not None and os.environ.get("CI"):
    raise RuntimeError(_missing)
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

PASSWORD = "s3cr3t"


@pytest.fixture(scope="module")
def smsc_server() -> Iterator[Smsc]:
    with Smsc(password=PASSWORD, receipt_delay_ms=50) as smsc:
        yield smsc


@pytest.fixture
def smsc(smsc_server: Smsc) -> Iterator[Smsc]:
    smsc_server.receipts(enabled=True, stat="DELIVRD", tlvs=True, delay_ms=50)
    smsc_server.clear()
    return smsc_server


@contextlib.asynccontextmanager
async def smpp_app(
    database: Database, tmp_path: Path, smsc: Smsc, **service: Any
) -> AsyncIterator[Api]:
    settings = make_settings(
        database, tmp_path, sms_provider="smpp", smpp_url=smsc.url("window=10")
    )
    clock = FrozenClock()
    container = build(settings, clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://otpgate.test") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service(**{"sender_id": "Acme", **service})
            yield api


async def message_status(api: Api, verification_id: str, want: str) -> dict[str, Any]:
    """The verification once its first message has status ``want`` (within 10 s)."""
    body: dict[str, Any] = {}
    for _ in range(500):
        response = await api.http.get(f"/v1/verifications/{verification_id}", headers=api.auth())
        body = response.json()
        if body["messages"] and body["messages"][0]["status"] == want:
            return body
        await asyncio.sleep(0.02)
    raise AssertionError(f"message never became {want}: {body.get('messages')}")


async def test_a_verification_reaches_the_smsc_and_its_receipt_delivers_it(
    database: Database, tmp_path: Path, smsc: Smsc
) -> None:
    async with smpp_app(database, tmp_path, smsc) as api:
        started = await api.start(to="+34600000001")
        assert started.status_code == 201, started.text
        vid = started.json()["id"]
        await api.deliver()

        (submit,) = smsc.accepted()
        assert submit["data_coding"] == 0
        assert (submit["source_addr"], submit["source_addr_ton"], submit["source_addr_npi"]) == (
            "Acme",
            5,
            0,
        )
        assert (submit["destination_addr"], submit["dest_addr_ton"], submit["dest_addr_npi"]) == (
            "34600000001",
            1,
            1,
        )
        assert submit["registered_delivery"] == 1
        code = code_in(submit["text"])

        body = await message_status(api, vid, "delivered")
        assert body["status"] == "pending"
        checked = await api.check(vid, code)
        assert checked.json()["valid"] is True
    smsc.sync()
    assert [r["command_status"] for r in smsc.records("deliver_sm_resp")] == [0]


@pytest.mark.parametrize(("locale", "script"), [("el", "Greek"), ("ru", "Russian")])
async def test_a_greek_or_russian_text_arrives_as_ucs2(
    database: Database, tmp_path: Path, smsc: Smsc, locale: str, script: str
) -> None:
    templates = {
        "Greek": "Ο κωδικός σας για {brand} είναι {code}",
        "Russian": "Ваш код для {brand}: {code}",
    }
    async with smpp_app(database, tmp_path, smsc, templates={locale: templates[script]}) as api:
        started = await api.start(to="+306900000001", locale=locale)
        assert started.status_code == 201, started.text
        vid = started.json()["id"]
        await api.deliver()

        (submit,) = smsc.accepted()
        assert submit["data_coding"] == 8
        code = code_in(submit["text"])
        assert submit["text"] == templates[script].format(brand="Acme", code=code)
        assert submit["destination_addr"] == "306900000001"
        await message_status(api, vid, "delivered")


async def test_an_undelivered_receipt_marks_the_message_undelivered(
    database: Database, tmp_path: Path, smsc: Smsc
) -> None:
    smsc.receipts(stat="UNDELIV", err="001", tlvs=False)
    async with smpp_app(database, tmp_path, smsc) as api:
        started = await api.start(to="+34600000002")
        vid = started.json()["id"]
        await api.deliver()
        await message_status(api, vid, "undelivered")
