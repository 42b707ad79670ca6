"""Bad input and odd requests at the HTTP edge: each answers a problem+json with a stable code,
never a 500, and changes nothing (strings that cannot be stored, oversized bodies, digits of
other scripts, bodies that are not JSON, an unencoded ``+``, wrong methods, unexpected errors).
"""

from __future__ import annotations

import io
import json
import logging
import select as io_select
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from otpgate.adapters.storage import tables as t
from otpgate.entrypoints import logs
from tests.conftest import Api
from tests.integration.test_delivery import lm_api, stub  # noqa: F401 (fixtures)
from tests.integration.test_refusals import assert_problem, counts
from tests.support.server import Server, running_server

# --- strings that cannot be stored or rendered ------------------------------------------------

#: A lone UTF-16 surrogate, as a client writes it: the JSON escape, which Python's json module
#: turns into a str no UTF-8 encoder accepts.
SURROGATE = "\\ud800"
#: NUL, which PostgreSQL text and jsonb refuse.
NUL = "\\u0000"
TO = '"+34600000001"'


async def services_count(api: Api) -> int:
    async with api.database.sql() as conn:
        count: int = (await conn.execute(select(func.count()).select_from(t.services))).scalar_one()
    return count


async def accounts_and_keys(api: Api) -> tuple[int, int]:
    async with api.database.sql() as conn:
        accounts = (await conn.execute(select(func.count()).select_from(t.accounts))).scalar_one()
        keys = (await conn.execute(select(func.count()).select_from(t.api_keys))).scalar_one()
    return accounts, keys


async def snapshot(api: Api) -> tuple[Any, ...]:
    return (*await counts(api), await services_count(api), *await accounts_and_keys(api))


def start_body(extra: str) -> str:
    return '{"service_id": "{sid}", "to": ' + TO + (", " + extra if extra else "") + "}"


# (method, path, raw JSON body with {sid}/{vid} placeholders, the param the answer names, or ""
# when it can name none)
BAD_STRINGS = [
    ("POST", "/v1/verifications", '{"service_id": "{sid}", "to": "' + SURROGATE + '"}', "to"),
    (
        "POST",
        "/v1/verifications",
        '{"service_id": "' + SURROGATE + '", "to": ' + TO + "}",
        "service_id",
    ),
    (
        "POST",
        "/v1/verifications",
        start_body('"metadata": {"note": "' + SURROGATE + '"}'),
        "metadata.note",
    ),
    ("POST", "/v1/verifications", start_body('"metadata": {"' + SURROGATE + '": "x"}'), "metadata"),
    (
        "POST",
        "/v1/verifications",
        start_body('"metadata": {"a": [1, {"b": "x' + SURROGATE + 'y"}]}'),
        "metadata.a.1.b",
    ),
    (
        "POST",
        "/v1/verifications",
        start_body('"metadata": {"note": "' + NUL + '"}'),
        "metadata.note",
    ),
    (
        "POST",
        "/v1/verifications",
        start_body('"context": {"amount": "' + SURROGATE + '"}'),
        "context.amount",
    ),
    ("POST", "/v1/verifications", start_body('"context": {"' + SURROGATE + '": "1"}'), "context"),
    ("POST", "/v1/verifications", start_body('"locale": "' + SURROGATE + '"'), "locale"),
    ("POST", "/v1/verifications", start_body('"custom_code": "' + SURROGATE + '"'), "custom_code"),
    ("POST", "/v1/verifications", start_body('"' + SURROGATE + '": 1'), ""),
    ("POST", "/v1/verifications/{vid}/check", '{"code": "1' + SURROGATE + '"}', "code"),
    (
        "POST",
        "/v1/verifications/{vid}/check",
        '{"code": "123456", "context": {"payee": "' + SURROGATE + '"}}',
        "context.payee",
    ),
    (
        "POST",
        "/v1/verifications/check",
        '{"service_id": "{sid}", "to": "' + SURROGATE + '", "code": "123456"}',
        "to",
    ),
    ("POST", "/v1/verifications/{vid}/resend", '{"channel": "' + SURROGATE + '"}', "channel"),
    ("POST", "/v1/services", '{"name": "A' + SURROGATE + '"}', "name"),
    ("POST", "/v1/services", '{"name": "A' + NUL + '"}', "name"),
    (
        "POST",
        "/v1/services",
        '{"name": "A", "templates": {"en": "{code}' + SURROGATE + '"}}',
        "templates.en",
    ),
    (
        "POST",
        "/v1/services",
        '{"name": "A", "templates": {"' + SURROGATE + '": "{code}"}}',
        "templates",
    ),
    (
        "POST",
        "/v1/services",
        '{"name": "A", "allowed_countries": ["' + SURROGATE + '"]}',
        "allowed_countries.0",
    ),
    ("PATCH", "/v1/services/{sid}", '{"sender_id": "' + SURROGATE + '"}', "sender_id"),
    ("POST", "/v1/accounts", '{"name": "' + SURROGATE + '"}', "name"),
    ("POST", "/v1/accounts", '{"name": "x", "username": "' + NUL + '"}', "username"),
    ("POST", "/v1/keys", '{"name": "' + SURROGATE + '"}', "name"),
]


