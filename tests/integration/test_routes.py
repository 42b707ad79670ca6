"""Routes and failover from an ``OTPGATE_CONFIG`` file, through the real app and two LabsMobile
accounts (two loopback stubs): country routing, failover to the second provider when the first
refuses connections or answers 5xx, the circuit breaker opening and closing again, provider state
in ``GET /v1/providers`` and ``/metrics``, configuration mistakes, and ``otpgate providers
check``.

Time is the frozen clock (the dispatcher and the breakers read it); the tests drive delivery."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otpgate.adapters.providers.config import load_delivery
from otpgate.bootstrap import build
from otpgate.domain.model import Channel, OutboundMessage, SendReceipt
from otpgate.entrypoints.api.app import create_app
from otpgate.errors import ConfigurationError, NotConnected
from otpgate.settings import Settings
from tests.conftest import TEST_SECRET, Api, Database, FrozenClock, code_in, make_settings
from tests.support.labsmobile_stub import LabsMobileStub

OTPGATE = str(Path(sys.executable).with_name("otpgate"))


@pytest.fixture(scope="module")
def primary() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="primary@example.com") as running:
        yield running


@pytest.fixture(scope="module")
def backup() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(username="backup@example.com") as running:
        yield running


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def routes_file(
    tmp_path: Path, primary_url: str, primary: LabsMobileStub, backup: LabsMobileStub
) -> Path:
    path = tmp_path / "otpgate.toml"
    path.write_text(
        f"""
[providers.primary]
type = "labsmobile"
username = "{primary.username}"
token = "{primary.token}"
url = "{primary_url}"
cooloff_seconds = 30

[providers.backup]
type = "labsmobile"
username = "{backup.username}"
token = "{backup.token}"
url = "{backup.url}"

[[routes]]
countries = ["ES", "PT"]
providers = ["primary", "backup"]

