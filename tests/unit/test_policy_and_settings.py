"""Policy functions, phone rules, and start-up configuration checks (S6, S9, S12, S17)."""

from __future__ import annotations

import doctest
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from otpgate.adapters.storage import engine
from otpgate.bootstrap import build_sender, derive_keys, load_master_secret
from otpgate.domain import ascii as ascii_text
from otpgate.domain import phone
from otpgate.domain import policy as rules
from otpgate.domain.model import Channel, Verification, VerificationStatus
from otpgate.errors import (
    ConfigurationError,
    InvalidPhoneNumber,
    InvalidRequest,
    MaxSendAttemptsReached,
    ResendTooSoon,
    UnsupportedNumberType,
)
from otpgate.settings import Settings

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def verification(**changes: object) -> Verification:
    values: dict[str, object] = dict(
        id="ver_x",
        account_id="acc_x",
        service_id="svc_x",
        to="+34600000001",
        channel=Channel.SMS,
        status=VerificationStatus.PENDING,
        code_digest=b"x" * 32,
        code_sealed=b"y",
        locale="en",
        created_at=NOW,
        updated_at=NOW,
        expires_at=NOW + timedelta(minutes=10),
        last_sent_at=NOW,
        check_attempts=0,
        max_check_attempts=5,
        send_attempts=1,
        max_send_attempts=5,
    )
    values.update(changes)
    return Verification(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("module", [phone, engine, ascii_text])
def test_doctests(module: object) -> None:
    assert doctest.testmod(module).failed == 0  # type: ignore[arg-type]


def test_expired_is_reported_from_expires_at() -> None:
    v = verification()
    assert v.status_at(NOW + timedelta(seconds=599)) is VerificationStatus.PENDING
    assert v.status_at(NOW + timedelta(seconds=600)) is VerificationStatus.EXPIRED
    closed = verification(status=VerificationStatus.APPROVED)
    assert closed.status_at(NOW + timedelta(days=1)) is VerificationStatus.APPROVED


def test_resend_rules_and_their_precedence() -> None:
    rules.refuse_resend(verification(), interval_seconds=30, now=NOW + timedelta(seconds=30))
    with pytest.raises(ResendTooSoon) as early:
        rules.refuse_resend(verification(), interval_seconds=30, now=NOW + timedelta(seconds=0.2))
    assert early.value.retry_after == 30  # 29.8 s rounded up
    with pytest.raises(MaxSendAttemptsReached):
        rules.refuse_resend(verification(send_attempts=5), interval_seconds=30, now=NOW)


def test_policy_defaults_and_short_code_warning(caplog: pytest.LogCaptureFixture) -> None:
    policy = rules.build_policy({"name": "Acme"})
    assert (
        policy.code_length,
        policy.ttl_seconds,
        policy.max_check_attempts,
        policy.max_send_attempts,
        policy.resend_interval_seconds,
    ) == (6, 600, 5, 5, 30)
    with caplog.at_level(logging.WARNING):
        rules.build_policy({"name": "Acme", "code_length": 4})
    assert "fewer than 6" in caplog.text


@pytest.mark.parametrize(
    ("number", "error"),
    [
        ("+34910000000", UnsupportedNumberType),  # fixed line
        ("+34900000000", UnsupportedNumberType),  # toll free
        ("+34803000000", UnsupportedNumberType),  # premium rate
        ("+34999999999", InvalidPhoneNumber),
        ("+1", InvalidPhoneNumber),
    ],
)
def test_number_types(number: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        phone.require_sms_capable(phone.parse_phone(number))


def test_mobile_numbers_pass() -> None:
    for number in ("+34600000001", "+447911123456", "+4915123456789"):
        phone.require_sms_capable(phone.parse_phone(number))


# --- settings and secrets (S17) --------------------------------------------------------------


def test_production_requires_a_secret_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="OTPGATE_SECRET_KEY"):
        load_master_secret(Settings(env="production", data_dir=tmp_path))
    assert not (tmp_path / "secret.key").exists()


def test_development_key_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    first = load_master_secret(Settings(env="development", data_dir=tmp_path))
    key_file = tmp_path / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert load_master_secret(Settings(env="development", data_dir=tmp_path)) == first


def test_key_file_must_be_private(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("k" * 48)
    key_file.chmod(0o644)
    with pytest.raises(ConfigurationError, match="0600"):
        load_master_secret(Settings(env="production", secret_key_file=key_file))
    key_file.chmod(0o600)
    assert load_master_secret(Settings(env="production", secret_key_file=key_file)) == b"k" * 48


def test_short_secret_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="32 bytes"):
        load_master_secret(Settings(secret_key="short"))


def test_derived_keys_differ_by_purpose_and_hide() -> None:
    keys = derive_keys(b"m" * 32)
    assert len({keys.digest, keys.sealing, keys.receipts}) == 3
    assert keys.receipt_token("labsmobile") != keys.receipt_token("twilio")
    assert "m" * 8 not in repr(keys)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sms_provider": "pigeon"}, "not a provider"),
        ({"sms_provider": "labsmobile"}, "OTPGATE_LABSMOBILE_USERNAME"),
        ({"sms_provider": "console", "env": "production"}, "console"),
    ],
)
def test_bad_provider_settings_fail_at_start(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_sender(Settings(**values))  # type: ignore[arg-type]


def test_database_urls() -> None:
    with pytest.raises(ConfigurationError, match="unsupported"):
        engine.async_url("mysql://root@127.0.0.1/test")
    assert Settings(data_dir=Path("/d")).effective_database_url == "sqlite:////d/otpgate.db"


@pytest.mark.parametrize("typed", ["ß", "ﬀ", "ſs", "ı" + "e"])
def test_a_country_code_is_ascii_however_unicode_would_upper_case_it(typed: str) -> None:
    """ "ß".upper() is "SS" (South Sudan): such text is refused, not read as a country."""
    from otpgate.domain.fraud import validate_country
    from otpgate.services.billing import parse_price_file

    with pytest.raises(InvalidRequest) as refused:
        rules.build_policy({"name": "x", "allowed_countries": [typed]})
    assert refused.value.param == "allowed_countries"
    with pytest.raises(InvalidRequest):
        validate_country(typed)
    with pytest.raises(InvalidRequest) as bad_file:
        parse_price_file(f"country,credits\n{typed},1\n")
    assert bad_file.value.param == "line 2"
    assert rules.build_policy({"name": "x", "allowed_countries": ["es"]}).allowed_countries == (
        "ES",
    )


@pytest.mark.parametrize("code", ["XX", "ZZ", "AA", "EU"])
def test_a_country_must_be_an_assigned_region(code: str) -> None:
    """Two letters are not enough: XX is no country, and no number belongs to it."""
    from otpgate.domain.fraud import validate_country

    with pytest.raises(InvalidRequest) as refused:
        rules.build_policy({"name": "x", "allowed_countries": ["ES", code]})
    assert refused.value.param == "allowed_countries"
    with pytest.raises(InvalidRequest):
        validate_country(code)
    assert validate_country(" ph ") == "PH"


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example:99999/x", "https://hooks.example:0/x", "http://hooks.example:abc/"],
)
def test_a_webhook_url_names_a_real_port(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        rules.build_policy({"name": "x", "webhook_url": url})
    assert refused.value.param == "webhook_url"
    assert rules.build_policy({"name": "x", "webhook_url": "https://hooks.example:8443/x"})


def test_a_client_ip_names_no_zone() -> None:
    with pytest.raises(InvalidRequest) as refused:
        rules.validate_client_ip("fe80::1%eth0")
    assert refused.value.param == "client_ip"
    assert rules.validate_client_ip("2001:DB8::1") == "2001:db8::1"


def test_a_national_number_needs_an_ascii_country() -> None:
    """ "ß" is not South Sudan's SS: a national number with it is refused, not read there."""
    with pytest.raises(InvalidPhoneNumber):
        phone.parse_phone("912345678", "ß")
    assert phone.parse_phone("912345678", "es").e164 == "+34912345678"