@pytest.mark.parametrize(("method", "path", "body", "param"), BAD_STRINGS)
async def test_a_string_that_cannot_be_stored_is_refused_everywhere(
    api: Api, method: str, path: str, body: str, param: str | None
) -> None:
    started = await api.start("+34600000009")
    assert started.status_code == 201
    vid = started.json()["id"]
    await api.deliver()
    sent_before = len(api.sender.sent)
    before = await snapshot(api)
    service_before = (
        await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())
    ).json()

    response = await api.http.request(
        method,
        path.replace("{sid}", api.service_id).replace("{vid}", vid),
        content=body.replace("{sid}", api.service_id).encode(),
        headers={**api.auth(), "Content-Type": "application/json"},
    )

    assert_problem(response, 400, "invalid_request", param or None)
    if not param:  # a field name that cannot be rendered cannot be named
        assert "param" not in response.json()
    assert "surrogate" in response.json()["detail"] or "NUL" in response.json()["detail"]
    await api.deliver()
    assert len(api.sender.sent) == sent_before
    assert await snapshot(api) == before
    after = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    assert after == service_before
    state = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
    assert state["check_attempts"] == 0 and state["send_attempts"] == 1


async def test_refused_metadata_leaves_the_account_readable(api: Api) -> None:
    # The finding: the code was sent and every later read of the account's verifications
    # answered 500. Now the start is refused and the reads stay whole.
    refused = await api.http.post(
        "/v1/verifications",
        content=start_body('"metadata": {"k": "' + SURROGATE + '"}')
        .replace("{sid}", api.service_id)
        .encode(),
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert_problem(refused, 400, "invalid_request", "metadata.k")
    await api.deliver()
    assert api.sender.sent == []
    listed = await api.http.get("/v1/verifications", headers=api.auth())
    assert listed.status_code == 200 and listed.json()["data"] == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"metadata": {"n": NaN}', "metadata.n"),
        ('"metadata": {"n": Infinity}', "metadata.n"),
        ('"metadata": {"n": [-Infinity]}', "metadata.n.0"),
        ('"metadata": {"n": 1e400}', "metadata.n"),
        ('"metadata": {"n": 1' + "0" * 400 + "}", "metadata.n"),  # an integer past a double
        ('"metadata": {"n": [-1' + "0" * 400 + "]}", "metadata.n.0"),
        ('"metadata": {"deep": ' + "[" * 500 + "]" * 500 + "}", "metadata.deep"),
    ],
)
async def test_numbers_json_cannot_carry_and_deep_nesting_are_refused(
    api: Api, extra: str, param: str
) -> None:
    response = await api.http.post(
        "/v1/verifications",
        content=start_body(extra).replace("{sid}", api.service_id).encode(),
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert_problem(response, 400, "invalid_request")
    assert response.json()["param"].startswith(param.split(".")[0])
    assert response.json()["param"] == param or param == "metadata.deep"
    await api.deliver()
    assert await counts(api) == (0, 0)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/verifications/ver_%00",
        "/v1/verifications/%00/cancel",
        "/v1/services/svc_%00",
        "/v1/verifications?service_id=%00",
        "/v1/verifications?status=%00",
        "/v1/verifications?to=%00",
        "/v1/verifications?cursor=%00",
        "/v1/services?cursor=%00",
        "/v1/accounts?cursor=%00",
        "/v1/verifications/%ED%A0%80",
        "/v1/verifications?service_id=%ED%A0%80%FF",
        "/v1/verifications?to=%FF",
    ],
)
async def test_odd_bytes_in_the_path_or_query_are_not_a_server_error(api: Api, path: str) -> None:
    method = "POST" if path.endswith("/cancel") else "GET"
    response = await api.http.request(method, path, headers=api.auth())
    if "%00" not in path:  # undecodable bytes arrive as U+FFFD: an id or filter like any other
        assert response.status_code in (200, 400, 404), response.text
        if response.status_code != 200:
            assert response.headers["content-type"] == "application/problem+json"
        return
        assert_problem(response, 400, "invalid_request")
        assert response.json()["param"] in (
            "verification_id",
            "service_id",
            "status",
            "to",
            "cursor",
        )