[[routes]]
countries = ["*"]
providers = ["backup"]
""",
        encoding="utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def routed_app(database: Database, tmp_path: Path, config: Path) -> AsyncIterator[Api]:
    clock = FrozenClock()
    container = build(make_settings(database, tmp_path, config=config), clock=clock)
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
def stubs(primary: LabsMobileStub, backup: LabsMobileStub) -> Iterator[None]:
    primary.reset()
    backup.reset()
    yield
    primary.reset()
    backup.reset()


async def providers_of(api: Api) -> dict[str, dict[str, Any]]:
    response = await api.http.get("/v1/providers", headers=api.auth())
    assert response.status_code == 200, response.text
    return {p["name"]: p for p in response.json()["data"]}


async def test_each_country_takes_its_route(
    database: Database, tmp_path: Path, primary: LabsMobileStub, backup: LabsMobileStub, stubs: None
) -> None:
    config = routes_file(tmp_path, primary.url, primary, backup)
    async with routed_app(database, tmp_path, config) as api:
        spain = (await api.start("+34600000001")).json()["id"]
        france = (await api.start("+33612345678")).json()["id"]
        await api.deliver()

        assert [m.msisdns for m in primary.messages] == [["34600000001"]]
        assert [m.msisdns for m in backup.messages] == [["33612345678"]]
        for vid, provider in ((spain, "primary"), (france, "backup")):
            body = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
            assert [(m["status"], m["provider"]) for m in body["messages"]] == [("sent", provider)]


@pytest.mark.parametrize("failure", ["connection_refused", "http_503"])
async def test_a_failing_first_provider_fails_over_and_its_circuit_opens_then_closes(
    database: Database,
    tmp_path: Path,
    primary: LabsMobileStub,
    backup: LabsMobileStub,
    stubs: None,
    failure: str,
) -> None:
    """200 verifications while the first provider of the route fails: every code goes out once,
    through the second; the first's circuit opens (state in the API and /metrics), and after
    it recovers and its cool-off passes, a trial send closes it again."""
    url = f"http://127.0.0.1:{closed_port()}" if failure == "connection_refused" else primary.url
    config = routes_file(tmp_path, url, primary, backup)
    async with routed_app(database, tmp_path, config) as api:
        if failure == "http_503":
            primary.outage(3600, status=503, clock=lambda: api.clock.now().timestamp())
        started = {}
        for n in range(200):
            to = f"+34600{n:03d}000"  # one number per prefix: under the per_prefix rate limit
            response = await api.start(to)
            assert response.status_code == 201, response.text
            started[to] = response.json()["id"]
        await api.deliver()

        delivered = [m.msisdns[0] for m in backup.messages]
        assert len(delivered) == len(set(delivered)) == 200  # each once, none twice
        assert set(delivered) == {to.removeprefix("+") for to in started}
        assert primary.messages == []
        # The circuit opened after five failures in a row; the sends already in flight then
        # (the dispatcher runs 64 at once) still met the failure, the rest never tried it.
        state = await providers_of(api)
        assert state["primary"]["state"] == "open"
        assert 5 <= state["primary"]["failed"] <= 64 and state["primary"]["last_error"]
        if failure == "http_503":
            refused = [r for r in primary.requests if r.http_status == 503]
            assert len(refused) == state["primary"]["failed"]
        assert state["backup"] == {
            "name": "backup",
            "type": "labsmobile",
            "state": "closed",
            "last_error": None,
            "sent": 200,
            "failed": 0,
        }
        # Each message's history shows its attempts: those that met the failing primary, then
        # the backup's acceptance; those sent while its circuit was open, the backup alone.
        histories = []
        for vid in started.values():
            body = (await api.http.get(f"/v1/verifications/{vid}", headers=api.auth())).json()
            (message,) = body["messages"]
            assert message["status"] == "sent" and message["provider"] == "backup"
            histories.append([(a["provider"], a["outcome"]) for a in message["attempts"]])
        failed_over = [("primary", "retry"), ("backup", "sent")]
        assert histories.count(failed_over) == state["primary"]["failed"]
        assert histories.count([("backup", "sent")]) == 200 - state["primary"]["failed"]
        metrics = (await api.http.get("/metrics")).text
        assert 'otpgate_provider_circuit_state{provider="primary"} 2.0' in metrics
        assert 'otpgate_provider_circuit_state{provider="backup"} 0.0' in metrics
        for to, vid in list(started.items())[:3]:
            sent = backup.messages[delivered.index(to.removeprefix("+"))]
            check = await api.check(vid, code_in(sent.body["message"]))
            assert check.json()["valid"] is True

        # Recovery: the primary answers again; once its cool-off has passed it is half-open,
        # and the next message is its trial, which closes the circuit.
        if failure != "http_503":
            return  # a refused port cannot recover in place; the 503 case shows recovery
        primary.reset()
        api.clock.advance(31)
        assert (await providers_of(api))["primary"]["state"] == "half_open"
        await api.start("+34600009999")
        await api.deliver()
        assert [m.msisdns for m in primary.messages] == [["34600009999"]]
        assert (await providers_of(api))["primary"]["state"] == "closed"
        metrics = (await api.http.get("/metrics")).text
        assert 'otpgate_provider_circuit_state{provider="primary"} 0.0' in metrics


async def test_providers_are_shown_to_admin_keys_only(
    database: Database, tmp_path: Path, primary: LabsMobileStub, backup: LabsMobileStub, stubs: None
) -> None:
    config = routes_file(tmp_path, primary.url, primary, backup)
    async with routed_app(database, tmp_path, config) as api:
        created = await api.http.post("/v1/accounts", json={"name": "tenant"}, headers=api.auth())
        tenant = created.json()["id"]
        key = await api.http.post(
            "/v1/keys", json={"name": "k", "account_id": tenant}, headers=api.auth()
        )
        response = await api.http.get("/v1/providers", headers=api.auth(key.json()["key"]))
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "forbidden"
        assert (await api.http.get("/v1/providers")).status_code == 401
        assert list(await providers_of(api)) == ["primary", "backup"]


# --------------------------------------------------------------------------------------------
# Configuration mistakes: named, never showing a value


def settings_for(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "otpgate.toml"
    path.write_text(text, encoding="utf-8")
    return Settings(env="test", data_dir=tmp_path, secret_key=TEST_SECRET, config=path)  # type: ignore[arg-type]


GOOD = """
[providers.main]
type = "labsmobile"
username = "ops@example.com"
token = "tok-SECRET-42"
"""


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[providers.main\n", "is not valid TOML"),
        ("", "at least one [providers.NAME] table"),
        ("[providers.Main]\ntype = 'console'\n", "a provider name must match"),
        ("[providers.main]\nusername = 'x'\n", "providers.main.type is required"),
        ("[providers.main]\ntype = 'pigeon'\n", "providers.main.type in"),
        (GOOD + "colour = 'blue'\n", "providers.main.colour in"),
        (GOOD + "timeout_seconds = -1\n", "providers.main.timeout_seconds in"),
        (GOOD.replace('token = "tok-SECRET-42"', ""), "providers.main.token in"),
        (GOOD + "url = 'ftp://x'\n", "providers.main.url in"),
        (GOOD + "[[routes]]\ncountries = ['XX']\nproviders = ['main']\n", "'XX' is not an ISO"),
        (GOOD + "[[routes]]\ncountries = ['ß']\nproviders = ['main']\n", "'ß' is not an ISO"),
        (GOOD + "[[routes]]\ncountries = ['ES']\nproviders = ['other']\n", "unknown providers"),
        (GOOD + "[[routes]]\ncountries = ['ES', '*']\nproviders = ['main']\n", "stands alone"),
        (GOOD + "[[routes]]\ncountries = ['ES']\nproviders = ['main', 'main']\n", "twice"),
        (GOOD + "[[routes]]\ncountries = ['ES']\n", "providers must list"),
        (GOOD + "[delivery]\n", "unknown top-level keys: delivery"),
        (GOOD + "url = 'http://127.0.0.1:99999'\n", "is not a valid URL"),
        (GOOD + "url = 'http://127.0.0.1:0'\n", "must be an http:// or https:// URL with a host"),
        (GOOD + "url = 'http://ops:tok-SECRET-42@127.0.0.1'\n", "must not carry credentials"),
        (GOOD + "url = 'https://h.example/#tok-SECRET-42'\n", "must not carry credentials"),
        (GOOD + "timeout_seconds = 45\n", "must be shorter than OTPGATE_DELIVERY_LEASE_SECONDS"),
        (
            "[providers.main]\ntype = 'twilio'\naccount_sid = 'AC" + "0" * 32 + "'\n"
            "auth_token = 'tok-SECRET-42'\nfrom_ = '+15005550006'\n",
            "providers.main.from_ in",
        ),
        (
            "[providers.main]\ntype = 'vonage'\napi_key = 'k'\napi_secret = 'tok-SECRET-42'\n"
            "from = 'Acme'\nurl = 'http://127.0.0.1:70000'\n",
            "is not a valid URL",
        ),
        (
            "[providers.main]\ntype = 'twilio'\naccount_sid = 'AC" + "0" * 32 + "'\n"
            "auth_token = 'tok-SECRET-42'\nfrom = '+15005550006'\n"
            "url = 'http://AC:tok-SECRET-42@127.0.0.1'\n",
            "must not carry credentials",
        ),
        (GOOD + "x = " + "[" * 100_000 + "]" * 100_000 + "\n", "too deeply"),
    ],
)
def test_a_configuration_mistake_is_named_without_values(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_delivery(settings_for(tmp_path, text))
    shown = str(info.value)
    assert named in shown
    assert "tok-SECRET-42" not in shown and "ops@example.com" not in shown


def test_a_file_without_routes_routes_everything_through_its_providers_in_order(
    tmp_path: Path,
) -> None:
    text = GOOD + "\n[providers.dev]\ntype = 'console'\n"
    delivery = load_delivery(settings_for(tmp_path, text))
    assert [p.name for p in delivery.providers] == ["main", "dev"]
    assert [(r.countries, r.providers) for r in delivery.routes] == [(frozenset(), ("main", "dev"))]
    assert delivery.providers[0].sender.name == "main"
    assert "tok-SECRET-42" not in repr(delivery)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    settings = Settings(env="test", config=tmp_path / "absent.toml")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="OTPGATE_CONFIG: cannot read"):
        load_delivery(settings)


# --------------------------------------------------------------------------------------------
# otpgate providers check


def run_check(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OTPGATE_")},
        "OTPGATE_ENV": "test",
        "OTPGATE_DATA_DIR": str(tmp_path),
        "OTPGATE_SECRET_KEY": TEST_SECRET,
        "OTPGATE_CONFIG": str(config),
        "OTPGATE_PROVIDER_TIMEOUT_SECONDS": "3",
    }
    return subprocess.run(
        [OTPGATE, "providers", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_providers_check_connects_to_each_provider_without_sending(
    tmp_path: Path, primary: LabsMobileStub, backup: LabsMobileStub, stubs: None
) -> None:
    config = routes_file(tmp_path, primary.url, primary, backup)
    result = run_check(tmp_path, config, "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [(p["name"], p["result"]) for p in document["data"]] == [
        ("primary", "ok"),
        ("backup", "ok"),
    ]
    assert document["routes"] == [
        {"countries": ["ES", "PT"], "providers": ["primary", "backup"]},
        {"countries": ["*"], "providers": ["backup"]},
    ]
    assert primary.messages == [] and backup.messages == []
    assert primary.requests == [] or all(r.path == "/json/balance" for r in primary.requests)
    human = run_check(tmp_path, config)
    assert human.returncode == 0
    assert "primary" in human.stdout and "ES, PT" in human.stdout
    for output in (result.stdout, result.stderr, human.stdout, human.stderr):
        assert primary.token not in output and backup.token not in output


def test_providers_check_fails_when_a_provider_cannot_be_reached(
    tmp_path: Path, primary: LabsMobileStub, backup: LabsMobileStub, stubs: None
) -> None:
    config = routes_file(tmp_path, f"http://127.0.0.1:{closed_port()}", primary, backup)
    result = run_check(tmp_path, config, "--json")

    assert result.returncode == 4, result.stderr
    document = json.loads(result.stdout)
    by_name = {p["name"]: p for p in document["data"]}
    assert by_name["primary"]["result"] == "failed" and by_name["primary"]["detail"]
    assert by_name["backup"]["result"] == "ok"
    assert primary.token not in result.stdout + result.stderr


def test_providers_check_refuses_a_bad_configuration_with_usage_status(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(GOOD + "colour = 'blue'\n", encoding="utf-8")
    result = run_check(tmp_path, config)

    assert result.returncode == 2
    assert "providers.main.colour" in result.stderr
    assert "tok-SECRET-42" not in result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# A provider that is not connected uses no attempt


class Unbound:
    """A provider whose link is down (an SMPP bind that cannot be made): nothing is sent."""

    name = "link"
    channels = frozenset({Channel.SMS})

    def __init__(self) -> None:
        self.down = True
        self.sent: list[OutboundMessage] = []

    async def send(self, message: OutboundMessage) -> SendReceipt:
        if self.down:
            raise NotConnected("link: no SMPP bind: connection refused")
        self.sent.append(message)
        return SendReceipt(provider_ref=message.message_id)

    async def check(self) -> None:
        if self.down:
            raise NotConnected("link: no SMPP bind")

    async def aclose(self) -> None:
        return None


async def test_messages_queued_while_a_provider_is_not_connected_use_no_attempt(
    database: Database, tmp_path: Path
) -> None:
    link = Unbound()
    clock = FrozenClock()
    container = build(make_settings(database, tmp_path), sender=link, clock=clock)
    app = create_app(container, run_dispatcher=False)
    async with app.router.lifespan_context(app):
        account, issued = await container.access.ensure_default_account()
        assert issued is not None
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            api = Api(http, container, None, clock, issued.secret, account.id, "", database)  # type: ignore[arg-type]
            api.service_id = await api.new_service()
            sent = await http.post(
                "/v1/messages", json={"to": "+34600000001", "text": "hello"}, headers=api.auth()
            )
            message_id = sent.json()["id"]
            for _ in range(20):  # far more rounds than OTPGATE_DELIVERY_MAX_ATTEMPTS (5)
                await api.deliver()
                clock.advance(60)
            stored = await container.storage.get_message(account.id, message_id)
            assert stored is not None and stored.status.value == "queued"
            assert stored.attempts == 0
            assert {a.outcome.value for a in stored.history} == {"retry"}
            link.down = False
            clock.advance(60)
            await api.deliver()
            stored = await container.storage.get_message(account.id, message_id)
            assert stored is not None and stored.status.value == "sent"
            assert stored.attempts == 1 and len(link.sent) == 1
