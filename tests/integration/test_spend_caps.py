"""Daily spend caps per account and per service, on every backend, through the real app.

Without a price table each SMS part counts ``OTPGATE_DEFAULT_MESSAGE_CREDITS`` (1 by default);
with one, its price. A send that would pass a cap is refused with ``402 insufficient_credit``
whose detail names the cap, its limit and what the day has spent, on ``/v1/verifications``,
``/v1/messages``, ``/json/send`` (35) and ``/otp/sendCode`` (0), and stores and sends nothing;
the first refusal of a cap on a UTC day raises one ``spend_cap.reached`` event. The next UTC
day sends pass again. Concurrent sends against a cap are accepted exactly as far as it goes. A
message that fails before reaching the network gives its amount back to the caps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from otpgate.bootstrap import build
from otpgate.domain.model import OutboundMessage, SendReceipt
from otpgate.domain.ports import Event
from otpgate.entrypoints.api.app import create_app
from otpgate.errors import PermanentDeliveryError
from otpgate.settings import Settings
from tests.conftest import Api, Database, FrozenClock, RecordingSender, make_settings

MOBILES = [f"+3460000{n:04d}" for n in range(1, 60)]


class RecordingEvents:
    """An EventSink that keeps what it was given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> None:
        self.events.append(event)


class RefusingSender(RecordingSender):
    """A provider that refuses every message for good (an invalid route)."""

    async def send(self, sms: OutboundMessage) -> SendReceipt:
        raise PermanentDeliveryError("refused by the test provider")


@contextlib.asynccontextmanager
async def capped_app(
    settings: Settings, database: Database, sender: RecordingSender | None = None
) -> AsyncIterator[tuple[Api, RecordingEvents]]:
    clock = FrozenClock()
    sender = sender or RecordingSender()
    events = RecordingEvents()
    container = build(settings, sender=sender, clock=clock, events=events)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://otpgate.test") as http:
            api = Api(http, container, sender, clock, issued.secret, account.id, "", database)
            api.service_id = await api.new_service()
            yield api, events


@pytest.fixture
async def capped(database: Database, tmp_path: Path) -> AsyncIterator[tuple[Api, RecordingEvents]]:
    async with capped_app(make_settings(database, tmp_path), database) as running:
        yield running


async def service_cap(api: Api, credits: str | None) -> None:
    response = await api.http.patch(
        f"/v1/services/{api.service_id}", json={"daily_spend_cap": credits}, headers=api.auth()
    )
    assert response.status_code == 200, response.text
    assert response.json()["daily_spend_cap"] == credits


async def account_cap(api: Api, credits: str | None) -> dict[str, Any]:
    response = await api.http.patch(
        f"/v1/accounts/{api.account_id}", json={"daily_spend_cap": credits}, headers=api.auth()
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def count(api: Api, table: str) -> int:
    async with api.database.sql() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())  # noqa: S608


async def test_a_service_cap_refuses_past_it_and_raises_its_event_once(
    capped: tuple[Api, RecordingEvents],
) -> None:
    api, events = capped
    await service_cap(api, "2")
    for to in MOBILES[:2]:
        assert (await api.start(to)).status_code == 201
    refused = await api.start(MOBILES[2])
    assert refused.status_code == 402
    problem = refused.json()
    assert problem["code"] == "insufficient_credit"
    assert problem["detail"].startswith(
        "the service's daily spend cap of 2 credits is reached: 2 spent on 2026-11-27 (UTC)"
    )
    assert (await api.start(MOBILES[3])).status_code == 402
    await api.deliver()
    assert sorted(s.to for s in api.sender.sent) == MOBILES[:2]
    assert await count(api, "verifications") == 2 and await count(api, "messages") == 2
    assert [(e.type, e.account_id, e.service_id, dict(e.data)) for e in events.events] == [
        (
            "spend_cap.reached",
            api.account_id,
            api.service_id,
            {"cap": "service", "limit": "2", "spent": "2", "day": "2026-11-27"},
        )
    ]
    # another service of the account is not capped by this one
    other = await api.new_service(name="Other")
    started = await api.http.post(
        "/v1/verifications", json={"service_id": other, "to": MOBILES[5]}, headers=api.auth()
    )
    assert started.status_code == 201
    # the next UTC day starts from nothing
    api.clock.current = api.clock.current.replace(hour=0, minute=0) + timedelta(days=1)
    assert (await api.start(MOBILES[6])).status_code == 201
    # a cap raised applies at once
    await service_cap(api, "5")


