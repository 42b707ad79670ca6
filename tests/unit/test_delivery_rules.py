"""The pure rules of delivery: capped backoff, when a message gives up, and the tally of
unanswered sends kept in a message's error text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from otpgate.services.delivery import (
    MAX_ERROR_LENGTH,
    RetryPolicy,
    unanswered_sends,
    with_unanswered,
)

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
DEFAULTS = RetryPolicy()  # the product's defaults: 5 attempts, 2 s doubling up to 30 s


@pytest.mark.parametrize(
    ("rounds", "step"),
    [(1, 2), (2, 4), (3, 8), (4, 16), (5, 30), (6, 30), (40, 30), (5000, 30)],
)
def test_backoff_doubles_up_to_the_cap_plus_at_most_a_quarter(rounds: int, step: float) -> None:
    for _ in range(50):  # the jitter is random: its bounds hold every time
        assert step <= DEFAULTS.delay(rounds) < step * 1.25


def test_a_cap_below_the_first_step_wins() -> None:
    policy = RetryPolicy(backoff_seconds=10, backoff_max_seconds=3)
    assert 3 <= policy.delay(1) < 3.75


def test_moving_on_to_a_later_provider_is_at_once() -> None:
    assert (
        DEFAULTS.next_attempt_at(
            NOW, attempt=1, rounds=1, at_once=True, expires_at=NOW + timedelta(minutes=10)
        )
        == NOW
    )


def test_a_verification_message_retries_past_max_attempts_until_it_expires() -> None:
    expires_at = NOW + timedelta(minutes=10)
    later = DEFAULTS.next_attempt_at(
        NOW, attempt=50, rounds=50, at_once=False, expires_at=expires_at
    )
    assert later is not None and NOW + timedelta(seconds=30) <= later < expires_at
    # ...but never at or after the expiry: a code that arrives then cannot be approved.
    assert (
        DEFAULTS.next_attempt_at(
            NOW, attempt=3, rounds=3, at_once=False, expires_at=NOW + timedelta(seconds=8)
        )
        is None
    )
    assert DEFAULTS.next_attempt_at(NOW, attempt=1, rounds=1, at_once=True, expires_at=NOW) is None


def test_a_message_without_a_verification_gives_up_after_max_attempts() -> None:
    assert DEFAULTS.next_attempt_at(NOW, attempt=4, rounds=4, at_once=False, expires_at=None)
    assert (
        DEFAULTS.next_attempt_at(NOW, attempt=5, rounds=5, at_once=False, expires_at=None) is None
    )
    assert DEFAULTS.next_attempt_at(NOW, attempt=5, rounds=3, at_once=True, expires_at=None) is None


def test_the_unanswered_tally_round_trips_through_the_error_text() -> None:
    error = with_unanswered("labsmobile: no answer within the timeout", {"labsmobile": 1, "b": 2})
    assert error == "labsmobile: no answer within the timeout [unanswered: b=2, labsmobile=1]"
    assert unanswered_sends(error) == {"labsmobile": 1, "b": 2}
    # A new error replaces the old text, not the tally the caller passes on.
    again = with_unanswered(error, {"labsmobile": 2})
    assert again == "labsmobile: no answer within the timeout [unanswered: labsmobile=2]"


@pytest.mark.parametrize(
    "error",
    [
        None,
        "",
        "labsmobile: server error (HTTP 503)",
        "[unanswered: labsmobile=1] at the start",
        "provider said [unanswered: Not A Name=1]",
        "provider said [unanswered: labsmobile=x]",
    ],
)
def test_text_without_a_well_formed_tally_counts_nothing(error: str | None) -> None:
    assert unanswered_sends(error) == {}


def test_a_long_error_is_cut_and_keeps_its_tally() -> None:
    error = with_unanswered("x" * 2000, {"labsmobile": 1})
    assert len(error) == MAX_ERROR_LENGTH
    assert unanswered_sends(error) == {"labsmobile": 1}
    assert len(with_unanswered("y" * 2000, {})) == MAX_ERROR_LENGTH
