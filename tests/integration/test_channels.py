"""Voice and e-mail channels and channel fallback, through the real app on every backend.

The providers here are fakes of *other people's* services (an SMS gateway, a voice API, a mail
server), each carrying one channel and failing when told to; the dispatcher, the storage and the
API under test are otpgate's own. The same flows against Twilio's stub and a real SMTP server are
in the providers' own tests.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otpgate.bootstrap import build
from otpgate.domain.model import Channel, OutboundMessage, SendReceipt
from otpgate.entrypoints.api.app import create_app
from otpgate.errors import PermanentDeliveryError
from tests.conftest import Api, Database, FrozenClock, make_settings


class FakeProvider:
    """Someone else's service carrying one channel: keeps what it was given; ``refuse`` makes
    every send fail for good (a number it can never reach)."""

    def __init__(self, name: str, channel: Channel) -> None:
        self.name = name
        self.channels = frozenset({channel})
        self.sent: list[OutboundMessage] = []
        self.refuse = False

    async def send(self, message: OutboundMessage) -> SendReceipt:
        if self.refuse:
            raise PermanentDeliveryError(f"{self.name}: destination unreachable")
        self.sent.append(message)
        return SendReceipt(provider_ref=message.message_id)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def spoken_code(text: str) -> str:
    """The code a call spells out (``4, 0, 7, 2``), said twice: both times the same."""
    spelled = re.findall(r"((?:[0-9A-Z], )+[0-9A-Z])\.", text)
    assert len(spelled) == 2 and spelled[0] == spelled[1], text
    return spelled[0].replace(", ", "")


def mailed_code(message: OutboundMessage) -> str:
    assert message.email is not None
    match = re.search(r"^([0-9A-Z]{4,10})$", message.text, re.MULTILINE)
    assert match, message.text
    assert match.group(1) in message.email.html
    return match.group(1)


@contextlib.asynccontextmanager
async def channel_app(
    database: Database, tmp_path: Path, **service: Any
) -> AsyncIterator[tuple[Api, FakeProvider, FakeProvider, FakeProvider]]:
    sms = FakeProvider("gateway", Channel.SMS)
    voice = FakeProvider("voiceapi", Channel.VOICE)
    mail = FakeProvider("mailer", Channel.EMAIL)
    clock = FrozenClock()
    container = build(make_settings(database, tmp_path), route=[sms, voice, mail], clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service(channels=["sms", "voice", "email"], **service)
            yield api, sms, voice, mail


async def verification(api: Api, vid: str) -> dict[str, Any]:
    response = await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def test_a_failed_sms_falls_back_to_voice_then_email_with_the_same_code(
    database: Database, tmp_path: Path
) -> None:
    async with channel_app(database, tmp_path) as (api, sms, voice, mail):
        sms.refuse = True
        voice.refuse = True
        started = await api.start("+34600000001", locale="es", email="ana@Example.COM")
        assert started.status_code == 201, started.text
        vid = started.json()["id"]
        await api.deliver()

        assert sms.sent == [] and voice.sent == []
        (mailed,) = mail.sent
        assert mailed.to == "ana@example.com"
        assert mailed.channel is Channel.EMAIL and mailed.locale == "es"
        code = mailed_code(mailed)
        body = await verification(api, vid)
        assert body["status"] == "pending" and body["channel"] == "email"
        # (The frozen clock gives the three messages one creation time, so their order in the
        # list says nothing here.)
        assert {m["channel"]: m["status"] for m in body["messages"]} == {
            "sms": "failed",
            "voice": "failed",
            "email": "sent",
        }
        assert body["send_attempts"] == 1  # fallbacks are not resends
        check = await api.check(vid, code)
        assert check.json()["valid"] is True


async def test_a_failed_sms_falls_back_to_a_call_in_the_users_language(
    database: Database, tmp_path: Path
) -> None:
    async with channel_app(database, tmp_path) as (api, sms, voice, mail):
        sms.refuse = True
        vid = (await api.start("+34600000002", locale="de")).json()["id"]
        await api.deliver()
        (call,) = voice.sent
        assert call.to == "+34600000002" and call.locale == "de" and call.sms is None
        assert "Ich wiederhole" in call.text
        assert (await api.check(vid, spoken_code(call.text))).json()["valid"] is True
        assert mail.sent == []  # the call went out: no further channel


async def test_every_channel_failing_fails_the_verification(
    database: Database, tmp_path: Path
) -> None:
    async with channel_app(database, tmp_path) as (api, sms, voice, mail):
        sms.refuse = voice.refuse = True
        vid = (await api.start("+34600000003")).json()["id"]  # no e-mail address given
        await api.deliver()
        body = await verification(api, vid)
        assert body["status"] == "failed"
        assert sorted(m["channel"] for m in body["messages"]) == ["sms", "voice"]
        assert mail.sent == []


async def test_no_check_in_time_moves_to_the_next_channel_once(
    database: Database, tmp_path: Path
) -> None:
    async with channel_app(database, tmp_path, fallback_after_seconds=60) as (
        api,
        sms,
        voice,
        mail,
    ):
        vid = (await api.start("+34600000004", email="ana@example.com")).json()["id"]
        await api.deliver()
        (texted,) = sms.sent
        api.clock.advance(59)
        await api.deliver()
        assert voice.sent == []
        api.clock.advance(1)
        await api.deliver()
        (call,) = voice.sent
        assert spoken_code(call.text) == re.findall(r"\d{6}", texted.text)[0]
        api.clock.advance(60)
        await api.deliver()
        (mailed,) = mail.sent
        assert mailed_code(mailed) == spoken_code(call.text)
        api.clock.advance(600)
        await api.deliver()
        assert len(sms.sent) == len(voice.sent) == len(mail.sent) == 1  # each channel once
        body = await verification(api, vid)
        assert [m["channel"] for m in body["messages"]] == ["sms", "voice", "email"]

        # An approved verification does not move on.
        vid = (await api.start("+34600000005", email="ana@example.com")).json()["id"]
        await api.deliver()
        assert (await api.check(vid, re.findall(r"\d{6}", sms.sent[-1].text)[0])).json()["valid"]
        api.clock.advance(120)
        await api.deliver()
        assert len(voice.sent) == 1


async def test_a_start_by_voice_or_email(database: Database, tmp_path: Path) -> None:
    async with channel_app(database, tmp_path) as (api, sms, voice, mail):
        by_voice = await api.start("+34910000000", channel="voice")  # a fixed line: callable
        assert by_voice.status_code == 201, by_voice.text
        by_mail = await api.start("Ana@Example.com", channel="email")
        assert by_mail.status_code == 201, by_mail.text
        assert by_mail.json()["to"] == "Ana@example.com"
        await api.deliver()
        assert [m.to for m in voice.sent] == ["+34910000000"]
        assert [m.to for m in mail.sent] == ["Ana@example.com"]
        assert sms.sent == []
        message = by_mail.json()["messages"][0]
        assert (message["channel"], message["encoding"], message["price"]) == (
            "email",
            "UTF-8",
            None,
        )
        checked = await api.http.post(
            "/v1/verifications/check",
            json={
                "service_id": api.service_id,
                "to": "Ana@example.com",
                "code": mailed_code(mail.sent[0]),
            },
            headers=api.auth(),
        )
        assert checked.json()["valid"] is True


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"channel": "email", "to": "not-an-address"}, "to"),
        ({"channel": "email", "to": "ana@@example.com"}, "to"),
        ({"channel": "email", "to": "ana@exa mple.com"}, "to"),
        ({"channel": "email", "to": "ana\u0000@example.com"}, "to"),
        ({"email": "ana@localhost"}, "email"),
        ({"email": "a" * 250 + "@example.com"}, "email"),
        ({"email": 12}, "email"),
        ({"channel": "voice", "context": {"amount": "10 EUR"}}, "channel"),
        ({"channel": "voice", "to": "+34900123456"}, "to"),  # toll free: never called
    ],
)
async def test_bad_channel_input_is_refused_and_stores_nothing(
    database: Database, tmp_path: Path, fields: dict[str, Any], param: str
) -> None:
    async with channel_app(database, tmp_path) as (api, sms, voice, mail):
        body = {"service_id": api.service_id, "to": "+34600000009", **fields}
        response = await api.http.post("/v1/verifications", json=body, headers=api.auth())
        assert response.status_code in (400, 422), response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json().get("param") == param or param in response.text
        listed = await api.http.get("/v1/verifications", headers=api.auth())
        assert listed.json()["data"] == []
        await api.deliver()
        assert sms.sent == voice.sent == mail.sent == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"fallback_after_seconds": 5}, "from 10 to 3600"),
        ({"fallback_after_seconds": "60"}, "integer"),
        ({"fallback_after_seconds": 600, "ttl_seconds": 600}, "shorter than ttl_seconds"),
    ],
)
async def test_a_bad_fallback_delay_is_refused(
    database: Database, tmp_path: Path, fields: dict[str, Any], message: str
) -> None:
    async with channel_app(database, tmp_path) as (api, _, _, _):
        response = await api.http.post(
            "/v1/services", json={"name": "Acme", **fields}, headers=api.auth()
        )
        assert response.status_code == 400, response.text
        assert response.json()["param"] == "fallback_after_seconds"
        assert message in response.json()["detail"]
        shown = await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())
        assert shown.json()["fallback_after_seconds"] is None