async def test_odd_bytes_in_a_receipt_are_refused(lm_api: Api) -> None:  # noqa: F811
    token = lm_api.container.keys.receipt_token("labsmobile")
    response = await lm_api.http.get(
        "/v1/receipts/labsmobile", params={"token": token, "subid": "a\x00b", "desc": "DELIVRD"}
    )
    assert_problem(response, 400, "invalid_request", "subid")


async def test_a_receipt_nested_past_the_parser_is_refused(lm_api: Api) -> None:  # noqa: F811
    token = lm_api.container.keys.receipt_token("labsmobile")
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"):
        response = await lm_api.http.post(
            "/v1/receipts/labsmobile",
            params={"token": token},
            content=body,
            headers={"Content-Type": "application/json"},
        )
        assert_problem(response, 400, "invalid_request")


# --- body size ----------------------------------------------------------------------------------

LIMIT = 64 * 1024


async def test_a_declared_oversized_body_is_refused_before_authentication(api: Api) -> None:
    response = await api.http.post(
        "/v1/verifications",
        content=b"{" + b" " * (LIMIT + 1) + b"}",
        headers={"Content-Type": "application/json"},  # no credentials at all
    )
    assert_problem(response, 413, "payload_too_large")
    assert "65536" in response.json()["detail"]
    assert response.headers["x-request-id"]