async def test_an_account_cap_covers_every_surface(capped: tuple[Api, RecordingEvents]) -> None:
    api, events = capped
    shown = await account_cap(api, "1")
    assert shown["daily_spend_cap"] == "1"
    assert (await api.start(MOBILES[0])).status_code == 201
    refused = await api.start(MOBILES[1])
    assert (refused.status_code, refused.json()["code"]) == (402, "insufficient_credit")
    assert "the account's daily spend cap of 1 credits" in refused.json()["detail"]
    message = await api.http.post(
        "/v1/messages", json={"to": MOBILES[2], "text": "Hello"}, headers=api.auth()
    )
    assert (message.status_code, message.json()["code"]) == (402, "insufficient_credit")
    basic = {
        "Authorization": "Basic "
        + base64.b64encode(f"{api.account_id}:{api.key}".encode()).decode()
    }
    json_send = await api.http.post(
        "/json/send",
        json={"message": "Hello", "recipient": [{"msisdn": MOBILES[3][1:]}]},
        headers=basic,
    )
    assert json_send.json()["code"] == "35"
    otp = await api.http.get(
        "/otp/sendCode", params={"env": "Acme", "phone_number": MOBILES[4][1:]}, headers=basic
    )
    assert (otp.text, otp.headers["x-otpgate-error"]) == ("0", "insufficient_credit")
    await api.deliver()
    assert [s.to for s in api.sender.sent] == [MOBILES[0]]
    assert await count(api, "messages") == 1
    assert [(e.type, e.data["cap"]) for e in events.events] == [("spend_cap.reached", "account")]
    # removing the cap lets sends through again
    assert (await account_cap(api, None))["daily_spend_cap"] is None
    assert (await api.start(MOBILES[1])).status_code == 201


async def test_with_a_price_table_the_cap_counts_prices(
    capped: tuple[Api, RecordingEvents],
) -> None:
    api, _ = capped
    await api.container.billing.import_prices("country,credits\nES,0.4\n")
    await service_cap(api, "1")
    assert (await api.start(MOBILES[0])).status_code == 201
    assert (await api.start(MOBILES[1])).status_code == 201
    refused = await api.start(MOBILES[2])  # 0.8 spent, 0.4 more would pass 1
    assert refused.status_code == 402
    assert "cap of 1 credits is reached: 0.8 spent" in refused.json()["detail"]


async def test_the_default_price_per_part_is_a_setting(database: Database, tmp_path: Path) -> None:
    settings = make_settings(database, tmp_path, default_message_credits="0.5")
    async with capped_app(settings, database) as (api, _):
        await service_cap(api, "1")
        assert (await api.start(MOBILES[0])).status_code == 201
        assert (await api.start(MOBILES[1])).status_code == 201
        assert (await api.start(MOBILES[2])).status_code == 402


async def test_concurrent_sends_against_a_cap_accept_exactly_what_fits(
    capped: tuple[Api, RecordingEvents],
) -> None:
    api, events = capped
    await service_cap(api, "10")
    # twenty numbers of one prefix: lift the prefix rate limit so that only the cap refuses
    lifted = await api.http.patch(
        f"/v1/services/{api.service_id}",
        json={"rate_limits": {"per_prefix": {"limit": 100, "window_seconds": 600}}},
        headers=api.auth(),
    )
    assert lifted.status_code == 200
    answers = await asyncio.gather(*(api.start(to) for to in MOBILES[:20]))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * 10 + [402] * 10
    assert await count(api, "verifications") == 10
    async with api.database.sql() as conn:
        spent = (await conn.execute(text("SELECT spent_units FROM spend_counters"))).scalar_one()
    assert spent == 10 * 10_000
    assert len(events.events) == 1


