"""A service's custom templates must fit one SMS segment, with the longest values and the
service's autofill lines, unless the service sets ``allow_multipart`` — through the HTTP API,
on both storage backends."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Api
from tests.integration.test_refusals import assert_problem


def problem_of(response: Any, param: str | None = None) -> Any:
    """The body of a 400 invalid_request naming ``param``."""
    assert_problem(response, 400, "invalid_request", param)
    return response.json()


# One segment with a 6-digit code (157 septets), not with the 10-character code a
# verification may ask for (161: LabsMobile's sendCode chooses its code length).
LONG = "{code} " + "x" * 150
# Fits one segment with a 10-character code (10 + 1 + 140 = 151), not once a WebOTP line
# for shop.example (1 + 13 + 2 + 10 = 26 more) is added.
FITS_ALONE = "{code} " + "y" * 140


async def _create(api: Api, **fields: Any) -> Any:
    return await api.http.post("/v1/services", json={"name": "Acme", **fields}, headers=api.auth())


async def test_allow_multipart_defaults_to_false(api: Api) -> None:
    service = (await api.http.get(f"/v1/services/{api.service_id}", headers=api.auth())).json()
    assert service["allow_multipart"] is False


async def test_a_template_longer_than_one_segment_is_refused_naming_templates(api: Api) -> None:
    response = await _create(api, templates={"en": LONG})

    problem = problem_of(response, "templates")
    assert "allow_multipart" in problem["detail"]


async def test_the_longest_code_is_assumed_whatever_the_service_code_length(api: Api) -> None:
    # A verification may ask for a 10-character code (code_length in the start request).
    response = await _create(api, code_length=6, templates={"en": LONG})
    assert_problem(response, 400, "invalid_request", "templates")


async def test_the_autofill_lines_count(api: Api) -> None:
    assert (await _create(api, templates={"en": FITS_ALONE})).status_code == 201
    with_webotp = await _create(api, templates={"en": FITS_ALONE}, webotp_domain="shop.example")
    assert_problem(with_webotp, 400, "invalid_request", "templates")


async def test_allow_multipart_accepts_it_and_the_sms_goes_in_two_parts(api: Api) -> None:
    created = await _create(api, code_length=10, templates={"en": LONG}, allow_multipart=True)
    assert created.status_code == 201, created.text
    service = created.json()
    assert service["allow_multipart"] is True
    assert service["templates"] == {"en": LONG}
    # read back from storage
    again = await api.http.get(f"/v1/services/{service['id']}", headers=api.auth())
    assert again.json()["allow_multipart"] is True

    started = await api.http.post(
        "/v1/verifications",
        json={"service_id": service["id"], "to": "+34600000011"},
        headers=api.auth(),
    )
    assert started.status_code == 201, started.text
    (message,) = started.json()["messages"]
    assert message["segments"] == 2
    assert message["encoding"] == "GSM-7"
    await api.deliver()
    sent = api.sender.sent[-1]
    assert sent.sms is not None and sent.sms.segments == 2
    assert sent.text.endswith("x" * 150)


async def test_turning_allow_multipart_off_is_refused_while_a_template_needs_it(
    api: Api,
) -> None:
    sid = (await _create(api, templates={"en": LONG}, allow_multipart=True)).json()["id"]
    before = (await api.http.get(f"/v1/services/{sid}", headers=api.auth())).json()

    response = await api.http.patch(
        f"/v1/services/{sid}", json={"allow_multipart": False}, headers=api.auth()
    )

    assert_problem(response, 400, "invalid_request", "templates")
    after = (await api.http.get(f"/v1/services/{sid}", headers=api.auth())).json()
    assert after == before


async def test_allow_multipart_null_means_the_default(api: Api) -> None:
    sid = (await _create(api, allow_multipart=True)).json()["id"]
    patched = await api.http.patch(
        f"/v1/services/{sid}", json={"allow_multipart": None}, headers=api.auth()
    )
    assert patched.status_code == 200
    assert patched.json()["allow_multipart"] is False


async def test_even_multipart_has_a_limit(api: Api) -> None:
    response = await _create(api, templates={"en": "{code} " + "z" * 1600}, allow_multipart=True)
    problem = problem_of(response, "templates")
    assert "at most 10" in problem["detail"]


@pytest.mark.parametrize("value", ["yes", 1, "true"])
async def test_allow_multipart_must_be_a_boolean(api: Api, value: object) -> None:
    response = await _create(api, allow_multipart=value)
    assert_problem(response, 400, "invalid_request", "allow_multipart")


async def test_a_builtin_pushed_past_one_segment_by_the_name_is_allowed_with_multipart(
    api: Api,
) -> None:
    # A 40-character name, an Android hash and a 40-character WebOTP host: the built-ins are
    # proven to fit exactly this; one more character of host does not fit without multipart.
    fields = {
        "name": "N" * 40,
        "webotp_domain": "h" * 37 + ".com",
        "android_app_hash": "FA+9qCX9VSu",
    }
    refused = await api.http.post("/v1/services", json=fields, headers=api.auth())
    assert_problem(refused, 400, "invalid_request")
    # the SMS Retriever's 140-byte limit still applies with multipart: a hash needs one part
    still = await api.http.post(
        "/v1/services", json={**fields, "allow_multipart": True}, headers=api.auth()
    )
    assert_problem(still, 400, "invalid_request")
    no_hash = {k: v for k, v in fields.items() if k != "android_app_hash"}
    no_hash["webotp_domain"] = "h" * 60 + ".com"
    assert_problem(
        await api.http.post("/v1/services", json=no_hash, headers=api.auth()),
        400,
        "invalid_request",
    )
    accepted = await api.http.post(
        "/v1/services", json={**no_hash, "allow_multipart": True}, headers=api.auth()
    )
    assert accepted.status_code == 201, accepted.text
