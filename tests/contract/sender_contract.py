"""The contract every ``Sender`` (domain/ports.py) keeps, as a class each provider's own test
module subclasses with a ``case`` fixture for its real (or faithfully stubbed) counterpart::

    @pytest.fixture
    async def case(...) -> AsyncIterator[SenderCase]:
        ...

    class TestContract(SenderContract):
        pass

The helpers here (``make_sms``, ``make_email``, ``assert_no_secret``) are shared by those modules
too. A sender of another channel than SMS sets ``SenderCase.message`` (``make_email`` for e-mail).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from otpgate.adapters.providers.registry import PROVIDER_NAME
from otpgate.domain.model import Channel, EmailContent, OutboundMessage, SendReceipt, SmsContent
from otpgate.domain.ports import Sender
from otpgate.errors import DeliveryError, TransientDeliveryError

CODE = "845201"
TEXT = f"Your Acme code is {CODE}. Do not share it."
MESSAGE_ID = "msg_0123456789abcdef0123456789abcdef"
OTHER_ID = "msg_fedcba9876543210fedcba9876543210"


def make_sms(
    *,
    message_id: str = MESSAGE_ID,
    to: str = "+34600000000",
    text: str = TEXT,
    sender_id: str | None = "Acme",
    encoding: str = "GSM-7",
    segments: int = 1,
    receipt_url: str | None = None,
) -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id,
        channel=Channel.SMS,
        to=to,
        text=text,
        receipt_url=receipt_url,
        sms=SmsContent(sender_id=sender_id, encoding=encoding, segments=segments),
    )


def make_email(
    *,
    message_id: str = MESSAGE_ID,
    to: str = "ana@example.com",
    text: str = TEXT,
    subject: str = "Your Acme verification code",
    html: str = f"<p>Your Acme code is <b>{CODE}</b>. Do not share it.</p>",
    locale: str = "en",
) -> OutboundMessage:
    return OutboundMessage(
        message_id=message_id,
        channel=Channel.EMAIL,
        to=to,
        text=text,
        locale=locale,
        email=EmailContent(subject=subject, html=html),
    )


def assert_no_secret(exc: BaseException, *secrets: str) -> None:
    """Neither the message text, nor the code, nor any given secret appears in what an error
    report would show: str, repr, detail, and the formatted chain with its causes."""
    shown = "\n".join(
        [str(exc), repr(exc), str(getattr(exc, "detail", "")), *traceback.format_exception(exc)]
    )
    for secret in (TEXT, CODE, *secrets):
        assert secret not in shown


def _sms_with_id(message_id: str) -> OutboundMessage:
    return make_sms(message_id=message_id)


@dataclass
class SenderCase:
    """A sender under contract, with what the suite needs to observe it."""

    sender: Sender
    secrets: tuple[str, ...]
    #: the texts that reached the destination (server, stub or stream), in order; a sender
    #: whose counterpart delivers asynchronously (SMPP, Kannel) waits for them here
    delivered_texts: Callable[[], list[str]]
    #: make the next send fail transiently, the way this provider fails
    break_next_send: Callable[[], None]
    #: a message with ``TEXT`` on the sender's channel, by message id (an SMS by default)
    message: Callable[[str], OutboundMessage] = field(default=_sms_with_id)
    #: make ``check`` fail (unreachable or refused), or None when nothing can fail it
    break_check: Callable[[], None] | None = None


class SenderContract:
    """The contract; subclass it in a module that defines the ``case`` fixture."""

    async def test_send_returns_a_receipt_and_the_message_goes_out(self, case: SenderCase) -> None:
        receipt = await case.sender.send(case.message(MESSAGE_ID))

        assert isinstance(receipt, SendReceipt)
        assert receipt.provider_ref
        assert case.delivered_texts() == [TEXT]

    async def test_each_send_goes_out_once_with_its_own_reference(self, case: SenderCase) -> None:
        first = await case.sender.send(case.message(MESSAGE_ID))
        second = await case.sender.send(case.message(OTHER_ID))

        assert first.provider_ref != second.provider_ref
        assert case.delivered_texts() == [TEXT, TEXT]

    async def test_name_is_a_stable_identifier(self, case: SenderCase) -> None:
        assert isinstance(case.sender.name, str)
        assert PROVIDER_NAME.fullmatch(case.sender.name)

    async def test_channels_say_what_the_sender_carries(self, case: SenderCase) -> None:
        assert isinstance(case.sender.channels, frozenset)
        assert case.sender.channels
        assert case.sender.channels <= set(Channel)
        assert case.message(MESSAGE_ID).channel in case.sender.channels

    async def test_reprs_never_carry_the_text_or_secrets(self, case: SenderCase) -> None:
        message = case.message(MESSAGE_ID)
        receipt = await case.sender.send(message)

        for shown in (repr(case.sender), str(case.sender), repr(message), repr(receipt)):
            for secret in (TEXT, CODE, *case.secrets):
                assert secret not in shown

    async def test_a_failed_send_raises_a_delivery_error_without_the_text(
        self, case: SenderCase
    ) -> None:
        case.break_next_send()

        with pytest.raises(TransientDeliveryError) as info:
            await case.sender.send(case.message(MESSAGE_ID))

        assert isinstance(info.value, DeliveryError)
        assert_no_secret(info.value, *case.secrets)
        assert case.delivered_texts() == []

    async def test_check_connects_and_sends_nothing(self, case: SenderCase) -> None:
        await case.sender.check()

        assert case.delivered_texts() == []

    async def test_a_failed_check_raises_a_delivery_error_without_secrets(
        self, case: SenderCase
    ) -> None:
        if case.break_check is None:
            pytest.skip("nothing can make this sender's check fail")
        case.break_check()

        with pytest.raises(DeliveryError) as info:
            await case.sender.check()

        assert_no_secret(info.value, *case.secrets)
