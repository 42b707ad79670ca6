"""Schemathesis over every operation of the served OpenAPI document, against ``otpgate serve``
on SQLite with a real admin API key: no server error, and no response that the document does
not describe (status, content type, headers, body).

Bounded and deterministic: a fixed number of examples per operation and generation mode, drawn
from fixed seeds (Hypothesis' ``derandomize`` and the random module, which schemathesis also
uses), so a run takes well under two minutes and a failure reproduces. Generation can still
differ where it feeds on the server's answers (ids are random), so a rare case may show up in
one run only: its reproduction (a ``curl`` line) is in the failure report.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from tests.support.server import Server, running_server

#: Examples per operation and mode (schema-valid data, then schema-invalid data).
EXAMPLES = 25

#: Every operation of the document. ``test_the_fuzzing_covers_every_operation`` keeps this list
#: complete: a new route fails that test until it is fuzzed too.
OPERATIONS = [
    ("POST", "/v1/verifications"),
    ("GET", "/v1/verifications"),
    ("POST", "/v1/verifications/{verification_id}/check"),
    ("POST", "/v1/verifications/check"),
    ("GET", "/v1/verifications/{verification_id}"),
    ("POST", "/v1/verifications/{verification_id}/resend"),
    ("POST", "/v1/verifications/{verification_id}/cancel"),
    ("GET", "/v1/account"),
    ("GET", "/v1/account/ledger"),
    ("GET", "/v1/prices"),
    ("GET", "/v1/providers"),
    ("POST", "/v1/messages"),
    ("GET", "/v1/messages/{message_id}"),
    ("GET", "/v1/accounts"),
    ("POST", "/v1/accounts"),
    ("PATCH", "/v1/accounts/{account_id}"),
    ("POST", "/v1/keys"),
    ("GET", "/v1/keys"),
    ("DELETE", "/v1/keys/{key_id}"),
    ("POST", "/v1/services"),
    ("GET", "/v1/services"),
    ("GET", "/v1/services/{service_id}"),
    ("PATCH", "/v1/services/{service_id}"),
    ("DELETE", "/v1/services/{service_id}"),
    ("POST", "/v1/services/{service_id}/webhook-secret"),
    ("GET", "/v1/events"),
    ("GET", "/v1/audit"),
    ("GET", "/v1/blocks"),
    ("POST", "/v1/blocks"),
    ("DELETE", "/v1/blocks/{block_id}"),
    ("GET", "/v1/safe-list"),
    ("POST", "/v1/safe-list"),
    ("DELETE", "/v1/safe-list/{entry_id}"),
    ("GET", "/v1/deny-list"),
    ("POST", "/v1/deny-list"),
    ("DELETE", "/v1/deny-list/{entry_id}"),
    ("GET", "/v1/receipts/{provider}"),
    ("POST", "/v1/receipts/{provider}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/errors/{code}"),
    ("GET", "/otp/sendCode"),
    ("GET", "/otp/resendCode"),
    ("GET", "/otp/validateCode"),
    ("GET", "/otp/checkCode"),
    ("POST", "/json/send"),
    ("GET", "/json/balance"),
    ("POST", "/json/prices"),
    ("POST", "/json/scheduled"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(
        None, tmp_path_factory.mktemp("fuzz"), extra_env={"OTPGATE_LOG_LEVEL": "WARNING"}
    ) as served:
        yield served


@pytest.fixture(scope="module")
def resources(server: Server) -> dict[str, str]:
    """Real ids, so that some examples reach past the 404 of an unknown id."""
    with httpx.Client(base_url=server.url, headers=server.auth(), timeout=10) as http:
        service = http.post("/v1/services", json={"name": "Fuzz"}).json()["id"]
        verification = http.post(
            "/v1/verifications", json={"service_id": service, "to": "+34600000001"}
        ).json()["id"]
    return {"service_id": service, "verification_id": verification}


@pytest.fixture(scope="module")
def api_schema(server: Server) -> Any:
    config = SchemathesisConfig.from_dict(
        {
            # The admin key, for the document's Bearer scheme, and with its account's username
            # for Basic (LabsMobile's OTP and JSON APIs take only that). Schemathesis also
            # probes every operation without it and with a wrong one, which must answer 401
            # (ignored_auth).
            "auth": {
                "openapi": {
                    "bearer": {"bearer": server.key},
                    "basic": {"username": server.username, "password": server.key},
                }
            },
            "checks": {
                # Schema-valid data may still break a business rule JSON Schema cannot state
                # (a phone number that is not assigned, a template that does not fit one SMS
                # segment): 400 invalid_request is the documented answer to those. So is 422
                # idempotency_key_mismatch, when two examples happen to draw the same
                # Idempotency-Key with different bodies. Every other answer to valid data must
                # be 2xx, 401, 403, 404, 409 or 429, as by default.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "422", "429"],
                },
            },
            "operations": [
                {
                    # LabsMobile's OTP and SMS JSON APIs answer every refusal, a malformed or
                    # missing parameter or JSON included, with 200 and a body of 0 or a result
                    # code (their clients read only a 2xx answer's body); only bad credentials
                    # are an HTTP error.
                    "include-path-regex": "^/(otp|json)/",
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": ["200", "401"]},
                        "negative_data_rejection": {"expected-statuses": ["200", "401"]},
                    },
                }
            ],
        }
    )
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


def test_the_fuzzing_covers_every_operation(api_schema: Any) -> None:
    served = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert served == set(OPERATIONS)


#: Valid Spanish mobile numbers, so that starts with a real service get past the phone rules.
MOBILES = [f"+3460000{n:04d}" for n in range(1, 40)]
#: Codes a user might type: some right-shaped, in other scripts, with spaces.
TYPED_CODES = ["123456", "12 34 56", "١٢٣٤٥٦", "１２３-４５６", "ABCDEF"]


def with_real_values(case: Any, mobile: str, code: str, resources: dict[str, str]) -> Any:
    """A schema-valid case made to reach past the first refusal: the real service, a valid
    mobile number, a code of a plausible shape."""
    if isinstance(case.body, dict):
        if "service_id" in case.body:
            case.body["service_id"] = resources["service_id"]
        if "to" in case.body:
            case.body["to"] = mobile
        if "code" in case.body:
            case.body["code"] = code
        if isinstance(case.body.get("recipient"), list):  # LabsMobile's /json/send
            case.body["recipient"] = [{"msisdn": mobile.removeprefix("+")}]
    if isinstance(case.query, dict):  # LabsMobile's OTP API
        if "phone_number" in case.query:
            case.query["phone_number"] = mobile.removeprefix("+")
        if "code" in case.query:
            case.query["code"] = code
    return case


#: The operations that real values can take further (a real id in the path, or a start or a
#: check by destination with the real service and a valid number). DELETE stays with generated
#: ids: deleting the shared resources would starve the other cases.
REAL_VALUES = [
    (method, path)
    for method, path in OPERATIONS
    if (method != "DELETE" and ("{verification_id}" in path or "{service_id}" in path))
    or (method, path)
    in {
        ("POST", "/v1/verifications"),
        ("POST", "/v1/verifications/check"),
        ("POST", "/v1/messages"),
        ("POST", "/json/send"),
    }
    or path.startswith("/otp/")
]
CASES = [(m, p, False) for m, p in OPERATIONS] + [(m, p, True) for m, p in REAL_VALUES]


@pytest.mark.parametrize(
    ("method", "path", "real"),
    CASES,
    ids=[f"{m} {p}{' real-values' if real else ''}" for m, p, real in CASES],
)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_operation_holds_to_the_document(
    api_schema: Any,
    resources: dict[str, str],
    method: str,
    path: str,
    mode: GenerationMode,
    real: bool,
) -> None:
    # Schemathesis also draws from the random module (which mutations to make a case invalid
    # with); seeding it per test keeps a run the same whatever ran before it.
    random.seed(f"{method} {path} {mode} {real}")
    operation = api_schema[path][method]
    strategy = operation.as_strategy(mode)
    if real:
        names = {p.name for p in operation.path_parameters}
        fixed = {name: resources[name] for name in names & resources.keys()}
        strategy = operation.as_strategy(mode, path_parameters=fixed or None)
        if mode is GenerationMode.POSITIVE:  # a negative case must stay invalid
            strategy = st.tuples(strategy, st.sampled_from(MOBILES), st.sampled_from(TYPED_CODES))
            strategy = strategy.map(lambda drawn: with_real_values(*drawn, resources))

    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    def holds(case: Any) -> None:
        case.call_and_validate()

    try:
        holds()
    except Unsatisfiable:
        # Nothing of this operation can be made schema-invalid (no parameters, or only ones
        # that accept any string): there is no negative case to send.
        assert mode is GenerationMode.NEGATIVE, "positive examples must always exist"
