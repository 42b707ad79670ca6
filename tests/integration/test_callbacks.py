"""Delivery reports forwarded to the caller's ``ackurl``, on both backends: a plain SMS sent
with an ``ackurl`` through the real LabsMobile sender (to the loopback stub), the provider's
report applied, and otpgate's GET of the caller's URL with LabsMobile's ack parameters retried
while the caller's receiver is down, then delivered once it is back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from sqlalchemy import text

from otpgate.adapters.providers.labsmobile import LabsMobileSender
from otpgate.bootstrap import build
from otpgate.domain.model import Principal
from otpgate.entrypoints.api.app import create_app
from otpgate.services.messaging import SmsRequest
from tests.conftest import Database, FrozenClock, make_settings
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import free_port


class AckReceiver:
    """The caller's ack endpoint on loopback: down (nothing listens) until started."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.failing = 0  # answer 503 to this many calls first
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.failing:
            self.failing -= 1
            return web.Response(status=503)
        self.calls.append(dict(request.query))
        return web.Response(text="OK")

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/ack", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub() as running:
        yield running


@pytest.fixture
async def receiver() -> AsyncIterator[AckReceiver]:
    ack = AckReceiver()
    yield ack
    await ack.stop()


async def test_a_report_reaches_the_callers_ackurl_once_after_it_comes_back(
    database: Database, tmp_path: Path, stub: LabsMobileStub, receiver: AckReceiver
) -> None:
    stub.reset()
    clock = FrozenClock()
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    container = build(make_settings(database, tmp_path), sender=sender, clock=clock)
    app = create_app(container, run_dispatcher=False)
    port = free_port()
    async with app.router.lifespan_context(app):
        account, _ = await container.access.ensure_default_account()
        principal = Principal(account=account, key_id="test")
        (message,) = await container.messaging.send(
            principal,
            SmsRequest(
                to=["+34600000001"],
                text="Your parcel is on its way",
                client_ref="order-77",
                ack_url=f"http://127.0.0.1:{port}/ack?account=shop",
            ),
        )
        await container.dispatcher.drain()
        (sent,) = stub.messages
        assert sent.body["message"] == "Your parcel is on its way"
        # The provider reports delivery to otpgate's receipt URL.
        receipt_url, params = stub.report_params(sent.body["subid"], "DELIVRD")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            path = httpx.URL(receipt_url).raw_path.decode()
            answer = await http.get(httpx.URL(path).copy_merge_params(params))
            assert answer.status_code == 200
            again = await http.get(httpx.URL(path).copy_merge_params(params))
            assert again.status_code == 200  # a repeated report is acknowledged, owes nothing

        # The caller's receiver is down: nothing listens on its port.
        assert await container.callbacks.send_due() == 1
        assert await container.callbacks.send_due() == 0  # not due again before its backoff
        clock.advance(7)  # past the first backoff (5 s and up to 25 % jitter)
        await receiver.start(port)
        receiver.failing = 1  # back, but its first answer is a 503
        assert await container.callbacks.send_due() == 1
        assert receiver.calls == []
        clock.advance(13)  # past the second backoff (10 s and jitter)
        assert await container.callbacks.send_due() == 1
        clock.advance(3600)
        assert await container.callbacks.send_due() == 0  # delivered: never called again

    (call,) = receiver.calls
    assert call["account"] == "shop"  # the caller's own query is kept
    assert call["subid"] == "order-77" and call["msisdn"] == "34600000001"
    assert (call["acklevel"], call["desc"], call["status"]) == ("handset", "DELIVRD", "ok")
    assert call["timestamp"].startswith("2026-11-27 12:00")
    assert message.ack_url is not None


async def test_a_callback_that_keeps_failing_is_given_up_after_a_day(
    database: Database, tmp_path: Path, stub: LabsMobileStub
) -> None:
    stub.reset()
    clock = FrozenClock()
    sender = LabsMobileSender(username=stub.username, token=stub.token, base_url=stub.url)
    container = build(make_settings(database, tmp_path), sender=sender, clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, _ = await container.access.ensure_default_account()
        await container.messaging.send(
            Principal(account=account, key_id="test"),
            SmsRequest(to=["+34600000001"], text="Hi", ack_url=f"http://127.0.0.1:{free_port()}/"),
        )
        await container.dispatcher.drain()
        receipt_url, params = stub.report_params(stub.messages[0].body["subid"], "UNDELIV")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            path = httpx.URL(receipt_url).raw_path.decode()
            await http.get(httpx.URL(path).copy_merge_params(params))
        tries = 0
        while await container.callbacks.send_due():
            tries += 1
            clock.advance(800)  # past the longest backoff (10 minutes and up to 25 % jitter)
        # Given up once the next try would fall more than a day after the report: about a day
        # of tries 10 minutes apart, after the first short ones.
        assert 100 < tries < 130
        async with database.sql() as conn:
            rows = (await conn.execute(text("SELECT status, attempts FROM callbacks"))).all()
        assert [(status, attempts) for status, attempts in rows] == [("failed", tries)]
        clock.advance(86_400)
        assert await container.callbacks.send_due() == 0
