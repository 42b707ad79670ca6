"""LabsMobile's own Node client (npm ``labsmobile-sms``) against a LabsMobile-compatible API.

Against the loopback LabsMobile stub the calls prove the harness: the client is installed from
the project's lock, builds its requests as LabsMobile documents them, and the driver reports
each call's answer or failure. Against a real ``otpgate serve`` the same calls are the
acceptance test of otpgate's compatible ``/json`` API.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.labsmobile_node import DEFAULT_NUMBERS, node_client_missing, run_node_client
from tests.support.labsmobile_stub import DEFAULT_PRICES, LabsMobileStub
from tests.support.server import running_server

_missing = node_client_missing()
if _missing is not None and os.environ.get("CI"):
    # CI installs the client (.ci/run, make install-node): a missing one is a broken set-up.
    raise RuntimeError(_missing)
pytestmark = pytest.mark.skipif(_missing is not None, reason=_missing or "")

PRICES = {
    "ES": DEFAULT_PRICES["ES"],
    "FR": {"isocode": "FR", "prefix": "33", "name": "France", "credits": 0.09},
    "CO": DEFAULT_PRICES["CO"],
}


@dataclass(frozen=True, slots=True)
class Api:
    base_url: str
    username: str
    token: str


@pytest.fixture(scope="module")
def stub() -> Iterator[LabsMobileStub]:
    with LabsMobileStub(credits="42.50", prices=PRICES) as running:
        yield running


@pytest.fixture
def labsmobile_api(stub: LabsMobileStub) -> Iterator[Api]:
    """The API under test: the stub's base URL and credentials."""
    stub.reset()
    yield Api(base_url=stub.url, username=stub.username, token=stub.token)
    stub.reset()


def test_the_node_client_sends_reads_the_balance_and_prices_and_sends_in_test_mode(
    labsmobile_api: Api, stub: LabsMobileStub
) -> None:
    run = run_node_client(
        labsmobile_api.base_url, username=labsmobile_api.username, token=labsmobile_api.token
    )
    assert list(run.results) == ["send", "balance", "prices", "send_test"]
    assert run.returncode == 0, run.stderr

    sent = run.answer("send")
    assert sent["code"] == "0"  # a string on /json/send
    assert run.answer("balance") == {"code": 0, "credits": "42.50"}  # an integer here
    prices = run.answer("prices")
    assert set(prices) == {"ES", "FR"}
    assert prices["FR"] == {"isocode": "FR", "prefix": "33", "name": "France", "credits": 0.09}
    assert run.answer("send_test")["code"] == "0"

    # What the client put on the wire, as the server saw it.
    first, second = stub.requests
    assert first.msisdns == list(DEFAULT_NUMBERS)
    assert first.body["message"] == "Hello from the LabsMobile Node client"
    assert "test" not in first.body
    assert first.headers["content-type"].startswith("application/json")
    credentials = f"{labsmobile_api.username}:{labsmobile_api.token}".encode()
    assert first.headers["authorization"] == "Basic " + base64.b64encode(credentials).decode()
    assert second.msisdns == [DEFAULT_NUMBERS[0]]
    assert second.body["test"] == "1"
    assert sent["subid"] == first.subid


def test_the_driver_reports_a_refused_result_code(
    labsmobile_api: Api, stub: LabsMobileStub
) -> None:
    """A result code other than 0 on a 200 answer is the client's RestException."""
    stub.fail_next(1, code="35")
    run = run_node_client(
        labsmobile_api.base_url, username=labsmobile_api.username, token=labsmobile_api.token
    )
    assert run.returncode == 1
    assert run.results["send"]["ok"] is False
    assert run.results["send"]["error"]["kind"] == "RestException"
    assert run.results["send"]["error"]["status"] == "35"
    assert run.results["balance"]["ok"] is True


def test_the_driver_reports_refused_credentials(labsmobile_api: Api) -> None:
    """LabsMobile's client swallows a 401 (it returns nothing); the driver says so for every
    call instead of passing silently."""
    run = run_node_client(
        labsmobile_api.base_url, username=labsmobile_api.username, token="not-the-token"
    )
    assert run.returncode == 1
    assert [r["ok"] for r in run.results.values()] == [False, False, False, False]
    assert {r["error"]["kind"] for r in run.results.values()} == {"no answer"}
    assert "not-the-token" not in "".join(str(r) for r in run.results.values())


# --- against otpgate --------------------------------------------------------------------------


def test_the_node_client_works_against_otpgate(tmp_path: Path) -> None:
    """The acceptance test of the compatible surface: LabsMobile's own client, its base URL
    pointed at a real ``otpgate serve`` (which sends through the LabsMobile provider to the
    loopback stub): an SMS to two numbers, the balance, the prices of ES and FR, a test-mode
    send. A prepaid account with 20 credits and prices ES 1.0, FR 1.5."""
    with LabsMobileStub() as upstream, running_server(upstream, tmp_path) as server:
        prices = tmp_path / "prices.csv"
        prices.write_text("country,credits\nES,1.0\nFR,1.5\n")
        server.cli("prices", "import", str(prices))
        account = json.loads(
            server.cli(
                "accounts", "create", "--name", "Shop", "--username", "shop@example.com",
                "--billing", "prepaid", "--json",
            )
        )  # fmt: skip
        server.cli("credit", "add", "--account", account["id"], "--credits", "20")
        issued = json.loads(
            server.cli("keys", "create", "--name", "node", "--account", account["id"], "--json")
        )

        run = run_node_client(server.url, username="shop@example.com", token=issued["key"])
        assert list(run.results) == ["send", "balance", "prices", "send_test"]
        assert run.returncode == 0, run.stderr
        sent = run.answer("send")
        assert sent["code"] == "0" and sent["subid"]
        # Two SMS at 1 credit each: the balance the client read is 18.
        assert run.answer("balance") == {"code": 0, "credits": "18.00"}
        listed = run.answer("prices")
        assert {code: row["credits"] for code, row in listed.items()} == {"ES": 1.0, "FR": 1.5}
        assert listed["FR"]["name"] == "France" and listed["FR"]["prefix"] == "33"
        assert run.answer("send_test")["code"] == "0"

        # The two real sends went out through the provider; the test-mode one did not, and
        # cost nothing.
        arrived = upstream.wait_for_messages(2, timeout=10)
        assert sorted(m for r in arrived for m in r.msisdns) == list(DEFAULT_NUMBERS)
        auth = {"Authorization": f"Bearer {issued['key']}"}
        balance = httpx.get(f"{server.url}/v1/account", headers=auth).json()["balance"]
        assert balance == "18"
        assert len(upstream.messages) == 2