async def test_a_chunked_oversized_body_is_cut_off_while_streaming(api: Api) -> None:
    sent = 0

    async def fifty_megabytes() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"service_id": "' + api.service_id.encode() + b'", "to": "+34600000001", "m": "'
        for _ in range(50 * 16):
            sent += 64 * 1024
            yield b"x" * (64 * 1024)
        yield b'"}'

    response = await api.http.post(
        "/v1/verifications",
        content=fifty_megabytes(),  # no Content-Length: sent chunked
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert_problem(response, 413, "payload_too_large")
    # The server stopped reading at the limit; it never took in the whole body.
    assert sent <= 2 * LIMIT
    await api.deliver()
    assert await counts(api) == (0, 0)


async def test_a_chunked_body_under_the_limit_still_works(api: Api) -> None:
    async def small() -> AsyncIterator[bytes]:
        yield b'{"service_id": "' + api.service_id.encode() + b'", '
        yield b'"to": "+34600000001", "metadata": {"pad": "' + b"x" * 3000 + b'"}}'

    response = await api.http.post(
        "/v1/verifications",
        content=small(),
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    near_limit = await api.http.post(
        "/v1/services",
        content=json.dumps({"name": "A", "templates": {"en": "{code}" + " " * 100}}).encode()
        + b" " * (LIMIT - 200),
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert near_limit.status_code == 201, near_limit.text


async def test_a_malformed_content_length_is_refused(api: Api) -> None:
    response = await api.http.post(
        "/v1/services",
        content=b'{"name": "A"}',
        headers={**api.auth(), "Content-Type": "application/json", "Content-Length": "12x"},
    )
    assert_problem(response, 400, "invalid_request", "Content-Length")


# --- body size over a real socket, against otpgate serve ----------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(None, tmp_path_factory.mktemp("robustness")) as served:
        yield served


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, body


def test_a_declared_50_mb_body_is_refused_before_a_byte_of_it_is_sent(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/verifications HTTP/1.1\r\nHost: otpgate\r\n"
            b"Content-Type: application/json\r\nContent-Length: 52428800\r\n\r\n"
        )
        status, headers, body = read_answer(sock)  # the body was never sent
    assert status == 413 and headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "payload_too_large"
    assert headers["x-request-id"]


def test_concurrent_chunked_50_mb_bodies_do_not_grow_the_server(server: Server) -> None:
    before = server.rss_bytes()
    sockets = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(8)]
    chunk = b"x" * 65536
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    try:
        for sock in sockets:
            sock.sendall(
                b"POST /v1/services HTTP/1.1\r\nHost: otpgate\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
        answered: dict[socket.socket, int] = {}
        sent = 0
        # Each client streams up to 50 MB, until the server answers it.
        while len(answered) < len(sockets) and sent < 50 * 1_048_576:
            for sock in sockets:
                if sock in answered:
                    continue
                readable, _, _ = io_select.select([sock], [], [], 0)
                if readable:
                    answered[sock] = read_answer(sock)[0]
                    continue
                try:
                    sock.sendall(framed)
                except (BrokenPipeError, ConnectionResetError):
                    answered[sock] = read_answer(sock)[0]
            sent += len(chunk)
        for sock in sockets:
            if sock not in answered:
                answered[sock] = read_answer(sock)[0]
        assert sorted(answered.values()) == [413] * 8
        # Each was refused once past the limit, long before its 50 MB.
        assert sent < 10 * 1_048_576
        assert server.rss_bytes() - before < 32 * 1_048_576
    finally:
        for sock in sockets:
            sock.close()
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


# --- digits of any script, spaces and dashes of any kind ----------------------------------------

ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
EXTENDED_ARABIC_INDIC = str.maketrans("0123456789", "۰۱۲۳۴۵۶۷۸۹")
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


async def started_code(api: Api, to: str = "+34600000001", **fields: Any) -> tuple[str, str]:
    response = await api.start(to, **fields)
    assert response.status_code == 201, response.text
    await api.deliver()
    return response.json()["id"], api.sender.codes_to(to)[-1]


@pytest.mark.parametrize(
    "typed",
    [
        lambda c: c.translate(ARABIC_INDIC),
        lambda c: c.translate(EXTENDED_ARABIC_INDIC),
        lambda c: c.translate(FULL_WIDTH),
        lambda c: c.translate(DEVANAGARI),
        lambda c: c[:3] + "\u00a0" + c[3:],  # no-break space
        lambda c: c[:3] + "\u200b" + c[3:],  # zero-width space
        lambda c: c[:3] + "\u2009" + c[3:],  # thin space
        lambda c: "\ufeff" + c,  # a byte-order mark pasted in front
        lambda c: c[:3] + "\u2013" + c[3:],  # en dash
        lambda c: c[:3] + "\u2212" + c[3:],  # minus sign
        lambda c: " " + c[:3].translate(FULL_WIDTH) + "-" + c[3:] + "\n",
    ],
    ids=[
        "arabic-indic",
        "extended-arabic-indic",
        "full-width",
        "devanagari",
        "no-break-space",
        "zero-width-space",
        "thin-space",
        "byte-order-mark",
        "en-dash",
        "minus-sign",
        "mixed",
    ],
)
async def test_the_right_code_typed_in_any_script_is_valid(api: Api, typed: Any) -> None:
    vid, code = await started_code(api)
    answer = await api.check(vid, typed(code))
    assert answer.json() == {
        "id": vid,
        "status": "approved",
        "valid": True,
        "remaining_attempts": 5,
    }


async def test_the_right_alphanumeric_code_in_full_width_lower_case_is_valid(api: Api) -> None:
    service = await api.new_service(code_type="alphanumeric")
    response = await api.http.post(
        "/v1/verifications",
        json={"service_id": service, "to": "+34600000001"},
        headers=api.auth(),
    )
    vid = response.json()["id"]
    await api.deliver()
    code = api.sender.codes_to("+34600000001")[-1]
    full_width_lower = "".join(chr(ord(ch) + 0xFEE0) for ch in code.lower())
    assert (await api.check(vid, full_width_lower)).json()["valid"] is True


@pytest.mark.parametrize(
    "presented",
    [
        "-",
        " - ",
        "\u00a0",
        "\u200b\u200b",
        "–",
        "12 34 5!",
        "١٢٣٤٥٦x?",
        "１２３.４５６",
        "12\x0034",
    ],
)
async def test_input_that_cannot_be_a_code_is_refused_and_counts_no_attempt(
    api: Api, presented: str
) -> None:
    vid, _ = await started_code(api)
    response = await api.check(vid, presented)
    assert_problem(response, 400, "invalid_request", "code")
    by_destination = await api.http.post(
        "/v1/verifications/check",
        json={"service_id": api.service_id, "to": "+34600000001", "code": presented},
        headers=api.auth(),
    )
    assert_problem(by_destination, 400, "invalid_request", "code")
    state = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
    assert state["check_attempts"] == 0 and state["status"] == "pending"


async def test_a_wrong_code_of_the_right_alphabet_still_counts(api: Api) -> None:
    vid, code = await started_code(api)
    wrong = str((int(code) + 1) % 1_000_000).zfill(6)
    answer = (await api.check(vid, wrong.translate(ARABIC_INDIC))).json()
    assert answer["valid"] is False and answer["remaining_attempts"] == 4
    letters = (await api.check(vid, "ABCDEF")).json()  # a code of some service, not this one's
    assert letters["valid"] is False and letters["remaining_attempts"] == 3


async def test_a_custom_code_in_another_script_is_stored_as_ascii(api: Api) -> None:
    response = await api.start(custom_code="٤٠٧٢١٥")
    assert response.status_code == 201, response.text
    await api.deliver()
    assert api.sender.codes_to("+34600000001") == ["407215"]
    assert (await api.check(response.json()["id"], "407215")).json()["valid"] is True


# --- bodies that are not JSON ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("text/plain", b'{"name": "A"}'),
        ("application/x-www-form-urlencoded", b"name=A"),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\nA\r\n--x--\r\n"),
        ("application/xml", b"<name>A</name>"),
        (None, b'{"name": "A"}'),  # no Content-Type at all
    ],
)
async def test_a_body_that_is_not_json_gets_a_clear_answer(
    api: Api, content_type: str | None, body: bytes
) -> None:
    before = await services_count(api)
    headers = api.auth() if content_type is None else {**api.auth(), "Content-Type": content_type}
    response = await api.http.post("/v1/services", content=body, headers=headers)
    assert_problem(response, 415, "unsupported_media_type")
    detail = response.json()["detail"]
    assert "application/json" in detail
    for internal in ("Input should be", "model_attributes_type", "dict", "pydantic", "None"):
        assert internal not in detail
    assert await services_count(api) == before


async def test_an_empty_or_non_object_json_body_is_named_plainly(api: Api) -> None:
    empty = await api.http.post(
        "/v1/services", content=b"", headers={**api.auth(), "Content-Type": "application/json"}
    )
    assert_problem(empty, 400, "invalid_request")
    assert empty.json()["detail"] == "this request needs a JSON object as its body"
    array = await api.http.post("/v1/services", json=["name"], headers=api.auth())
    assert_problem(array, 400, "invalid_request")
    assert array.json()["detail"] == "the body must be a JSON object"


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("text/plain", b"hello", 415, "unsupported_media_type"),
        ("application/json", b"{bad json", 400, "invalid_request"),
        ("application/json", b"null", 400, "invalid_request"),
        ("application/json", b"[]", 400, "invalid_request"),
        ("application/json", b'{"x": 1}', 400, "invalid_request"),
    ],
)
async def test_actions_without_parameters_refuse_a_bad_body_and_change_nothing(
    api: Api, content_type: str, body: bytes, status: int, code: str
) -> None:
    """Cancel and the webhook-secret rotation take no body, or ``{}``; resend takes its own
    object. Anything else is refused before the action, as on every route."""
    started = await api.start("+34600000071")
    verification_id = started.json()["id"]
    await api.deliver()
    headers = {**api.auth(), "Content-Type": content_type}
    for path in (
        f"/v1/verifications/{verification_id}/cancel",
        f"/v1/verifications/{verification_id}/resend",
        f"/v1/services/{api.service_id}/webhook-secret",
    ):
        if path.endswith("/resend") and body == b'{"x": 1}':
            continue  # resend's own fields are checked by its model; covered elsewhere
        refused = await api.http.post(path, content=body, headers=headers)
        assert_problem(refused, status, code)
    shown = await api.http.get(f"/v1/verifications/{verification_id}", headers=api.auth())
    assert shown.json()["status"] == "pending" and shown.json()["send_attempts"] == 1
    await api.deliver()
    assert len(api.sender.sent) == 1
    # Left out, or {}, the actions work.
    as_json = {**api.auth(), "Content-Type": "application/json"}
    for body_given in (b"", b"{}"):
        canceled = await api.http.post(
            f"/v1/verifications/{verification_id}/cancel", content=body_given, headers=as_json
        )
        assert canceled.status_code == 200, canceled.text
    rotated = await api.http.post(
        f"/v1/services/{api.service_id}/webhook-secret", headers=api.auth()
    )
    assert rotated.status_code == 200, rotated.text