async def test_a_message_that_fails_before_the_network_gives_its_room_back(
    database: Database, tmp_path: Path
) -> None:
    async with capped_app(make_settings(database, tmp_path), database, RefusingSender()) as (
        api,
        _,
    ):
        await service_cap(api, "1")
        first = await api.start(MOBILES[0])
        assert first.status_code == 201
        assert (await api.start(MOBILES[1])).status_code == 402
        await api.deliver()  # refused for good: the message fails and is refunded
        shown = await api.http.get(f"/v1/verifications/{first.json()['id']}", headers=api.auth())
        assert shown.json()["messages"][0]["status"] == "failed"
        assert (await api.start(MOBILES[1])).status_code == 201


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"daily_spend_cap": "-1"}, "daily_spend_cap"),
        ({"daily_spend_cap": "1.00001"}, "daily_spend_cap"),
        ({"daily_spend_cap": 5}, "daily_spend_cap"),
        ({"name": "x"}, "name"),
    ],
)
async def test_bad_caps_are_refused_and_change_nothing(
    capped: tuple[Api, RecordingEvents], body: dict[str, Any], param: str
) -> None:
    api, _ = capped
    account = await api.http.patch(f"/v1/accounts/{api.account_id}", json=body, headers=api.auth())
    assert (account.status_code, account.json()["code"], account.json()["param"]) == (
        400,
        "invalid_request",
        param,
    )
    if param == "daily_spend_cap":
        service = await api.http.patch(
            f"/v1/services/{api.service_id}", json=body, headers=api.auth()
        )
        assert (service.status_code, service.json()["param"]) == (400, param)
    shown = await api.http.get("/v1/account", headers=api.auth())
    assert shown.json()["daily_spend_cap"] is None
    service_now = await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())
    assert service_now.json()["daily_spend_cap"] is None


async def test_only_an_admin_sets_an_account_cap(capped: tuple[Api, RecordingEvents]) -> None:
    api, _ = capped
    other = await api.container.access.create_account("Shop")
    key = (await api.container.access.create_key(other.id, name="k")).secret
    own = await api.http.patch(
        f"/v1/accounts/{other.id}",
        json={"daily_spend_cap": None},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert (own.status_code, own.json()["code"]) == (403, "forbidden")
    missing = await api.http.patch(
        "/v1/accounts/acc_nothing", json={"daily_spend_cap": "1"}, headers=api.auth()
    )
    assert missing.status_code == 404
    set_ = await api.http.patch(
        f"/v1/accounts/{other.id}", json={"daily_spend_cap": "7.5"}, headers=api.auth()
    )
    assert set_.json()["daily_spend_cap"] == "7.5"


async def test_an_account_cap_change_is_in_the_audit_log(
    capped: tuple[Api, RecordingEvents],
) -> None:
    api, _ = capped
    await account_cap(api, "2.5")
    api.clock.current += timedelta(seconds=1)  # "newest first" by time
    await account_cap(api, None)
    refused = await api.http.patch(
        f"/v1/accounts/{api.account_id}", json={"daily_spend_cap": "-1"}, headers=api.auth()
    )
    assert refused.status_code == 400

    audit = await api.http.get(
        "/v1/audit", params={"action": "account.updated"}, headers=api.auth()
    )
    assert audit.status_code == 200, audit.text
    entries = audit.json()["data"]
    assert [(e["target"], e["before"], e["after"]) for e in entries] == [
        (api.account_id, {"daily_spend_cap": "2.5"}, {"daily_spend_cap": None}),
        (api.account_id, {"daily_spend_cap": None}, {"daily_spend_cap": "2.5"}),
    ]  # newest first; the refused change left nothing
    assert all(e["actor"].startswith("key_") for e in entries)
