"""LabsMobile's own Node client (npm ``labsmobile-sms``) against a LabsMobile-compatible API.

Today the target is the loopback LabsMobile stub, which proves the harness: the client is
installed from the project's lock, builds its requests as LabsMobile documents them, and the
driver reports each call's answer or failure. Pointing :func:`labsmobile_api` at otpgate's
``/json`` API turns the same calls into the acceptance test of otpgate's compatibility.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.labsmobile_node import DEFAULT_NUMBERS, node_client_missing, run_node_client
from tests.support.labsmobile_stub import DEFAULT_PRICES, LabsMobileStub

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
