"""LabsMobile's SMS JSON API served by otpgate (``/json/send``, ``/json/balance``,
``/json/prices``, ``/json/scheduled``), on every backend, through the real app and storage.

With prices ES 1.0 and FR 1.5 and a prepaid account topped up with 20: every accepted SMS lowers
the balance by its price (seen in ``/json/balance`` and ``/v1/account/ledger``), a batch the
balance cannot cover is refused whole with ``35`` and sends nothing, 50 concurrent single sends
against a balance of 10 are accepted exactly 10 times, test mode stores, sends and charges
nothing, a scheduled send goes out at its time and can be canceled or sent at once. Every result
code of the table, and a table of bad inputs (and generated ones), answer HTTP 200 with their
code and change nothing; bad credentials answer 401 with ``WWW-Authenticate: Basic``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from otpgate.domain.billing import BillingMode
from tests.conftest import Api, Database, make_settings, serving

PRICES = "country,credits\nES,1.0\nFR,1.5\n"
#: Valid mobile numbers as LabsMobile writes them (digits with the country code, no +).
ES = [f"3460000{n:04d}" for n in range(1, 60)]
FR = [f"3361234{n:04d}" for n in range(1, 30)]
ES_LANDLINE = "34910000000"
DE_MOBILE = "4915123456789"  # a valid mobile number of a country without a price
PROBLEM = "application/problem+json"
#: Every result code otpgate answers on /json/send.
SEND_CODES = {"0", "10", "11", "20", "21", "23", "24", "27", "28", "30", "35", "39", "41"}


@dataclass
class Customer:
    """A prepaid account of its own, with a key, as a LabsMobile user would have."""

    account_id: str
    username: str
    key: str

    @property
    def basic(self) -> dict[str, str]:
        token = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


async def customer(api: Api, credits: str | None = "20") -> Customer:
    """A prepaid account topped up with ``credits``, with the prices ES 1.0 and FR 1.5."""
    access = api.container.access
    account = await access.create_account(
        "Shop", username="shop@example.com", billing=BillingMode.PREPAID
    )
    issued = await access.create_key(account.id, name="labsmobile")
    await api.container.billing.import_prices(PRICES)
    if credits is not None:
        await api.container.billing.add_credit(account.id, credits, note="order 1")
    return Customer(account.id, account.username, issued.secret)


def recipients(*numbers: str) -> list[dict[str, str]]:
    return [{"msisdn": number} for number in numbers]


async def send(api: Api, who: Customer, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.http.post("/json/send", json=body, headers=who.basic)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert isinstance(answer["code"], str)  # a string on /json/send
    return answer


async def balance(api: Api, who: Customer) -> str:
    response = await api.http.get("/json/balance", headers=who.basic)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["code"] == 0 and set(answer) == {"code", "credits"}
    credits: str = answer["credits"]
    return credits


async def ledger(api: Api, who: Customer) -> list[dict[str, Any]]:
    response = await api.http.get("/v1/account/ledger?limit=200", headers=who.bearer)
    assert response.status_code == 200, response.text
    entries: list[dict[str, Any]] = response.json()["data"]
    return entries


async def stored(api: Api) -> list[dict[str, Any]]:
    """Every message row, oldest first."""
    async with api.database.sql() as conn:
        rows = await conn.execute(text('SELECT * FROM messages ORDER BY created_at, "to"'))
        return [dict(row._mapping) for row in rows]


async def nothing_happened(api: Api, who: Customer, credits: str = "20.00") -> None:
    """No message stored or sent, the balance untouched, the ledger only the top-up."""
    assert await stored(api) == []
    await api.deliver()
    assert api.sender.sent == []
    assert await balance(api, who) == credits
    assert [entry["kind"] for entry in await ledger(api, who)] == ["topup"]


# --- sending, prices and credit ------------------------------------------------------------------


async def test_each_accepted_sms_lowers_the_balance_by_its_price(api: Api) -> None:
    who = await customer(api)
    answer = await send(
        api,
        who,
        {
            "recipient": recipients(ES[0], FR[0]),
            "message": "Your order has shipped",
            "tpoa": "Shop",
            "subid": "order-1042",
            "label": "shipping",
            "ackurl": "https://hooks.example.com/ack?token=t",
            "nofilter": "1",
        },
    )
    assert answer == {
        "code": "0",
        "message": "Message has been successfully sent",
        "subid": "order-1042",
    }
    assert await balance(api, who) == "17.50"  # 20 - 1.0 (ES) - 1.5 (FR)

    two_parts = "x" * 200  # 2 parts of 153 GSM-7 characters, with long
    second = await send(api, who, {"recipient": recipients(ES[1]), "message": two_parts, "long": 1})
    assert second["code"] == "0" and len(second["subid"]) == 20  # one made for the caller
    assert await balance(api, who) == "15.50"

    entries = await ledger(api, who)
    assert sorted((e["kind"], e["credits"]) for e in entries) == [
        ("debit", "-1"),
        ("debit", "-1.5"),
        ("debit", "-2"),
        ("topup", "20"),
    ]
    # The frozen clock gives every entry the same time, so their order is not asserted.
    assert {e["balance"] for e in entries} == {"20", "19", "17.5", "15.5"}
    rows = {row["to"]: row for row in await stored(api)}
    assert {e["message_id"] for e in entries if e["kind"] == "debit"} == {
        row["id"] for row in rows.values()
    }
    first = rows["+" + ES[0]]
    assert (first["client_ref"], first["label"], first["sender_id"]) == (
        "order-1042",
        "shipping",
        "Shop",
    )
    assert first["ack_url"] == "https://hooks.example.com/ack?token=t"
    assert rows["+" + ES[1]]["client_ref"] == second["subid"]
    assert rows["+" + ES[1]]["segments"] == 2

    await api.deliver()
    sent = {message.to: message for message in api.sender.sent}
    assert set(sent) == {"+" + ES[0], "+" + FR[0], "+" + ES[1]}
    assert sent["+" + FR[0]].text == "Your order has shipped"
    assert sent["+" + FR[0]].sms is not None and sent["+" + FR[0]].sms.sender_id == "Shop"
    account = (await api.http.get("/v1/account", headers=who.bearer)).json()
    assert account["balance"] == "15.5"


async def test_a_batch_the_balance_cannot_cover_is_refused_whole_with_35(api: Api) -> None:
    who = await customer(api)
    fourteen_fr = {"recipient": recipients(*FR[:14]), "message": "Sale today"}  # 21 credits
    answer = await send(api, who, fourteen_fr)
    assert answer["code"] == "35" and "subid" not in answer
    mixed = {"recipient": recipients(*FR[:13], ES[0]), "message": "Sale today"}  # 20.5
    assert (await send(api, who, mixed))["code"] == "35"
    await nothing_happened(api, who)

    exactly = {"recipient": recipients(*ES[:20]), "message": "Sale today"}  # 20 credits
    assert (await send(api, who, exactly))["code"] == "0"
    assert await balance(api, who) == "0.00"
    assert (await send(api, who, {"recipient": recipients(ES[20]), "message": "x"}))["code"] == "35"
    await api.deliver()
    assert len(api.sender.sent) == 20


async def test_fifty_concurrent_single_sends_against_ten_credits_are_accepted_ten_times(
    api: Api,
) -> None:
    who = await customer(api, credits="10")

    async def one(number: str) -> str:
        answer = await send(api, who, {"recipient": recipients(number), "message": "Hi"})
        code: str = answer["code"]
        return code

    codes = await asyncio.gather(*(one(number) for number in ES[:50]))
    assert sorted(codes) == ["0"] * 10 + ["35"] * 40
    assert await balance(api, who) == "0.00"
    assert len(await stored(api)) == 10
    assert sorted(e["kind"] for e in await ledger(api, who)) == ["debit"] * 10 + ["topup"]
    await api.deliver()
    assert len(api.sender.sent) == 10


@pytest.mark.parametrize("flag", ["1", 1, True, "true"])
async def test_test_mode_answers_like_a_send_and_stores_sends_and_charges_nothing(
    api: Api, flag: Any
) -> None:
    who = await customer(api)
    body = {"recipient": recipients(ES[0], FR[0]), "message": "Test", "test": flag}
    answer = await send(api, who, body)
    assert answer["code"] == "0" and answer["message"] == "Message has been successfully sent"
    assert len(answer["subid"]) == 20
    assert (await send(api, who, {**body, "subid": "mine"}))["subid"] == "mine"
    # Checked like a real send: what a real send would refuse, test mode refuses too.
    landline = {**body, "recipient": recipients(ES[0], ES_LANDLINE)}
    assert (await send(api, who, landline))["code"] == "23"
    too_dear = {**body, "recipient": recipients(*FR[:14])}  # 21 credits
    assert (await send(api, who, too_dear))["code"] == "35"
    assert (await send(api, who, {**body, "message": "Código"}))["code"] == "27"
    await nothing_happened(api, who)


@pytest.mark.parametrize("flag", ["0", 0, False, "false", "", None])
async def test_a_false_test_flag_sends(api: Api, flag: Any) -> None:
    who = await customer(api)
    body = {"recipient": recipients(ES[0]), "message": "Hi", "test": flag}
    assert (await send(api, who, body))["code"] == "0"
    assert await balance(api, who) == "19.00"


# --- scheduled sends -----------------------------------------------------------------------------


async def test_a_scheduled_send_goes_out_at_its_time(api: Api) -> None:
    who = await customer(api)
    # The frozen clock says 2026-11-27 12:00:00 UTC.
    body = {"recipient": recipients(ES[0]), "message": "Later", "scheduled": "2026-11-27 13:00:00"}
    answer = await send(api, who, body)
    assert answer["code"] == "0"
    assert await balance(api, who) == "19.00"  # charged when accepted
    await api.deliver()
    api.clock.advance(3599)
    await api.deliver()
    assert api.sender.sent == []
    api.clock.advance(1)
    await api.deliver()
    assert [message.to for message in api.sender.sent] == ["+" + ES[0]]


async def test_a_scheduled_time_already_past_sends_at_once(api: Api) -> None:
    who = await customer(api)
    body = {"recipient": recipients(ES[0]), "message": "Now", "scheduled": "2026-11-27 11:59:59"}
    assert (await send(api, who, body))["code"] == "0"
    await api.deliver()
    assert [message.to for message in api.sender.sent] == ["+" + ES[0]]


async def scheduled_command(api: Api, who: Customer, body: Any) -> dict[str, Any]:
    response = await api.http.post("/json/scheduled", json=body, headers=who.basic)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert isinstance(answer["code"], int)  # an integer on /json/scheduled
    return answer


async def test_a_scheduled_send_can_be_canceled_and_is_refunded(api: Api) -> None:
    who = await customer(api)
    body = {
        "recipient": recipients(ES[0], FR[0]),
        "message": "Later",
        "subid": "promo-7",
        "scheduled": "2026-11-28 09:00:00",
    }
    assert (await send(api, who, body))["code"] == "0"
    assert await balance(api, who) == "17.50"
    canceled = await scheduled_command(api, who, {"subid": "promo-7", "cmd": "cancel"})
    assert canceled["code"] == 0 and "2" in canceled["message"]
    assert await balance(api, who) == "20.00"
    assert [e["kind"] for e in await ledger(api, who)].count("refund") == 2
    api.clock.advance(86_400)
    await api.deliver()
    assert api.sender.sent == []
    again = await scheduled_command(api, who, {"subid": "promo-7", "cmd": "cancel"})
    assert again["code"] == 23


async def test_a_scheduled_send_can_be_sent_at_once(api: Api) -> None:
    who = await customer(api)
    body = {
        "recipient": recipients(ES[0]),
        "message": "Later",
        "subid": "9",
        "scheduled": "2027-01-01 00:00:00",
    }
    assert (await send(api, who, body))["code"] == "0"
    await api.deliver()
    assert api.sender.sent == []
    released = await scheduled_command(api, who, {"subid": 9, "cmd": "send"})
    assert released["code"] == 0
    await api.deliver()
    assert [message.to for message in api.sender.sent] == ["+" + ES[0]]
    assert (await scheduled_command(api, who, {"subid": "9", "cmd": "cancel"}))["code"] == 23
    assert await balance(api, who) == "19.00"


async def test_another_accounts_scheduled_send_is_out_of_reach(api: Api) -> None:
    who = await customer(api)
    body = {
        "recipient": recipients(ES[0]),
        "message": "Later",
        "subid": "mine",
        "scheduled": "2027-01-01 00:00:00",
    }
    assert (await send(api, who, body))["code"] == "0"
    admin = base64.b64encode(f"{api.account_id}:{api.key}".encode()).decode()
    response = await api.http.post(
        "/json/scheduled",
        json={"subid": "mine", "cmd": "cancel"},
        headers={"Authorization": f"Basic {admin}"},
    )
    assert response.json()["code"] == 23
    assert await balance(api, who) == "19.00"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (None, 10),
        (b"{", 11),
        (b"[]", 11),
        ({"cmd": "cancel"}, 11),
        ({"subid": "x" * 21, "cmd": "cancel"}, 28),
        ({"subid": "promo", "cmd": "delete"}, 11),
        ({"subid": "promo", "cmd": 1}, 11),
        ({"subid": ["promo"], "cmd": "send"}, 11),
        ({"subid": "nothing", "cmd": "cancel"}, 23),
        ({"subid": "nothing", "cmd": "send"}, 23),
    ],
    ids=repr,
)
async def test_scheduled_command_refusals(api: Api, body: Any, code: int) -> None:
    who = await customer(api)
    if body is None or isinstance(body, bytes):
        response = await api.http.post(
            "/json/scheduled",
            content=body or b"",
            headers={**who.basic, "Content-Type": "application/json"},
        )
    else:
        response = await api.http.post("/json/scheduled", json=body, headers=who.basic)
    assert response.status_code == 200
    assert response.json()["code"] == code


# --- every result code, and bad input that never gives a 500 ------------------------------------

JSON = "application/json"
OK_BODY = {"recipient": recipients(ES[0]), "message": "Hello"}


def body_with(**fields: Any) -> dict[str, Any]:
    return {**OK_BODY, **fields}


#: (what, raw body or JSON value, content type, expected code). Raw bytes are sent as they are.
REFUSALS: list[tuple[str, Any, str | None, str]] = [
    ("no body", b"", JSON, "10"),
    ("white space", b" \n\t ", JSON, "10"),
    ("no content type", json.dumps(OK_BODY).encode(), None, "10"),
    ("a form", b"message=Hello&recipient=34600000001", "application/x-www-form-urlencoded", "10"),
    ("JSON sent as text", json.dumps(OK_BODY).encode(), "text/plain", "10"),
    ("cut short", b'{"message": "Hello", "recipient": [', JSON, "11"),
    ("not UTF-8", b'{"message": "\xff\xfe", "recipient": []}', JSON, "11"),
    ("UTF-16", json.dumps(OK_BODY).encode("utf-16"), JSON, "11"),
    ("a list", b"[]", JSON, "11"),
    ("null", b"null", JSON, "11"),
    ("a string", b'"Hello"', JSON, "11"),
    ("a number", b"12", JSON, "11"),
    ("NaN", b'{"message": "Hello", "recipient": [], "x": NaN}', JSON, "11"),
    ("Infinity", b'{"message": "Hello", "x": -Infinity}', JSON, "11"),
    ("beyond a double", b'{"message": "Hello", "x": 1e999}', JSON, "11"),
    ("a huge integer", b'{"message": "Hello", "x": 1' + b"0" * 5000 + b"}", JSON, "11"),
    ("an integer past a double", b'{"message": "Hello", "x": 1' + b"0" * 400 + b"}", JSON, "11"),
    ("deep nesting", b'{"x": ' + b"[" * 40 + b"]" * 40 + b"}", JSON, "11"),
    ("deeper than the parser", b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, "11"),
    ("a lone surrogate", b'{"message": "\\ud800", "recipient": []}', JSON, "11"),
    ("a NUL", b'{"message": "a\\u0000b", "recipient": []}', JSON, "11"),
    ("a NUL in a key", b'{"message": "Hello", "a\\u0000": 1}', JSON, "11"),
    ("message missing", {"recipient": recipients(ES[0])}, JSON, "20"),
    ("message null", body_with(message=None), JSON, "20"),
    ("message empty", body_with(message=""), JSON, "21"),
    ("message blank", body_with(message="  \n "), JSON, "21"),
    ("message a number", body_with(message=5), JSON, "11"),
    ("message a list", body_with(message=["Hello"]), JSON, "11"),
    ("recipient missing", {"message": "Hello"}, JSON, "23"),
    ("recipient null", body_with(recipient=None), JSON, "23"),
    ("recipient empty", body_with(recipient=[]), JSON, "23"),
    ("recipient a string", body_with(recipient=ES[0]), JSON, "11"),
    ("recipient an object", body_with(recipient={"msisdn": ES[0]}), JSON, "11"),
    ("recipient bare numbers", body_with(recipient=[ES[0]]), JSON, "11"),
    ("recipient without msisdn", body_with(recipient=[{}]), JSON, "11"),
    ("msisdn null", body_with(recipient=[{"msisdn": None}]), JSON, "11"),
    ("msisdn a list", body_with(recipient=[{"msisdn": [ES[0]]}]), JSON, "11"),
    ("msisdn true", body_with(recipient=[{"msisdn": True}]), JSON, "11"),
    ("msisdn letters", body_with(recipient=recipients("34abc")), JSON, "23"),
    ("msisdn with spaces", body_with(recipient=recipients("34 600 000 001")), JSON, "23"),
    ("msisdn with 00", body_with(recipient=recipients("0034600000001")), JSON, "23"),
    ("msisdn too long", body_with(recipient=recipients("3" * 16)), JSON, "23"),
    ("msisdn empty", body_with(recipient=recipients("")), JSON, "23"),
    ("not a valid number", body_with(recipient=recipients("34123")), JSON, "23"),
    ("unassigned number", body_with(recipient=recipients("34500000000")), JSON, "23"),
    ("a landline", body_with(recipient=recipients(ES[0], ES_LANDLINE)), JSON, "23"),
    ("a country without a price", body_with(recipient=recipients(DE_MOBILE)), JSON, "23"),
    ("a negative number", body_with(recipient=[{"msisdn": -34600000001}]), JSON, "23"),
    ("outside GSM-7", body_with(message="Código 1234"), JSON, "27"),
    ("an emoji", body_with(message="Hi 👋"), JSON, "27"),
    ("subid too long", body_with(subid="s" * 21), JSON, "28"),
    ("subid a list", body_with(subid=["a"]), JSON, "11"),
    ("subid a float", body_with(subid=1.5), JSON, "11"),
    ("subid with a newline", body_with(subid="a\nb"), JSON, "11"),
    ("tpoa too long", body_with(tpoa="Way too long sender"), JSON, "11"),
    ("tpoa punctuation", body_with(tpoa="Shop!"), JSON, "11"),
    ("tpoa 16 digits", body_with(tpoa="3" * 16), JSON, "11"),
    ("tpoa an object", body_with(tpoa={"a": 1}), JSON, "11"),
    ("label too long", body_with(label="l" * 256), JSON, "11"),
    ("label a number", body_with(label=3), JSON, "11"),
    ("label with a tab", body_with(label="a\tb"), JSON, "11"),
    ("ackurl ftp", body_with(ackurl="ftp://hooks.example.com/ack"), JSON, "11"),
    ("ackurl no scheme", body_with(ackurl="hooks.example.com/ack"), JSON, "11"),
    ("ackurl no host", body_with(ackurl="https:///ack"), JSON, "11"),
    ("ackurl a bad port", body_with(ackurl="https://example.com:port/"), JSON, "11"),
    ("ackurl with a space", body_with(ackurl="https://example.com/a b"), JSON, "11"),
    ("ackurl javascript", body_with(ackurl="javascript:alert(1)"), JSON, "11"),
    ("ackurl too long", body_with(ackurl="https://example.com/" + "a" * 2100), JSON, "11"),
    ("ackurl a number", body_with(ackurl=5), JSON, "11"),
    ("ackurl a private address", body_with(ackurl="http://10.0.0.1/ack"), JSON, "11"),
    ("ackurl cloud metadata", body_with(ackurl="http://169.254.169.254/latest"), JSON, "11"),
    ("ackurl mapped IPv6", body_with(ackurl="http://[::ffff:10.0.0.1]/ack"), JSON, "11"),
    ("test yes", body_with(test="yes"), JSON, "11"),
    ("test 2", body_with(test=2), JSON, "11"),
    ("test a list", body_with(test=[]), JSON, "11"),
    ("test 1.0", body_with(test=1.5), JSON, "11"),
    ("long maybe", body_with(long="maybe"), JSON, "11"),
    ("ucs2 an object", body_with(ucs2={}), JSON, "11"),
    ("nofilter x", body_with(nofilter="x"), JSON, "11"),
    ("shortlink", body_with(shortlink="1"), JSON, "11"),
    ("certified", body_with(crt="1", crt_id="12345678A"), JSON, "11"),
    ("parameters", body_with(parameters=[{"name": ["Ann"]}]), JSON, "11"),
    ("too long for one part", body_with(message="a" * 161), JSON, "11"),
    ("too long for long", body_with(message="a" * 460, long=True), JSON, "11"),
    ("UCS-2 too long", body_with(message="ç" * 71, ucs2=True), JSON, "11"),
    ("scheduled month 13", body_with(scheduled="2026-13-01 00:00:00"), JSON, "39"),
    ("scheduled February 30", body_with(scheduled="2027-02-30 10:00:00"), JSON, "39"),
    ("scheduled ISO 8601", body_with(scheduled="2026-11-27T13:00:00"), JSON, "39"),
    ("scheduled with a zone", body_with(scheduled="2026-11-27 13:00:00Z"), JSON, "39"),
    ("scheduled a date", body_with(scheduled="2026-11-27"), JSON, "39"),
    ("scheduled words", body_with(scheduled="tomorrow"), JSON, "39"),
    ("scheduled a number", body_with(scheduled=20261127130000), JSON, "39"),
    ("scheduled in test", body_with(scheduled="2026-11-28 09:00:00", test="1"), JSON, "41"),
    ("too many recipients", body_with(recipient=recipients(*[ES[0]] * 10_001)), JSON, "24"),
]


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_each_refusal_has_its_result_code_and_changes_nothing(
    api: Api, body: Any, content_type: str | None, code: str
) -> None:
    who = await customer(api)
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    headers = {**who.basic, **({"Content-Type": content_type} if content_type else {})}
    response = await api.http.post("/json/send", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["code"] == code, answer
    assert set(answer) == {"code", "message"} and answer["message"]
    await nothing_happened(api, who)


#: Sends LabsMobile's clients make that are accepted: (what, fields over OK_BODY, parts).
ACCEPTED: list[tuple[str, dict[str, Any], int]] = [
    ("msisdn with +", {"recipient": recipients("+" + ES[0])}, 1),
    ("msisdn a number", {"recipient": [{"msisdn": int(ES[0])}]}, 1),
    ("160 GSM-7 characters", {"message": "a" * 160}, 1),
    ("the GSM-7 extension", {"message": "Price: 10€ [a] {b}"}, 1),
    ("459 characters with long", {"message": "a" * 459, "long": "1"}, 3),
    ("Unicode with ucs2", {"message": "Código 1234 👋", "ucs2": "1"}, 1),
    ("201 Unicode characters with ucs2 and long", {"message": "ç" * 201, "ucs2": 1, "long": 1}, 3),
    ("GSM-7 text with ucs2", {"message": "a" * 160, "ucs2": True}, 1),
    ("a numeric tpoa", {"tpoa": 34600000000}, 1),
    ("a numeric subid", {"subid": 12345}, 1),
    (
        "empty optional fields",
        {"tpoa": "", "subid": "", "label": "", "ackurl": "", "scheduled": ""},
        1,
    ),
    ("null optional fields", {"tpoa": None, "label": None, "ackurl": None, "scheduled": None}, 1),
    ("unserved fields left empty", {"shortlink": "", "crt": None, "parameters": None}, 1),
    ("unserved fields off", {"shortlink": "0", "crt": 0, "clickurl": False, "parameters": []}, 1),
    ("unknown fields", {"format": "JSON", "priority": 1}, 1),
    ("flags off", {"long": "0", "ucs2": "0", "test": "0", "nofilter": True}, 1),
]


@pytest.mark.parametrize(
    ("fields", "parts"), [case[1:] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED]
)
async def test_what_labsmobile_clients_send_is_accepted(
    api: Api, fields: dict[str, Any], parts: int
) -> None:
    who = await customer(api)
    answer = await send(api, who, body_with(**fields))
    assert answer["code"] == "0", answer
    (row,) = await stored(api)
    assert row["to"] == "+" + ES[0] and row["segments"] == parts
    assert await balance(api, who) == f"{20 - parts}.00"


async def test_a_full_batch_of_ten_thousand_fits_the_body_limit(api: Api) -> None:
    who = await customer(api, credits="10000")
    numbers = [f"346{n:08d}" for n in range(10_000)]
    # Pretty-printed, as a client may send it: still under the route's limit.
    raw = json.dumps(
        {"recipient": recipients(*numbers), "message": "Hi", "test": "1"}, indent=4
    ).encode()
    assert len(raw) > 500_000
    response = await api.http.post(
        "/json/send", content=raw, headers={**who.basic, "Content-Type": JSON}
    )
    assert response.status_code == 200 and response.json()["code"] == "0", response.text
    await nothing_happened(api, who, credits="10000.00")


async def test_a_body_over_the_limit_is_413_before_anything_else(api: Api) -> None:
    who = await customer(api)
    huge = b'{"message": "' + b"a" * 800_000 + b'"}'
    for path in ("/json/send", "/json/prices", "/json/scheduled"):
        response = await api.http.post(path, content=huge, headers={"Content-Type": JSON})
        assert response.status_code == 413, path  # no credentials needed to be refused
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["code"] == "payload_too_large"
    await nothing_happened(api, who)


async def test_the_recipient_cap_is_a_setting(database: Database, tmp_path: Path) -> None:
    settings = make_settings(database, tmp_path, json_send_max_recipients=2)
    async with serving(settings, database) as api:
        who = await customer(api)
        assert (await send(api, who, body_with(recipient=recipients(*ES[:2]))))["code"] == "0"
        answer = await send(api, who, body_with(recipient=recipients(*ES[:3])))
        assert answer["code"] == "24" and "at most 2" in answer["message"]
        assert await balance(api, who) == "18.00"


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_storage_that_cannot_write_answers_30(database: Database, tmp_path: Path) -> None:
    settings = make_settings(database, tmp_path, database_timeout_seconds=0.2)
    async with serving(settings, database) as api:
        who = await customer(api)
        assert await balance(api, who) == "20.00"  # the key is read (and cached) before
        assert database.sqlite_path is not None
        blocker = sqlite3.connect(database.sqlite_path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            answer = await send(api, who, OK_BODY)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert answer["code"] == "30" and "try again" in answer["message"]
        await nothing_happened(api, who)
        assert (await send(api, who, OK_BODY))["code"] == "0"


#: JSON values of any shape, for the fields and the body itself.
def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    _containers,
    max_leaves=12,
)
#: Values a field plausibly holds: the right ones, their near misses, and anything.
PLAUSIBLE = st.sampled_from(
    ["1", "0", "", None, True, 1, "Shop", "2026-11-28 09:00:00", "https://example.com/a", "x" * 21]
)
FIELDS = ["tpoa", "subid", "label", "test", "ackurl", "scheduled", "long", "ucs2", "nofilter"]
MSISDN = st.sampled_from([ES[0], FR[0], ES_LANDLINE, DE_MOBILE, "+" + ES[1], "34", ""])
TEXT = st.sampled_from(["Hello", "Código", "a" * 161, "", " "])


@st.composite
def send_bodies(draw: st.DrawFn) -> Any:
    """A good send with a few of its fields changed, dropped or added, holding values that
    are right, nearly right or anything at all; sometimes any JSON value, or any bytes, as the
    whole body."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(ANY_JSON)
    if kind == 1:  # bytes, sent as they are: rarely JSON, often not UTF-8
        return draw(st.binary(max_size=64) | st.just(b'{"message": "\xff"}'))
    body: dict[str, Any] = dict(OK_BODY)
    for field in draw(
        st.lists(st.sampled_from(["recipient", "message", *FIELDS, "crt"]), max_size=3)
    ):
        if field == "recipient":
            listed = st.lists(MSISDN | st.text(max_size=16) | ANY_JSON, max_size=3)
            value: Any = draw(listed.map(lambda ns: [{"msisdn": n} for n in ns]) | ANY_JSON)
        elif field == "message":
            value = draw(TEXT | st.text(max_size=200) | ANY_JSON)
        else:
            value = draw(PLAUSIBLE | ANY_JSON)
        if draw(st.integers(0, 9)) == 0:
            body.pop(field, None)
        else:
            body[field] = value
    return body


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_generated_bodies_never_give_a_server_error(api: Api) -> None:
    who = await customer(api, credits="1000000")
    codes: list[str] = []

    @settings(
        max_examples=300,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=send_bodies())
    def holds(body: Any) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = asyncio.run_coroutine_threadsafe(
            api.http.post("/json/send", content=raw, headers={**who.basic, "Content-Type": JSON}),
            loop,
        ).result()
        assert response.status_code == 200, (body, response.text)
        assert response.json()["code"] in SEND_CODES, (body, response.text)
        codes.append(response.json()["code"])

    loop = asyncio.get_running_loop()
    await asyncio.to_thread(holds)
    # The generation reaches past the first checks: accepted sends and many refusals.
    assert "0" in codes and len(set(codes)) >= 8, sorted(set(codes))