# --- the to filter and an unencoded + ----------------------------------------------------------


async def test_an_unencoded_plus_in_the_to_filter_gets_a_hint(api: Api) -> None:
    await api.start("+34600000001")
    # What a client sends when it forgets to encode "+": the server receives a space.
    response = await api.http.get("/v1/verifications?to=+34600000001", headers=api.auth())
    assert_problem(response, 400, "invalid_request", "to")
    assert "%2B" in response.json()["detail"]
    encoded = await api.http.get("/v1/verifications?to=%2B34600000001", headers=api.auth())
    assert encoded.status_code == 200 and len(encoded.json()["data"]) == 1


# --- methods, unexpected errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/verifications", "GET, POST"),
        ("PUT", "/v1/services/svc_x", "DELETE, GET, PATCH"),
        ("GET", "/v1/verifications/ver_x/check", "POST"),
        ("POST", "/healthz", "GET"),
        ("PATCH", "/v1/keys", "GET, POST"),
        ("HEAD", "/v1/account", "GET"),
    ],
)
async def test_a_wrong_method_names_the_allowed_ones(
    api: Api, method: str, path: str, allowed: str
) -> None:
    response = await api.http.request(method, path, headers=api.auth())
    if method == "HEAD":  # the same answer without its body
        assert response.status_code == 405 and response.content == b""
        assert response.headers["content-type"] == "application/problem+json"
    else:
        assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == allowed
    assert response.headers["x-request-id"]


async def test_an_unexpected_error_is_a_generic_500_with_the_request_id(api: Api) -> None:
    class Broken(Exception):
        pass

    async def broken_ping() -> None:
        raise Broken("database driver exploded: secret detail")

    api.container.storage.ping = broken_ping  # type: ignore[method-assign]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("otpgate")
    logger.addHandler(handler)
    try:
        response = await api.http.get("/readyz", headers={"X-Request-ID": "trace-7"})
    finally:
        logger.removeHandler(handler)
    assert_problem(response, 500, "internal_error")
    assert response.headers["x-request-id"] == "trace-7"
    assert "secret detail" not in response.text and "Traceback" not in response.text
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (error,) = [line for line in lines if line["level"] == "error"]
    assert error["request_id"] == "trace-7"
    assert "Broken" in error["exc"]
    generated = await api.http.get("/readyz")
    assert_problem(generated, 500, "internal_error")
    assert generated.headers["x-request-id"].startswith("req_")
