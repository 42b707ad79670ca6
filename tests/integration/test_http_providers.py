"""Verifications through the real app and the Twilio and Vonage stubs, on both databases: the
SMS reaches the stub with otpgate's receipt URL, and the provider's receipt at
``/v1/receipts/{provider}`` makes the message delivered, or is refused with 403 and changes
nothing when its token or (Twilio) its signature is wrong or missing.

The app is reached at ``http://t`` while ``OTPGATE_PUBLIC_URL`` says
``https://otp.example.com``, as behind a proxy: Twilio signs the public URL, and the endpoint
must check the signature against that, not against the URL it was reached at."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from otpgate.adapters.providers.twilio import TwilioSender
from otpgate.adapters.providers.vonage import VonageSender
from otpgate.bootstrap import build
from otpgate.domain.ports import Sender
from otpgate.entrypoints.api.app import create_app
from tests.conftest import Api, Database, FrozenClock, make_settings
from tests.support.twilio_stub import TwilioStub
from tests.support.vonage_stub import VonageStub

PUBLIC_URL = "https://otp.example.com"
NUMBER = "+15005550006"


@pytest.fixture(scope="module")
def twilio_stub() -> Iterator[TwilioStub]:
    with TwilioStub(numbers=(NUMBER,)) as stub:
        yield stub


@pytest.fixture(scope="module")
def vonage_stub() -> Iterator[VonageStub]:
    with VonageStub() as stub:
        yield stub


@contextlib.asynccontextmanager
async def app_with(database: Database, tmp_path: Path, sender: Sender) -> AsyncIterator[Api]:
    clock = FrozenClock()
    settings = make_settings(database, tmp_path, public_url=PUBLIC_URL)
    container = build(settings, route=(sender,), clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service()
            yield api


@pytest.fixture
async def twilio_api(
    database: Database, tmp_path: Path, twilio_stub: TwilioStub
) -> AsyncIterator[Api]:
    twilio_stub.reset()
    sender = TwilioSender(
        account_sid=twilio_stub.account_sid,
        auth_token=twilio_stub.auth_token,
        from_=NUMBER,
        base_url=twilio_stub.url,
    )
    async with app_with(database, tmp_path, sender) as api:
        yield api


@pytest.fixture
async def vonage_api(
    database: Database, tmp_path: Path, vonage_stub: VonageStub
) -> AsyncIterator[Api]:
    vonage_stub.reset()
    sender = VonageSender(
        api_key=vonage_stub.api_key,
        api_secret=vonage_stub.api_secret,
        from_="OtpGate",  # the test service has no sender id
        base_url=vonage_stub.url,
    )
    async with app_with(database, tmp_path, sender) as api:
        yield api


async def message_status(api: Api, vid: str) -> str:
    response = await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())
    status: str = response.json()["messages"][0]["status"]
    return status


def local(url: str) -> str:
    """The path and query of a public receipt URL: what the proxy hands the app."""
    parsed = httpx.URL(url)
    assert f"{parsed.scheme}://{parsed.host}" == PUBLIC_URL
    return parsed.raw_path.decode()


async def test_a_twilio_sms_is_delivered_by_its_signed_status_callback(
    twilio_api: Api, twilio_stub: TwilioStub
) -> None:
    vid = (await twilio_api.start()).json()["id"]
    await twilio_api.deliver()

    (message,) = twilio_stub.messages
    assert message.form["To"] == "+34600000001" and message.form["From"] == NUMBER
    assert message.status_callback is not None
    assert message.status_callback.startswith(f"{PUBLIC_URL}/v1/receipts/twilio?token=")
    assert await message_status(twilio_api, vid) == "sent"

    url, params, headers = twilio_stub.callback_request(message.sid, "sent")
    answer = await twilio_api.http.post(local(url), data=params, headers=headers)
    assert answer.status_code == 200
    assert await message_status(twilio_api, vid) == "sent"  # "sent" changes nothing

    url, params, headers = twilio_stub.callback_request(message.sid, "delivered")
    answer = await twilio_api.http.post(local(url), data=params, headers=headers)
    assert answer.status_code == 200, answer.text
    assert await message_status(twilio_api, vid) == "delivered"


async def test_a_twilio_callback_with_a_bad_signature_is_refused_and_changes_nothing(
    twilio_api: Api, twilio_stub: TwilioStub
) -> None:
    vid = (await twilio_api.start()).json()["id"]
    await twilio_api.deliver()
    (message,) = twilio_stub.messages
    url, params, headers = twilio_stub.callback_request(message.sid, "undelivered")
    path = local(url)

    attempts = [
        ({k: v for k, v in headers.items() if k != "X-Twilio-Signature"}, params),  # none
        ({**headers, "X-Twilio-Signature": "AAAA" + headers["X-Twilio-Signature"][4:]}, params),
        (headers, {**params, "MessageStatus": "delivered"}),  # a field changed after signing
    ]
    for sent_headers, sent_params in attempts:
        answer = await twilio_api.http.post(path, data=sent_params, headers=sent_headers)
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "forbidden"
        assert await message_status(twilio_api, vid) == "sent"

    # Signed over the URL the app was reached at (not the public one Twilio was given).
    internal = f"http://t{path}"
    from twilio.request_validator import RequestValidator

    signature = RequestValidator(twilio_stub.auth_token).compute_signature(internal, params)
    answer = await twilio_api.http.post(
        path, data=params, headers={**headers, "X-Twilio-Signature": signature}
    )
    assert answer.status_code == 403
    # A right signature without the URL's token is refused too (the token is checked first).
    answer = await twilio_api.http.post("/v1/receipts/twilio", data=params, headers=headers)
    assert answer.status_code == 403
    assert await message_status(twilio_api, vid) == "sent"

    answer = await twilio_api.http.post(path, data=params, headers=headers)
    assert answer.status_code == 200
    assert await message_status(twilio_api, vid) == "undelivered"


async def test_a_receipt_body_of_another_type_is_refused(
    twilio_api: Api, twilio_stub: TwilioStub
) -> None:
    await twilio_api.start()
    await twilio_api.deliver()
    (message,) = twilio_stub.messages
    url, _, _ = twilio_stub.callback_request(message.sid, "delivered")
    answer = await twilio_api.http.post(
        local(url), content=b"MessageSid", headers={"Content-Type": "text/plain"}
    )
    assert answer.status_code == 415
    answer = await twilio_api.http.post(
        local(url),
        content=b"\xff=\xfe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 400


async def test_a_vonage_sms_is_delivered_by_its_receipt(
    vonage_api: Api, vonage_stub: VonageStub
) -> None:
    vid = (await vonage_api.start()).json()["id"]
    await vonage_api.deliver()

    (sms,) = vonage_stub.sent
    assert sms.form["to"] == "34600000001" and sms.client_ref
    url, params = vonage_stub.receipt(sms.client_ref, "delivered")
    assert url.startswith(f"{PUBLIC_URL}/v1/receipts/vonage?token=")

    forged = await vonage_api.http.get("/v1/receipts/vonage", params=params)
    assert forged.status_code == 403
    assert await message_status(vonage_api, vid) == "sent"

    answer = await vonage_api.http.get(httpx.URL(local(url)).copy_merge_params(params))
    assert answer.status_code == 200
    assert await message_status(vonage_api, vid) == "delivered"


async def test_a_vonage_receipt_posted_as_json_is_read(
    vonage_api: Api, vonage_stub: VonageStub
) -> None:
    vid = (await vonage_api.start()).json()["id"]
    await vonage_api.deliver()
    (sms,) = vonage_stub.sent
    assert sms.client_ref
    url, params = vonage_stub.receipt(sms.client_ref, "rejected", err_code="4")

    answer = await vonage_api.http.post(local(url), json=params)

    assert answer.status_code == 200
    assert await message_status(vonage_api, vid) == "undelivered"
