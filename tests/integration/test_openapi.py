"""The OpenAPI document, the documentation pages and the error pages.

The document is valid OpenAPI, declares problem+json error answers and typed success bodies,
and real answers of every operation conform to it. ``/docs`` and ``/redoc`` load nothing from
another host. Each ``/errors/{code}`` page carries the same guidance as ``docs/errors.md``.
"""

from __future__ import annotations

import base64
import html
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi

from otpgate.bootstrap import build
from otpgate.entrypoints.api.app import create_app
from otpgate.entrypoints.api.error_pages import guidance
from otpgate.errors import PUBLIC_ERRORS
from otpgate.settings import Settings
from tests.conftest import TEST_SECRET, Api, RecordingSender, code_in

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"
#: The body of LabsMobile's OTP answers.
OTP_ANSWER = {"type": "string", "enum": ["1", "0"]}


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app on a fresh SQLite database, for what needs no data (the document, the pages)."""
    settings = Settings(env="test", data_dir=tmp_path, secret_key=TEST_SECRET)
    app = create_app(build(settings, sender=RecordingSender()), run_dispatcher=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://otpgate.test") as c:
            yield c


async def document(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    ]


# --- the document -------------------------------------------------------------------------------


async def test_the_document_is_valid_openapi(http: httpx.AsyncClient) -> None:
    validate_openapi(await document(http))


async def test_every_error_answer_is_a_declared_problem(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    problem = spec["components"]["schemas"]["Problem"]
    assert problem["required"] == ["type", "title", "status", "code", "detail"]
    assert set(problem["properties"]) == {
        "type",
        "title",
        "status",
        "code",
        "detail",
        "param",
        "retry_after",
    }
    assert "HTTPValidationError" not in str(spec) and "ValidationError" not in spec["components"]
    for method, path, operation in operations(spec):
        for status, answer in operation["responses"].items():
            if int(status) >= 400:
                assert answer["content"] == {
                    PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (method, path, status)
                assert "`" in answer["description"], "the description names the codes"


async def test_statuses_are_declared_where_they_occur(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    declared = {(m, p): set(op["responses"]) for m, p, op in operations(spec)}
    for (method, path), statuses in declared.items():
        has_body = "requestBody" in spec["paths"][path][method.lower()]
        if path.startswith("/v1/") and not path.startswith("/v1/receipts/"):
            assert {"401", "503"} <= statuses, (method, path)
        if has_body:
            assert {"400", "413"} <= statuses, (method, path)
            # LabsMobile's JSON API answers a body that is not JSON with a result code (200).
            if not path.startswith("/json/"):
                assert "415" in statuses, (method, path)
        if "{" in path and path.startswith("/v1/"):
            assert {"400", "404"} <= statuses, (method, path)
    idempotent = {
        ("POST", "/v1/verifications"),
        ("POST", "/v1/verifications/{verification_id}/resend"),
        ("POST", "/v1/services"),
        ("POST", "/v1/keys"),
        ("POST", "/v1/accounts"),
        ("POST", "/v1/messages"),
    }
    for method, path in idempotent:
        assert {"409", "422"} <= declared[(method, path)]
        parameters = spec["paths"][path][method.lower()]["parameters"]
        assert {"name": "Idempotency-Key", "in": "header"}.items() <= next(
            p for p in parameters if p["name"] == "Idempotency-Key"
        ).items()
    for method, path, _ in operations(spec):
        if (method, path) not in idempotent:
            assert "422" not in declared[(method, path)], (method, path)
    assert {"200", "201", "403", "429"} <= declared[("POST", "/v1/verifications")]
    for path in ("/v1/verifications/{verification_id}/check", "/v1/verifications/check"):
        assert "429" in declared[("POST", path)]  # rate_limited
    assert declared[("GET", "/healthz")] == {"200"}


async def test_success_bodies_are_typed(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    for method, path, operation in operations(spec):
        for status, answer in operation["responses"].items():
            if status == "204":
                assert "content" not in answer, (method, path)
            elif status.startswith("2"):
                ((media, content),) = answer["content"].items()
                schema = content["schema"]
                if media == "application/json":
                    assert "$ref" in schema, (method, path, status)  # a named model
                else:  # plain text or HTML; LabsMobile's OTP answers also name their values
                    assert schema == {"type": "string"} or (
                        path.startswith("/otp/") and schema == OTP_ANSWER
                    ), (method, path)
    schemas = spec["components"]["schemas"]
    verification = schemas["VerificationOut"]
    assert verification["properties"]["status"] == {
        "$ref": "#/components/schemas/VerificationStatus"
    }
    assert set(verification["required"]) == set(verification["properties"])
    assert schemas["VerificationPage"]["properties"]["data"]["items"] == {
        "$ref": "#/components/schemas/VerificationOut"
    }
    assert (
        "key" in schemas["NewKeyOut"]["required"] and "key" not in schemas["KeyOut"]["properties"]
    )


async def test_authentication_is_declared_on_every_v1_route(http: httpx.AsyncClient) -> None:
    spec = await document(http)
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer" and schemes["basic"]["scheme"] == "basic"
    for method, path, operation in operations(spec):
        if path.startswith("/v1/") and not path.startswith("/v1/receipts/"):
            assert operation["security"] == [{"bearer": []}, {"basic": []}], (method, path)
        elif path.startswith(("/otp/", "/json/")):  # LabsMobile's APIs take Basic only
            assert operation["security"] == [{"basic": []}], (method, path)
        else:
            assert "security" not in operation, (method, path)


async def test_a_method_a_path_does_not_take_answers_405_with_the_documented_methods(
    http: httpx.AsyncClient,
) -> None:
    spec = await document(http)
    templates = {
        path: re.compile("^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(path)) + "$")
        for path in spec["paths"]
    }
    for path in spec["paths"]:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        # Every documented operation whose path matches this URL (``/v1/verifications/check``
        # is also ``/v1/verifications/{verification_id}``).
        documented = sorted(
            method.upper()
            for template, pattern in templates.items()
            if pattern.match(concrete)
            for method in spec["paths"][template]
        )
        other = next(m for m in ("PUT", "DELETE", "PATCH", "GET") if m not in documented)
        response = await http.request(other, concrete)
        assert response.status_code == 405, (other, path)
        assert response.headers["allow"] == ", ".join(documented), path
        assert response.json()["code"] == "method_not_allowed"


# --- real answers against the document ----------------------------------------------------------


def conforms(spec: dict[str, Any], method: str, template: str, response: httpx.Response) -> None:
    """The answer is one the document declares for this operation: status, media type, body."""
    operation = spec["paths"][template][method.lower()]
    answer = operation["responses"].get(str(response.status_code))
    assert answer is not None, f"{method} {template} answered undeclared {response.status_code}"
    content = answer.get("content")
    if not content:
        assert response.content == b"", f"{method} {template}: a body where none is declared"
        return
    media = response.headers["content-type"].split(";")[0]
    assert media in content, f"{method} {template}: {media} is not declared"
    if media.endswith("json"):
        schema = {"components": spec["components"], **content[media]["schema"]}
        validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
        errors = [e.message for e in validator.iter_errors(response.json())]
        assert not errors, f"{method} {template} {response.status_code}: {errors}"


async def test_real_answers_of_every_operation_conform(api: Api) -> None:
    spec = (await api.http.get("/openapi.json")).json()
    seen: set[tuple[str, str]] = set()
    auth = api.auth()

    async def call(method: str, template: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await api.http.request(method, path, **kwargs)
        conforms(spec, method, template, response)
        seen.add((method, template))
        return response

    started = await call(
        "POST",
        "/v1/verifications",
        "/v1/verifications",
        json={"service_id": api.service_id, "to": "+34600000001", "metadata": {"n": [1, None]}},
        headers=auth,
    )
    vid = started.json()["id"]
    await api.deliver()
    code = code_in(api.sender.sent[-1].text)
    await call(
        "GET", "/v1/verifications/{verification_id}", f"/v1/verifications/{vid}", headers=auth
    )
    listed = await call("GET", "/v1/verifications", "/v1/verifications?limit=1", headers=auth)
    assert listed.json()["data"][0]["messages"][0]["status"] == "sent"
    api.clock.advance(30)
    again = await call(
        "POST",
        "/v1/verifications/{verification_id}/resend",
        f"/v1/verifications/{vid}/resend",
        headers=auth,
    )
    assert again.status_code == 200
    too_soon = await call(
        "POST",
        "/v1/verifications",
        "/v1/verifications",
        json={"service_id": api.service_id, "to": "+34600000001"},
        headers=auth,
    )
    assert too_soon.status_code == 429 and too_soon.headers["retry-after"]
    check = "/v1/verifications/{verification_id}/check"
    wrong = str((int(code) + 1) % 1_000_000).zfill(6)
    await call("POST", check, f"/v1/verifications/{vid}/check", json={"code": wrong}, headers=auth)
    await call(
        "POST",
        "/v1/verifications/check",
        "/v1/verifications/check",
        json={"service_id": api.service_id, "to": "+34600000001", "code": code},
        headers=auth,
    )
    await call(
        "POST",
        "/v1/verifications/{verification_id}/cancel",
        f"/v1/verifications/{vid}/cancel",
        headers=auth,
    )
    await call("GET", "/v1/verifications/{verification_id}", "/v1/verifications/nope", headers=auth)

    created = await call(
        "POST",
        "/v1/services",
        "/v1/services",
        json={"name": "Shop", "code_length": 8},
        headers=auth,
    )
    sid = created.json()["id"]
    await call("GET", "/v1/services", "/v1/services", headers=auth)
    await call("GET", "/v1/services/{service_id}", f"/v1/services/{sid}", headers=auth)
    await call(
        "PATCH",
        "/v1/services/{service_id}",
        f"/v1/services/{sid}",
        json={"allowed_countries": ["es"], "sender_id": "SHOP", "templates": {"es": "{code}"}},
        headers=auth,
    )
    rotate = "/v1/services/{service_id}/webhook-secret"
    rotated = await call("POST", rotate, f"/v1/services/{sid}/webhook-secret", headers=auth)
    assert rotated.json()["webhook_secret"].startswith("whsec_")
    one_per_prefix = {"per_prefix": {"limit": 1, "window_seconds": 60}}
    limited = await call(
        "PATCH",
        "/v1/services/{service_id}",
        f"/v1/services/{sid}",
        json={"rate_limits": one_per_prefix},
        headers=auth,
    )
    assert limited.json()["rate_limits"]["per_prefix"] == one_per_prefix["per_prefix"]
    for to in ("+34600000005", "+34600000006"):
        answer = await call(
            "POST",
            "/v1/verifications",
            "/v1/verifications",
            json={"service_id": sid, "to": to, "client_ip": "2001:db8::7"},
            headers=auth,
        )
    assert answer.status_code == 429 and answer.json()["code"] == "rate_limited"
    await call("DELETE", "/v1/services/{service_id}", f"/v1/services/{sid}", headers=auth)
    await call("POST", rotate, f"/v1/services/{sid}/webhook-secret", headers=auth)  # 404

    await call("GET", "/v1/account", "/v1/account", headers=auth)
    account = await call(
        "POST", "/v1/accounts", "/v1/accounts", json={"name": "Other"}, headers=auth
    )
    await call("GET", "/v1/accounts", "/v1/accounts", headers=auth)
    capped = "/v1/accounts/{account_id}"
    other_id = account.json()["id"]
    await call(
        "PATCH", capped, f"/v1/accounts/{other_id}", json={"daily_spend_cap": "5"}, headers=auth
    )
    await call(
        "PATCH", capped, f"/v1/accounts/{other_id}", json={"daily_spend_cap": "-1"}, headers=auth
    )  # 400
    await call("PATCH", capped, "/v1/accounts/acc_nothing", json={}, headers=auth)  # 404
    key = await call(
        "POST",
        "/v1/keys",
        "/v1/keys",
        json={"name": "k", "account_id": account.json()["id"]},
        headers=auth,
    )
    await call("GET", "/v1/keys", "/v1/keys", headers=auth)
    other = {"Authorization": f"Bearer {key.json()['key']}"}
    await call("GET", "/v1/accounts", "/v1/accounts", headers=other)  # 403
    await call("PATCH", capped, f"/v1/accounts/{other_id}", json={}, headers=other)  # 403
    await call("GET", "/v1/providers", "/v1/providers", headers=auth)
    await call("GET", "/v1/providers", "/v1/providers", headers=other)  # 403
    await call("GET", "/v1/audit", "/v1/audit?limit=5", headers=auth)
    await call("GET", "/v1/audit", "/v1/audit?action=key.created", headers=other)
    await call("GET", "/v1/audit", f"/v1/audit?account_id={api.account_id}", headers=other)  # 403
    await call("GET", "/v1/audit", "/v1/audit?cursor=nope", headers=auth)  # 400
    await call("GET", "/v1/events", "/v1/events?type=verification.approved", headers=auth)
    await call("GET", "/v1/events", f"/v1/events?account_id={api.account_id}", headers=other)
    await call("GET", "/v1/events", "/v1/events?type=nope", headers=auth)  # 400
    once = {**auth, "Idempotency-Key": "key-once"}
    own = await call("POST", "/v1/keys", "/v1/keys", json={"name": "mine"}, headers=once)
    replayed = await call("POST", "/v1/keys", "/v1/keys", json={"name": "mine"}, headers=once)
    assert replayed.json()["key"] is None  # the secret is never kept for replays
    revoke = "/v1/keys/{key_id}"
    await call("DELETE", revoke, f"/v1/keys/{own.json()['id']}", headers=auth)
    await call("DELETE", revoke, f"/v1/keys/{own.json()['id']}", headers=auth)  # 404
    await call("GET", "/v1/account", "/v1/account")  # 401
    await call("GET", "/v1/account", "/v1/account", headers=auth)
    await call("GET", "/v1/account/ledger", "/v1/account/ledger?limit=5", headers=auth)
    await call("GET", "/v1/prices", "/v1/prices?country=ES", headers=auth)
    await api.container.billing.import_prices("country,credits\nES,1\n")
    priced = await call("GET", "/v1/prices", "/v1/prices?country=ES&country=FR", headers=auth)
    assert [p["country"] for p in priced.json()["data"]] == ["ES"]
    await call("GET", "/v1/prices", "/v1/prices?country=XX", headers=auth)  # 400
    sent = await call(
        "POST",
        "/v1/messages",
        "/v1/messages",
        json={"to": "+34600000009", "text": "Hello"},
        headers=auth,
    )
    assert sent.status_code == 202 and sent.json()["price"] == "1"
    message = "/v1/messages/{message_id}"
    await call("GET", message, f"/v1/messages/{sent.json()['id']}", headers=auth)
    await call("GET", message, "/v1/messages/msg_nothing", headers=auth)  # 404
    await call(
        "POST", "/v1/messages", "/v1/messages", json={"to": "+34600000009"}, headers=auth
    )  # 400

    # The SMS-pumping defence: blocks (admin), the safe list and the deny list.
    block = await call(
        "POST", "/v1/blocks", "/v1/blocks", json={"prefix": "+3460000"}, headers=auth
    )
    assert block.status_code == 201
    blocked = await call(
        "POST",
        "/v1/verifications",
        "/v1/verifications",
        json={"service_id": api.service_id, "to": "+34600000077"},
        headers=auth,
    )
    assert blocked.status_code == 403 and blocked.headers["retry-after"]
    refused = await call(
        "POST",
        "/v1/messages",
        "/v1/messages",
        json={"to": "+34600000078", "text": "hi"},
        headers=auth,
    )
    assert refused.status_code == 403
    await call("POST", "/v1/blocks", "/v1/blocks", json={"country": "Spain"}, headers=auth)
    await call("GET", "/v1/blocks", "/v1/blocks", headers=auth)
    lift = "/v1/blocks/{block_id}"
    await call("DELETE", lift, f"/v1/blocks/{block.json()['id']}", headers=auth)
    await call("DELETE", lift, f"/v1/blocks/{block.json()['id']}", headers=auth)  # 404
    for path, body in (
        ("/v1/safe-list", {"number": "+34600000077"}),
        ("/v1/deny-list", {"country": "PH"}),
    ):
        entry = await call("POST", path, path, json=body, headers=auth)
        assert entry.status_code == 201
        assert (await call("POST", path, path, json=body, headers=auth)).status_code == 200
        await call("POST", path, path, json={}, headers=auth)  # 400
        await call("GET", path, path, headers=auth)
        one = path + "/{entry_id}"
        await call("DELETE", one, f"{path}/{entry.json()['id']}", headers=auth)
        await call("DELETE", one, f"{path}/{entry.json()['id']}", headers=auth)  # 404

    labsmobile = {
        "Authorization": "Basic "
        + base64.b64encode(f"{api.account_id}:{api.key}".encode()).decode()
    }
    for operation in ("sendCode", "resendCode", "validateCode", "checkCode"):
        template = f"/otp/{operation}"
        number = f"{template}?env=otp&phone_number=34600000002"
        answer = await call("GET", template, f"{number}&code=123456", headers=labsmobile)
        assert answer.text in ("0", "1")
        refused = await call("GET", template, f"{template}?phone_number=34", headers=labsmobile)
        assert refused.text == "0" and refused.headers["x-otpgate-error"]
        await call("GET", template, number, headers=auth)  # 401: Basic only
    await api.deliver()
    assert "+34600000002" in {sent.to for sent in api.sender.sent}  # sendCode sent its code
    sms = {"recipient": [{"msisdn": "34600000003"}], "message": "Hello", "subid": "later"}
    await call("POST", "/json/send", "/json/send", json=sms, headers=labsmobile)
    scheduled = {**sms, "scheduled": "2030-01-01 00:00:00"}
    await call("POST", "/json/send", "/json/send", json=scheduled, headers=labsmobile)
    malformed = {**labsmobile, "Content-Type": "application/json"}
    refused = await call("POST", "/json/send", "/json/send", content=b"{", headers=malformed)
    assert refused.json()["code"] == "11"
    await call("POST", "/json/send", "/json/send", json=sms)  # 401
    await call("GET", "/json/balance", "/json/balance", headers=labsmobile)
    await call("GET", "/json/balance", "/json/balance", headers=auth)  # 401: Basic only
    await call("POST", "/json/prices", "/json/prices", headers=labsmobile)
    listed = await call(
        "POST", "/json/prices", "/json/prices", json={"countries": ["ES"]}, headers=labsmobile
    )
    assert listed.json()["ES"]["credits"] == 1.0
    await call("POST", "/json/prices", "/json/prices", json={"countries": 1}, headers=labsmobile)
    command = {"subid": "later", "cmd": "cancel"}
    await call("POST", "/json/scheduled", "/json/scheduled", json=command, headers=labsmobile)
    await call("POST", "/json/scheduled", "/json/scheduled", json=command, headers=labsmobile)
    await call("POST", "/json/scheduled", "/json/scheduled", json=command)  # 401

    await call("GET", "/v1/receipts/{provider}", "/v1/receipts/nobody?token=x")
    await call("POST", "/v1/receipts/{provider}", "/v1/receipts/nobody?token=x")
    await call("GET", "/healthz", "/healthz")
    await call("GET", "/readyz", "/readyz")
    await call("GET", "/errors/{code}", "/errors/not_found")
    await call("GET", "/errors/{code}", "/errors/nothing")
    assert seen == {(m, p) for m, p, _ in operations(spec)}


# --- documentation pages -----------------------------------------------------------------------

CDN_HOSTS = ("jsdelivr", "unpkg", "cdnjs", "googleapis", "fastapi.tiangolo.com")
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_documentation_pages_load_only_from_otpgate(
    http: httpx.AsyncClient, page: str
) -> None:
    response = await http.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    references = re.findall(
        r"""(?:src|href|spec-url|url)\s*[=:]\s*["']([^"']+)["']""", response.text
    )
    assert len(references) >= 3, references
    for reference in references:
        assert reference.startswith("/") and not reference.startswith("//"), reference
        asset = await http.get(reference)
        assert asset.status_code == 200, reference
        expected = CONTENT_TYPES.get(Path(reference).suffix, "application/json")
        assert asset.headers["content-type"].startswith(expected), reference
    for host in CDN_HOSTS:
        assert host not in response.text
    if page == "/docs":
        assert '"validatorUrl": null' in response.text  # no call to the public validator


async def test_only_the_pages_assets_are_served(http: httpx.AsyncClient) -> None:
    for name in ("core.py", "..%2F__init__.py", "swagger-ui-bundle.js.map", "%2E%2E"):
        response = await http.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
        assert response.headers["content-type"] == PROBLEM


def test_no_cdn_is_named_anywhere_in_the_package() -> None:
    for path in (ROOT / "src" / "otpgate").rglob("*"):
        if path.is_file() and path.suffix in (".py", ".html", ".js", ".css", ".json", ".md"):
            text = path.read_text()
            for host in CDN_HOSTS:
                assert host not in text, f"{path} names {host}"


# --- error pages --------------------------------------------------------------------------------


def plain(text: str) -> str:
    """Text with HTML tags and Markdown marks removed and white space collapsed."""
    text = re.sub(r"</?(?:p|li|ul|h1|title)(?:\s[^>]*)?>", " ", text)
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    text = re.sub(r"(^|\s)- ", " ", text.replace("**", "").replace("`", ""))
    return " ".join(text.split())


def sections(markdown: str) -> dict[str, str]:
    """The ``## code`` sections of docs/errors.md, by code."""
    found = {}
    for block in re.split(r"^## ", markdown, flags=re.MULTILINE)[1:]:
        title, _, body = block.partition("\n")
        found[title.strip()] = body.strip()
    return found


