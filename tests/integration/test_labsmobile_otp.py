"""LabsMobile's OTP API (``/otp/sendCode``, ``resendCode``, ``validateCode``, ``checkCode``)
through plain HTTP: in process on SQLite and PostgreSQL, and against ``otpgate serve`` sending
through the LabsMobile provider to its loopback stub.

The contract: query parameters, HTTP Basic ``username:API key``, ``text/plain`` ``1`` or ``0``;
every ``0`` says why in ``X-Otpgate-Error`` (and ``X-Otpgate-Param``); bad credentials ``401``
with ``WWW-Authenticate: Basic``; storage down ``503``. A refusal sends nothing and stores
nothing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otpgate.bootstrap import build
from otpgate.entrypoints.api.app import create_app
from otpgate.settings import Settings
from tests.conftest import (
    TEST_SECRET,
    Api,
    Database,
    RecordingSender,
    make_settings,
    serving,
)
from tests.support.labsmobile_stub import LabsMobileStub
from tests.support.server import Server, running_server

MOBILE = "34600000001"
PROBLEM = "application/problem+json"


def basic(username: str, key: str) -> dict[str, str]:
    token = base64.b64encode(f"{username}:{key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def otp(api: Api, operation: str, **params: Any) -> httpx.Response:
    """One call of the OTP API with the default account's username and key."""
    return await api.http.get(
        f"/otp/{operation}", params=params, headers=basic(api.account_id, api.key)
    )


async def otp_raw(api: Api, operation: str, query: str) -> httpx.Response:
    """A call whose query string is sent exactly as written (percent-encoded bytes and all)."""
    return await api.http.get(f"/otp/{operation}?{query}", headers=basic(api.account_id, api.key))