# --- credentials ---------------------------------------------------------------------------------


def basic(credentials: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials).decode()}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/json/send"),
        ("GET", "/json/balance"),
        ("POST", "/json/prices"),
        ("POST", "/json/scheduled"),
    ],
)
async def test_bad_credentials_answer_401_with_basic(api: Api, method: str, path: str) -> None:
    who = await customer(api)
    wrong = [
        {},
        basic(f"{who.username}:otpgate_wrong".encode()),
        basic(f"someone@example.com:{who.key}".encode()),
        basic(who.key.encode()),  # no colon
        {"Authorization": "Basic !!!"},
        {"Authorization": f"Bearer {who.key}"},  # LabsMobile's API takes Basic only
        {"Authorization": "Digest x"},
    ]
    for headers in wrong:
        response = await api.http.request(method, path, json=OK_BODY, headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"] == 'Basic realm="otpgate"'
        assert response.headers["content-type"] == PROBLEM
        assert who.key not in response.text
    await nothing_happened(api, who)


# --- balance and prices --------------------------------------------------------------------------


async def test_the_balance_is_a_string_and_the_code_an_integer(api: Api) -> None:
    who = await customer(api, credits="20.0725")
    response = await api.http.get("/json/balance", headers=who.basic)
    assert response.json() == {"code": 0, "credits": "20.0725"}
    admin = basic(f"{api.account_id}:{api.key}".encode())  # the default account: unlimited
    await api.http.post("/json/send", json=OK_BODY, headers=admin)
    unlimited = await api.http.get("/json/balance", headers=admin)
    assert unlimited.json() == {"code": 0, "credits": "0.00"}


async def prices(api: Api, who: Customer, body: Any = None) -> Any:
    kwargs: dict[str, Any] = {} if body is None else {"json": body}
    response = await api.http.post("/json/prices", headers=who.basic, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


async def test_prices_are_keyed_by_iso_code(api: Api) -> None:
    who = await customer(api)
    spain = {"isocode": "ES", "prefix": "34", "name": "Spain", "credits": 1.0}
    france = {"isocode": "FR", "prefix": "33", "name": "France", "credits": 1.5}
    both = {"ES": spain, "FR": france}
    assert await prices(api, who, {"countries": ["ES", "FR"]}) == both
    assert await prices(api, who, {"format": "JSON", "countries": ["ES", "FR"]}) == both
    assert await prices(api, who) == both  # no body: every country with a price
    assert await prices(api, who, {}) == both
    assert await prices(api, who, {"countries": []}) == both
    assert await prices(api, who, {"countries": ["es", " fr "], "format": "json"}) == both
    assert await prices(api, who, {"countries": ["ES", "DE"]}) == {"ES": spain}  # DE: no price

    for refused in (
        {"countries": ["XX"]},
        {"countries": ["ß"]},  # not South Sudan's "SS", as Unicode's upper-casing would have it
        {"countries": ["*"]},
        {"countries": "ES"},
        {"countries": [1]},
        {"format": "XML"},
        {"format": 1},
    ):
        answer = await prices(api, who, refused)
        assert answer["code"] == 11 and set(answer) == {"code", "message"}, refused
    for raw, code in ((b"{", 11), (b"[]", 11), (b"null", 11)):
        response = await api.http.post(
            "/json/prices", content=raw, headers={**who.basic, "Content-Type": JSON}
        )
        assert response.json()["code"] == code


async def test_a_default_price_prices_every_country(api: Api) -> None:
    who = await customer(api)
    await api.container.billing.import_prices("country,credits\nES,1.0\n*,0.0725\n")
    listed = await prices(api, who)
    assert len(listed) > 200 and "*" not in listed
    assert listed["ES"]["credits"] == 1.0
    assert listed["DE"] == {"isocode": "DE", "prefix": "49", "name": "Germany", "credits": 0.0725}
    assert await prices(api, who, {"countries": ["DE"]}) == {"DE": listed["DE"]}
    # Now Germany can be billed, so a prepaid account can send there.
    assert (await send(api, who, body_with(recipient=recipients(DE_MOBILE))))["code"] == "0"
    assert await balance(api, who) == "19.9275"


async def test_without_a_price_table_no_country_is_listed(api: Api) -> None:
    admin = Customer(api.account_id, api.account_id, api.key)
    assert await prices(api, admin) == {}
    assert await prices(api, admin, {"countries": ["ES"]}) == {}
    # Nothing is priced, and the default account is unlimited: sends go through unpriced.
    assert (await send(api, admin, OK_BODY))["code"] == "0"
