"""Plain SMS: a text to one or more numbers, through the same outbox, dispatcher, providers,
encoding, segment count, price and credit as verification messages.

Everything that can refuse a send is checked for every recipient before anything is stored:
a batch is accepted whole, and its price debited in the same transaction as its messages, or
refused whole.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from otpgate.domain import sms
from otpgate.domain.model import Channel, Message, MessageStatus, Principal, new_id
from otpgate.domain.phone import mask, parse_phone, require_sms_capable
from otpgate.domain.ports import (
    ClaimedMessage,
    Clock,
    Metrics,
    Outbox,
    PlainMessage,
    PlainMessageStore,
)
from otpgate.errors import InvalidRequest, NotFound, SpendCapReached
from otpgate.services.billing import Billing
from otpgate.services.fraud import FraudGuard
from otpgate.services.spend import SpendCaps

log = logging.getLogger(__name__)

#: The most SMS parts one message may take (LabsMobile's ``long`` allows 459 GSM-7 characters,
#: 3 parts; otpgate's own API allows a little more).
MAX_SEGMENTS = 10
MAX_LABEL_LENGTH = 255
MAX_CLIENT_REF_LENGTH = 20
#: Messages carry no locale; the column wants one (BCP 47 "undetermined").
NO_LOCALE = "und"


@dataclass(frozen=True, slots=True)
class SmsRequest:
    """A plain SMS to send. ``to`` holds numbers in E.164 (or national with ``country``)."""

    to: Sequence[str]
    text: str
    country: str | None = None
    sender_id: str | None = None
    #: The caller's own reference (LabsMobile ``subid``), echoed in forwarded delivery reports.
    client_ref: str | None = None
    label: str | None = None
    #: Where delivery reports for these messages are forwarded (checked by the caller's surface).
    ack_url: str | None = None
    #: Not sent before this time; None: at once.
    scheduled_at: datetime | None = None
    #: Refuse a text outside GSM-7 (LabsMobile without ``ucs2``) instead of sending it as UCS-2.
    gsm7_only: bool = False
    #: The most parts the text may take (LabsMobile without ``long``: 1).
    max_segments: int = MAX_SEGMENTS
    max_recipients: int = 10_000
    #: Check, measure and price everything, store and send nothing (LabsMobile test mode).
    test: bool = False


class Messaging:
    def __init__(
        self,
        *,
        messages: PlainMessageStore,
        billing: Billing | None,
        clock: Clock,
        metrics: Metrics,
        outbox: Outbox,
        fraud: FraudGuard | None = None,
        spend: SpendCaps | None = None,
    ) -> None:
        """``spend`` applies the account's daily spend cap; without it none applies."""
        self._messages = messages
        self._spend = spend
        self._billing = billing
        self._clock = clock
        self._metrics = metrics
        self._outbox = outbox
        self._fraud = fraud

    def now(self) -> datetime:
        """The time sends are measured against (a ``scheduled_at`` not after it is due)."""
        return self._clock.now()

    async def send(self, principal: Principal, request: SmsRequest) -> list[Message]:
        """Queue the text to every recipient (or, in test mode, only check and price it).
        Returns the messages as stored (or as they would be)."""
        # 1. The text, the sender and the caller's fields.
        if not isinstance(request.text, str) or not request.text.strip():
            raise InvalidRequest("the message text is empty", param="text")
        shape = sms.measure(request.text)
        if request.gsm7_only and shape.encoding != "GSM-7":
            raise InvalidRequest(
                "the text has characters outside GSM-7; send it as Unicode", param="text"
            )
        if shape.segments > request.max_segments:
            raise InvalidRequest(
                f"the text needs {shape.segments} SMS parts; at most {request.max_segments}",
                param="text",
            )
        sender_id = None if request.sender_id is None else sms.validate_sender_id(request.sender_id)
        _check_text_field(request.client_ref, MAX_CLIENT_REF_LENGTH, "client_ref")
        _check_text_field(request.label, MAX_LABEL_LENGTH, "label")
        # 2. Every recipient: a valid number that receives SMS.
        if not request.to:
            raise InvalidRequest("there are no recipients", param="to")
        if len(request.to) > request.max_recipients:
            raise InvalidRequest(
                f"at most {request.max_recipients} recipients per request", param="to"
            )
        destinations = []
        for raw in request.to:
            destination = parse_phone(raw, request.country)
            require_sms_capable(destination)
            if self._fraud is not None:
                # The account's deny list and the deployment's blocks (unless safe-listed);
                # the detector judges verifications only: a plain SMS has nothing to convert.
                await self._fraud.refuse_denied(principal.account.id, destination)
                await self._fraud.screen(
                    account_id=principal.account.id,
                    service_id=None,
                    destination=destination,
                    level=None,
                )
            destinations.append(destination)
        # 3. The price of each message (a prepaid account cannot send where none applies), and
        #    what it counts against the account's daily spend cap.
        now = self._clock.now()
        caps = () if self._spend is None else self._spend.caps(principal.account)
        batch = []
        for destination in destinations:
            message = Message(
                id=new_id("msg"),
                account_id=principal.account.id,
                verification_id=None,
                channel=Channel.SMS,
                to=destination.e164,
                status=MessageStatus.QUEUED,
                locale=NO_LOCALE,
                segments=shape.segments,
                encoding=shape.encoding,
                created_at=now,
                updated_at=now,
                sender_id=sender_id,
                client_ref=request.client_ref,
                label=request.label,
                ack_url=request.ack_url,
            )
            if self._billing is not None:
                price = await self._billing.price(
                    principal.account, country=destination.country, segments=shape.segments
                )
                if price is not None:
                    message = replace(message, price_units=price)
            if self._spend is not None:
                message = self._spend.counted(message, caps)
            batch.append(PlainMessage(message, request.text, not_before=request.scheduled_at))
        if request.test:
            return [item.message for item in batch]
        # 4. One transaction: the messages and their debit, or nothing.
        lease_until = None if request.scheduled_at else self._outbox.lease_until(now)
        try:
            await self._messages.create_messages(batch, lease_until=lease_until, caps=caps)
        except SpendCapReached as exc:
            if self._spend is not None:
                await self._spend.refused(exc, account_id=principal.account.id, service_id=None)
            raise
        for item in batch:
            if lease_until is None:
                self._outbox.queued()
            else:
                claimed = replace(item.message, attempts=item.message.attempts + 1)
                self._outbox.queued(
                    ClaimedMessage(claimed, None, None, lease_until, body=item.body)
                )
        self._metrics.count("message_queued", channel=Channel.SMS.value)
        log.info(
            "plain messages queued",
            extra={"count": len(batch), "to": mask(batch[0].message.to)},
        )
        return [item.message for item in batch]

    async def cancel_scheduled(self, principal: Principal, client_ref: str) -> int:
        """Cancel the scheduled messages sent with this reference that have not gone out;
        their price is refunded. How many were canceled."""
        return await self._messages.cancel_scheduled(
            principal.account.id, client_ref, self._clock.now()
        )

    async def send_scheduled_now(self, principal: Principal, client_ref: str) -> int:
        """Send the scheduled messages with this reference now; how many."""
        released = await self._messages.release_scheduled(
            principal.account.id, client_ref, self._clock.now()
        )
        if released:
            self._outbox.queued()
        return released

    async def get(self, principal: Principal, message_id: str) -> Message:
        found = await self._messages.get_message(principal.account.id, message_id)
        if found is None:
            raise NotFound("no such message")
        return found


def _check_text_field(value: str | None, longest: int, param: str) -> None:
    if value is not None and (not value or len(value) > longest or not value.isprintable()):
        raise InvalidRequest(f"{param} must be 1 to {longest} printable characters", param=param)