def assert_one(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "1", response.headers.get("x-otpgate-error")
    assert "x-otpgate-error" not in response.headers


def assert_zero(response: httpx.Response, reason: str, param: str | None = None) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert (response.text, response.headers.get("x-otpgate-error")) == ("0", reason)
    assert response.headers.get("x-otpgate-param") == param


def code_of(text: str, template: str) -> str:
    """The code in ``text``, rendered from a LabsMobile ``template`` with ``%CODE%`` once."""
    before, _, after = template.partition("%CODE%")
    assert text.startswith(before) and text.endswith(after), text
    return text[len(before) : len(text) - len(after)]


def wrong(code: str) -> str:
    return code[:-1] + str((int(code[-1]) + 1) % 10)


async def sent_code(api: Api, to: str = MOBILE, **params: Any) -> str:
    """sendCode, deliver, and the code the phone received."""
    template = params.setdefault("message", "Your code is %CODE%. Do not share it.")
    params.setdefault("digits", 10)  # two codes of one test never collide by chance
    assert_one(await otp(api, "sendCode", phone_number=to, **params))
    await api.deliver()
    last = api.sender.sent[-1]
    assert last.to == "+" + to
    return code_of(last.text, template)


async def services_named(api: Api, name: str) -> list[dict[str, Any]]:
    listed = await api.http.get("/v1/services", params={"limit": 200}, headers=api.auth())
    return [s for s in listed.json()["data"] if s["name"] == name]


async def verifications(api: Api) -> list[dict[str, Any]]:
    """Every verification of the account, oldest first."""
    listed = await api.http.get("/v1/verifications", params={"limit": 200}, headers=api.auth())
    return list(reversed(listed.json()["data"]))


# --- the acceptance flow ------------------------------------------------------------------------


async def test_send_validate_check_and_the_same_code_again(api: Api) -> None:
    template = "Acme: your code is %CODE%"
    assert_one(
        await otp(
            api,
            "sendCode",
            env="login",
            sender="Acme",
            phone_number=MOBILE,
            message=template,
            digits=6,
        )
    )
    await api.deliver()
    (sms,) = api.sender.sent
    assert sms.to == "+34600000001"
    assert sms.sms is not None and sms.sms.sender_id == "Acme"
    code = code_of(sms.text, template)
    assert re.fullmatch(r"[0-9]{6}", code)

    check = {"env": "login", "phone_number": MOBILE}
    assert_zero(await otp(api, "checkCode", **check), "pending")
    assert_zero(await otp(api, "validateCode", code=wrong(code), **check), "invalid_code", "code")
    assert_zero(await otp(api, "checkCode", **check), "pending")
    assert_one(await otp(api, "validateCode", code=code, **check))
    assert_one(await otp(api, "checkCode", **check))
    assert_zero(await otp(api, "validateCode", code=code, **check), "approved")
    assert_one(await otp(api, "checkCode", **check))
    assert len(api.sender.sent) == 1

    # env is a service of the account, managed through /v1 like any other.
    (service,) = await services_named(api, "login")
    (verification,) = await verifications(api)
    assert verification["service_id"] == service["id"]
    assert verification["status"] == "approved" and verification["check_attempts"] == 1


async def test_resend_sends_the_same_code_within_the_services_rules(api: Api) -> None:
    code = await sent_code(api, env="login")
    assert_zero(await otp(api, "resendCode", env="login", phone_number=MOBILE), "resend_too_soon")
    api.clock.advance(30)  # the service's resend interval
    # sendCode's other parameters are accepted and not used: the text is the first one's.
    assert_one(await otp(api, "resendCode", env="login", phone_number=MOBILE, message="X %CODE%"))
    await api.deliver()
    first, second = api.sender.sent
    assert second.text == first.text and second.to == first.to
    assert_one(await otp(api, "validateCode", env="login", phone_number=MOBILE, code=code))
    (verification,) = await verifications(api)
    assert verification["send_attempts"] == 2

    # Nothing pending any more, another number, another env: nothing to send again.
    api.clock.advance(30)
    assert_zero(await otp(api, "resendCode", env="login", phone_number=MOBILE), "not_found")
    assert_zero(await otp(api, "resendCode", env="login", phone_number="34600000002"), "not_found")
    assert_zero(await otp(api, "resendCode", env="other", phone_number=MOBILE), "not_found", "env")
    await api.deliver()
    assert len(api.sender.sent) == 2
    assert await services_named(api, "other") == []


async def test_resend_answers_retry_after_while_too_soon(api: Api) -> None:
    await sent_code(api)
    api.clock.advance(12)
    response = await otp(api, "resendCode", phone_number=MOBILE)
    assert_zero(response, "resend_too_soon")
    assert response.headers["retry-after"] == "18"


async def test_a_second_send_makes_the_first_code_worthless(api: Api) -> None:
    first = await sent_code(api, env="login")
    # The resend interval holds for a new code too, so sendCode cannot flood a phone.
    assert_zero(
        await otp(api, "sendCode", env="login", phone_number=MOBILE, message="%CODE%"),
        "resend_too_soon",
    )
    api.clock.advance(30)
    second = await sent_code(api, env="login")
    assert first != second
    check = {"env": "login", "phone_number": MOBILE}
    assert_zero(await otp(api, "validateCode", code=first, **check), "invalid_code", "code")
    assert_one(await otp(api, "validateCode", code=second, **check))
    old, new = await verifications(api)
    assert old["status"] == "canceled" and new["status"] == "approved"
    # The new code carries the send count over: the cap is per process, not per code.
    assert new["send_attempts"] == 2 and new["check_attempts"] == 1


async def test_the_send_cap_of_the_service_carries_over_to_new_codes(api: Api) -> None:
    await sent_code(api, env="login")
    (service,) = await services_named(api, "login")
    patched = await api.http.patch(
        f"/v1/services/{service['id']}", json={"max_send_attempts": 2}, headers=api.auth()
    )
    assert patched.status_code == 200
    api.clock.advance(30)
    await sent_code(api, env="login")
    api.clock.advance(30)
    assert_zero(
        await otp(api, "sendCode", env="login", phone_number=MOBILE, message="%CODE%"),
        "max_send_attempts_reached",
    )
    assert_zero(
        await otp(api, "resendCode", env="login", phone_number=MOBILE),
        "max_send_attempts_reached",
    )
    await api.deliver()
    assert len(api.sender.sent) == 2


async def test_a_code_of_one_env_fails_in_another(api: Api) -> None:
    login = await sent_code(api, env="login")
    check = {"phone_number": MOBILE, "code": login}
    assert_zero(await otp(api, "validateCode", env="payments", **check), "not_found", "env")
    payments = await sent_code(api, env="payments")
    assert login != payments
    assert_zero(await otp(api, "validateCode", env="payments", **check), "invalid_code", "code")
    assert_zero(await otp(api, "checkCode", env="payments", phone_number=MOBILE), "pending")
    assert_one(await otp(api, "validateCode", env="login", **check))
    assert_zero(await otp(api, "checkCode", env="payments", phone_number=MOBILE), "pending")
    assert_one(await otp(api, "validateCode", env="payments", phone_number=MOBILE, code=payments))


async def test_a_code_of_one_number_fails_for_another(api: Api) -> None:
    code = await sent_code(api, MOBILE)
    await sent_code(api, "34600000002")
    response = await otp(api, "validateCode", phone_number="34600000002", code=code)
    assert_zero(response, "invalid_code", "code")
    assert_zero(await otp(api, "checkCode", phone_number="34600000003"), "not_found")


async def test_without_env_or_message_the_default_service_and_its_template(api: Api) -> None:
    assert_one(await otp(api, "sendCode", phone_number=MOBILE, env=" "))
    await api.deliver()
    (sms,) = api.sender.sent
    match = re.fullmatch(r"default code: ([0-9]{6})\. Valid 10 min\. Do not share it\.", sms.text)
    assert match, sms.text
    assert sms.sms is not None and sms.sms.sender_id is None
    assert len(await services_named(api, "default")) == 1
    assert_one(await otp(api, "validateCode", phone_number=MOBILE, code=match.group(1)))
    assert_one(await otp(api, "checkCode", phone_number=MOBILE, env="default"))


async def test_an_env_is_trimmed_and_its_service_is_made_once(api: Api) -> None:
    for env in ("  shop ", "shop", "shop\t"):
        await sent_code(api, env=env)
        api.clock.advance(30)
    assert len(await services_named(api, "shop")) == 1
    first, second, third = await verifications(api)
    assert first["service_id"] == second["service_id"] == third["service_id"]


async def test_braces_in_the_message_stay_text(api: Api) -> None:
    template = "{code} {{brand}} } { %CODE% {minutes}"
    code = await sent_code(api, message=template, digits=8)
    assert re.fullmatch(r"[0-9]{8}", code)
    assert api.sender.sent[-1].text == "{code} {{brand}} } { " + code + " {minutes}"


async def test_the_code_may_appear_twice(api: Api) -> None:
    message = "%CODE% is your code (%CODE%)"
    assert_one(await otp(api, "sendCode", phone_number=MOBILE, message=message, digits=4))
    await api.deliver()
    match = re.fullmatch(r"([0-9]{4}) is your code \(([0-9]{4})\)", api.sender.sent[-1].text)
    assert match and match.group(1) == match.group(2)


async def test_wrong_codes_use_up_the_attempts(api: Api) -> None:
    code = await sent_code(api)
    check = {"phone_number": MOBILE}
    for _ in range(4):
        response = await otp(api, "validateCode", code=wrong(code), **check)
        assert_zero(response, "invalid_code", "code")
    assert_zero(await otp(api, "validateCode", code=wrong(code), **check), "max_attempts_reached")
    assert_zero(await otp(api, "validateCode", code=code, **check), "max_attempts_reached")
    assert_zero(await otp(api, "checkCode", **check), "max_attempts_reached")


async def test_an_expired_code_is_refused(api: Api) -> None:
    code = await sent_code(api)
    api.clock.advance(600)  # the service's validity
    assert_zero(await otp(api, "validateCode", phone_number=MOBILE, code=code), "expired")
    assert_zero(await otp(api, "checkCode", phone_number=MOBILE), "expired")
    assert_zero(await otp(api, "resendCode", phone_number=MOBILE), "not_found")


async def test_the_services_allowed_countries_apply(api: Api) -> None:
    await sent_code(api, env="login")
    (service,) = await services_named(api, "login")
    await api.http.patch(
        f"/v1/services/{service['id']}", json={"allowed_countries": ["ES"]}, headers=api.auth()
    )
    response = await otp(api, "sendCode", env="login", phone_number="33612345678")
    assert_zero(response, "country_not_allowed", "phone_number")
    await api.deliver()
    assert len(api.sender.sent) == 1


async def test_a_locked_destination_is_refused(database: Database, tmp_path: Path) -> None:
    settings = make_settings(database, tmp_path, lockout_threshold=2, lockout_seconds=3600)
    async with serving(settings, database) as api:
        code = await sent_code(api)
        for _ in range(2):
            response = await otp(api, "validateCode", phone_number=MOBILE, code=wrong(code))
            assert_zero(response, "invalid_code", "code")
        # Locked: no more guesses, and no new code or resend either.
        assert_zero(
            await otp(api, "validateCode", phone_number=MOBILE, code=code), "invalid_code", "code"
        )
        api.clock.advance(30)
        for operation in ("resendCode", "sendCode"):
            response = await otp(api, operation, phone_number=MOBILE, message="%CODE%")
            assert_zero(response, "destination_blocked")
            assert response.headers["retry-after"] == "3570"
        await api.deliver()
        assert len(api.sender.sent) == 1


# --- refusals send nothing and store nothing ----------------------------------------------------

REFUSED_SENDS = [
    pytest.param(
        {"phone_number": "34911234567"}, "unsupported_number_type", "phone_number", id="landline"
    ),
    pytest.param(
        {"phone_number": "34900123456"}, "unsupported_number_type", "phone_number", id="toll-free"
    ),
    pytest.param(
        {"phone_number": "3460000000"}, "invalid_phone_number", "phone_number", id="too-short"
    ),
    pytest.param(
        {"phone_number": "+34600000001"}, "invalid_phone_number", "phone_number", id="plus"
    ),
    pytest.param(
        {"phone_number": "0034600000001"}, "invalid_phone_number", "phone_number", id="double-zero"
    ),
    pytest.param(
        {"phone_number": "34 600000001"}, "invalid_phone_number", "phone_number", id="space"
    ),
    pytest.param(
        {"phone_number": "٣٤٦٠٠٠٠٠٠٠٠١"}, "invalid_phone_number", "phone_number", id="arabic-digits"
    ),
    pytest.param({"phone_number": ""}, "invalid_phone_number", "phone_number", id="empty"),
    pytest.param({"message": "Your code"}, "invalid_request", "message", id="no-code-mark"),
    pytest.param(
        {"message": "Your code %code%"}, "invalid_request", "message", id="lower-case-mark"
    ),
    pytest.param({"message": ""}, "invalid_request", "message", id="empty-message"),
    pytest.param(
        {"message": "%CODE% " + "x" * 160}, "invalid_request", "message", id="message-over-one-sms"
    ),
    pytest.param({"digits": 3}, "invalid_request", "digits", id="digits-3"),
    pytest.param({"digits": 11}, "invalid_request", "digits", id="digits-11"),
    pytest.param({"digits": "six"}, "invalid_request", "digits", id="digits-text"),
    pytest.param({"digits": ""}, "invalid_request", "digits", id="digits-empty"),
    pytest.param({"sender": "Twelve chars"}, "invalid_request", "sender", id="sender-long"),
    pytest.param({"sender": "Acme!"}, "invalid_request", "sender", id="sender-punctuation"),
    pytest.param({"env": "e" * 41}, "invalid_request", "env", id="env-too-long"),
]


@pytest.mark.parametrize(("params", "reason", "param"), REFUSED_SENDS)
async def test_a_refused_send_sends_and_stores_nothing(
    api: Api, params: dict[str, Any], reason: str, param: str
) -> None:
    query = {"env": "fresh", "phone_number": MOBILE, "message": "Code %CODE%", **params}
    assert_zero(await otp(api, "sendCode", **query), reason, param)
    await api.deliver()
    assert api.sender.sent == []
    assert await verifications(api) == []
    # A new env is created only by a send it can make.
    assert await services_named(api, query["env"].strip()) == []


async def test_a_refused_send_leaves_a_pending_code_alone(api: Api) -> None:
    code = await sent_code(api, env="login")
    api.clock.advance(30)
    response = await otp(api, "sendCode", env="login", phone_number=MOBILE, message="no mark")
    assert_zero(response, "invalid_request", "message")
    assert_one(await otp(api, "validateCode", env="login", phone_number=MOBILE, code=code))


@pytest.mark.parametrize(
    ("operation", "params", "param"),
    [
        ("sendCode", {}, "phone_number"),
        ("sendCode", {"env": "login", "message": "%CODE%"}, "phone_number"),
        ("resendCode", {"env": "login"}, "phone_number"),
        ("validateCode", {"env": "login", "phone_number": MOBILE}, "code"),
        ("validateCode", {"env": "login", "code": "123456"}, "phone_number"),
        ("checkCode", {"env": "login"}, "phone_number"),
    ],
)
async def test_a_missing_parameter_is_a_zero_naming_it(
    api: Api, operation: str, params: dict[str, str], param: str
) -> None:
    await sent_code(api, env="login")
    assert_zero(await otp(api, operation, **params), "invalid_request", param)
    await api.deliver()
    assert len(api.sender.sent) == 1
    (verification,) = await verifications(api)
    assert verification["check_attempts"] == 0 and verification["send_attempts"] == 1


@pytest.mark.parametrize("code", ["", "12a!56", "1" * 65, "123"])
async def test_what_cannot_be_a_code_counts_no_attempt(api: Api, code: str) -> None:
    await sent_code(api)
    response = await otp(api, "validateCode", phone_number=MOBILE, code=code)
    assert_zero(response, "invalid_request", "code")
    (verification,) = await verifications(api)
    assert verification["check_attempts"] == 0


# --- credentials --------------------------------------------------------------------------------


def wrong_credentials(api: Api) -> list[dict[str, str]]:
    return [
        {},
        {"Authorization": f"Bearer {api.key}"},  # LabsMobile's API takes Basic only
        basic("someone@example.com", api.key),
        basic(api.account_id, api.key[:-1] + ("A" if api.key[-1] != "A" else "B")),
        basic(api.account_id, ""),
        {"Authorization": "Basic !!!notbase64"},
        {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()},
        {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
        {"Authorization": "Basic"},
    ]


@pytest.mark.parametrize("operation", ["sendCode", "resendCode", "validateCode", "checkCode"])
async def test_wrong_or_missing_credentials_are_401(api: Api, operation: str) -> None:
    code = await sent_code(api)
    api.clock.advance(30)
    for headers in wrong_credentials(api):
        # Credentials come first: a missing parameter does not hide a 401.
        for params in ({"phone_number": MOBILE, "code": code, "message": "%CODE%"}, {}):
            response = await api.http.get(f"/otp/{operation}", params=params, headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == 'Basic realm="otpgate"'
            assert response.headers["content-type"] == PROBLEM
            assert response.json()["code"] == "unauthorized"
            assert response.headers["x-otpgate-error"] == "unauthorized"
    await api.deliver()
    assert len(api.sender.sent) == 1
    (verification,) = await verifications(api)
    assert verification["status"] == "pending"
    assert verification["check_attempts"] == 0 and verification["send_attempts"] == 1


async def test_another_accounts_key_sees_nothing_of_this_one(api: Api) -> None:
    code = await sent_code(api, env="login")
    other = await api.http.post(
        "/v1/accounts", json={"name": "Other", "username": "other@example.com"}, headers=api.auth()
    )
    key = await api.http.post(
        "/v1/keys", json={"name": "k", "account_id": other.json()["id"]}, headers=api.auth()
    )
    theirs = basic("other@example.com", key.json()["key"])
    check = {"env": "login", "phone_number": MOBILE, "code": code}
    response = await api.http.get("/otp/validateCode", params=check, headers=theirs)
    assert_zero(response, "not_found", "env")
    assert_one(await otp(api, "validateCode", **check))


# --- odd bytes ----------------------------------------------------------------------------------

PARAMETERS = ["env", "sender", "phone_number", "message", "code"]
OPERATIONS = ["sendCode", "resendCode", "validateCode", "checkCode"]
#: The parameters each operation reads.
TAKES = {
    "sendCode": {"env", "sender", "phone_number", "message", "digits"},
    "resendCode": {"env", "sender", "phone_number", "message", "digits"},
    "validateCode": {"env", "phone_number", "code"},
    "checkCode": {"env", "phone_number"},
}
GOOD = {
    "env": "login",
    "sender": "Acme",
    "phone_number": MOBILE,
    "message": "Code%20%25CODE%25",
    "code": "123456",
    "digits": "6",
}


def query_with(name: str, value: str) -> str:
    return "&".join(f"{k}={value if k == name else v}" for k, v in GOOD.items())


@pytest.mark.parametrize("name", PARAMETERS)
async def test_a_nul_in_any_parameter_is_a_zero_naming_it(api: Api, name: str) -> None:
    await sent_code(api, env="login")
    for operation in OPERATIONS:
        api.clock.advance(30)
        before = await verifications(api)
        response = await otp_raw(api, operation, query_with(name, "a%00b"))
        if name not in TAKES[operation]:
            # A parameter an operation does not take is not read.
            assert response.status_code == 200 and response.text in ("0", "1"), operation
            continue
        assert_zero(response, "invalid_request", name)
        assert await verifications(api) == before


@pytest.mark.parametrize("name", [*PARAMETERS, "digits"])
@pytest.mark.parametrize(
    "value",
    ["%ED%A0%80", "%ED%B0%80%CODE%", "%FF%FE", "%C0%AF", "%25", "%0A%0D", "x" * 20_000],
    ids=[
        "lone-high-surrogate",
        "lone-low-surrogate",
        "not-utf8",
        "overlong",
        "percent",
        "newlines",
        "20k",
    ],
)
async def test_odd_bytes_and_long_values_are_never_a_server_error(
    api: Api, name: str, value: str
) -> None:
    await sent_code(api, env="login")
    api.clock.advance(30)
    for operation in OPERATIONS:
        response = await otp_raw(api, operation, query_with(name, value))
        assert response.status_code == 200, (operation, response.text)
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text in ("0", "1")
        if response.text == "0":
            assert response.headers["x-otpgate-error"]


# --- storage down -------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_storage_down_is_503_not_a_zero(tmp_path: Path, operation: str) -> None:
    # Nothing listens on port 1 of loopback: a database that is down. A 0 would tell the
    # client "wrong code" or "not validated"; a 503 tells it to retry.
    settings = Settings(
        env="test",
        data_dir=tmp_path,
        secret_key=TEST_SECRET,
        database_url="postgresql://postgres@127.0.0.1:1/test",
    )
    app = create_app(build(settings, sender=RecordingSender()), run_dispatcher=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.get(
                f"/otp/{operation}",
                params={"phone_number": MOBILE, "code": "123456"},
                headers=basic("ops@example.com", "otpgate_" + "a" * 43),
            )
    assert response.status_code == 503
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["code"] == "unavailable"
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-otpgate-error"] == "unavailable"


# --- the document -------------------------------------------------------------------------------


async def test_the_document_describes_the_otp_api(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    for operation in OPERATIONS:
        described = spec["paths"][f"/otp/{operation}"]["get"]
        assert described["security"] == [{"basic": []}]
        answer = described["responses"]["200"]
        assert answer["content"] == {
            "text/plain": {"schema": {"type": "string", "enum": ["1", "0"]}}
        }
        assert {"X-Otpgate-Error", "X-Otpgate-Param", "Retry-After"} <= set(answer["headers"])
        assert set(described["responses"]) == {"200", "401", "503"}
        assert "WWW-Authenticate" in described["responses"]["401"]["headers"]
        parameters = {p["name"]: p for p in described["parameters"]}
        assert parameters["phone_number"]["required"] is True
        assert parameters["phone_number"]["schema"]["pattern"] == "^[0-9]+$"
        assert all(p["in"] == "query" for p in parameters.values())
    send = {p["name"] for p in spec["paths"]["/otp/sendCode"]["get"]["parameters"]}
    assert send == {"env", "sender", "phone_number", "message", "digits"}
    validate = {
        p["name"]: p["required"] for p in spec["paths"]["/otp/validateCode"]["get"]["parameters"]
    }
    assert validate == {"env": False, "phone_number": True, "code": True}


# --- a real server sending through LabsMobile ---------------------------------------------------


@pytest.fixture
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="ops@example.com") as running:
        yield running


@pytest.fixture
def server(stub: LabsMobileStub, tmp_path: Path) -> Iterator[Server]:
    with running_server(stub, tmp_path) as running:
        yield running


def test_the_flow_against_otpgate_serve_through_labsmobile(
    server: Server, stub: LabsMobileStub
) -> None:
    auth = basic(server.username, server.key)
    # The env's policy is managed through /v1: no resend interval, so the test need not wait.
    created = httpx.post(
        f"{server.url}/v1/services",
        json={"name": "login", "resend_interval_seconds": 0},
        headers=server.auth(),
    )
    assert created.status_code == 201
    template = "Acme: {tu} código es %CODE%"
    with httpx.Client(base_url=f"{server.url}/otp", headers=auth, timeout=10) as http:
        number = {"env": "login", "phone_number": MOBILE}

        def get(operation: str, **params: Any) -> httpx.Response:
            return http.get(operation, params={**number, **params})

        sent = get("sendCode", sender="ACME", message=template, digits=8)
        assert (sent.status_code, sent.text) == (200, "1")
        (request,) = stub.wait_for_messages(1, timeout=10)
        assert request.body["recipient"] == [{"msisdn": MOBILE}]
        assert request.body["tpoa"] == "ACME"
        code = code_of(request.body["message"], "Acme: {tu} código es %CODE%")
        assert re.fullmatch(r"[0-9]{8}", code)

        refused = get("validateCode", code=wrong(code))
        assert (refused.text, refused.headers["x-otpgate-error"]) == ("0", "invalid_code")
        assert get("checkCode").text == "0"
        assert get("validateCode", code=code).text == "1"
        assert get("checkCode").text == "1"
        again = get("validateCode", code=code)
        assert (again.text, again.headers["x-otpgate-error"]) == ("0", "approved")

        # resendCode sends the same code; a second sendCode makes it worthless.
        assert get("sendCode", message="%CODE%", digits=10).text == "1"
        stub.wait_for_messages(2, timeout=10)
        assert get("resendCode").text == "1"
        second, third = stub.wait_for_messages(3, timeout=10)[1:]
        assert second.body["message"] == third.body["message"]
        assert "tpoa" not in third.body  # no sender given: the account default
        old = second.body["message"]
        assert get("sendCode", message="%CODE%", digits=10).text == "1"
        new = stub.wait_for_messages(4, timeout=10)[3].body["message"]
        assert old != new
        assert get("validateCode", code=old).headers["x-otpgate-error"] == "invalid_code"
        assert get("validateCode", code=new, env="other").headers["x-otpgate-error"] == (
            "not_found"
        )
        assert get("validateCode", code=new).text == "1"

        # A landline, a malformed number, a template without %CODE%: 0, and nothing sent.
        for params, reason in [
            ({"phone_number": "34911234567"}, "unsupported_number_type"),
            ({"phone_number": "34-600-000-001"}, "invalid_phone_number"),
            ({"message": "no code here"}, "invalid_request"),
        ]:
            response = get("sendCode", **params)
            assert (response.text, response.headers["x-otpgate-error"]) == ("0", reason)

        # Odd bytes over a real socket.
        for query in ("phone_number=%00", "phone_number=%ED%A0%80", "env=" + "%FF" * 4000):
            response = http.get(f"sendCode?{query}")
            assert (response.status_code, response.text) == (200, "0"), query

    unauthorized = httpx.get(f"{server.url}/otp/checkCode", params=number, headers=server.auth())
    assert unauthorized.status_code == 401
    assert unauthorized.headers["www-authenticate"] == 'Basic realm="otpgate"'
    assert len(stub.messages) == 4

    # The codes travelled in query strings: neither the database nor the logs hold one.
    assert server.stop() is not None  # stopped, not killed: its files are complete
    files = [p for p in server.data_dir.iterdir() if p.name.startswith("otpgate.db")]
    assert files
    for used in (code, old, new):
        for path in files:
            assert used.encode() not in path.read_bytes(), f"a code is in {path.name}"
        assert used.encode() not in server.output()