def test_docs_errors_md_carries_the_guidance_of_every_code() -> None:
    documented = sections((ROOT / "docs" / "errors.md").read_text())
    codes = [cls.code for cls in PUBLIC_ERRORS]
    assert [c for c in documented if c != "Not in the list"] == codes
    for cls in PUBLIC_ERRORS:
        assert "__doc__" in vars(cls) and vars(cls)["__doc__"], f"{cls.__name__} has no guidance"
        assert " ".join(documented[cls.code].split()) == " ".join(guidance(cls).split()), (
            f"docs/errors.md's section {cls.code} differs from {cls.__name__}'s docstring"
        )
        assert "\nClient: " in "\n" + guidance(cls).split("\n\n")[-1], cls.code


@pytest.mark.parametrize("error", PUBLIC_ERRORS, ids=[cls.code for cls in PUBLIC_ERRORS])
async def test_each_error_page_carries_its_guidance(http: httpx.AsyncClient, error: Any) -> None:
    response = await http.get(f"/errors/{error.code}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = plain(response.text)
    assert plain(guidance(error)) in page
    assert f"{error.status} {error.code}" in page and "Client:" in page
    assert "errors.md" not in response.text and "repository" not in response.text
    assert not re.search(r"""(?:src|href)\s*=""", response.text)  # nothing to load


async def test_an_unknown_error_code_has_no_page(http: httpx.AsyncClient) -> None:
    response = await http.get("/errors/no_such_code")
    assert response.status_code == 404 and response.headers["content-type"] == PROBLEM


def test_the_route_modules_do_not_import_the_app() -> None:
    """``problem()`` lives in ``problems``: the route modules need nothing of ``app`` (which
    imports them), so there is no import cycle."""
    probe = (
        "import sys; import otpgate.entrypoints.api.receipts, otpgate.entrypoints.api.v1; "
        "assert 'otpgate.entrypoints.api.app' not in sys.modules, 'app was imported'"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
