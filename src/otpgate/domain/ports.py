"""The small Protocols that the services depend on; adapters implement them.

Each docstring is the contract every implementation must keep, checked by the suites under
``tests/contract``. Methods that look something up return ``None`` when nothing is found; they
raise only :class:`otpgate.errors.Unavailable` (storage down) or, for senders,
:class:`otpgate.errors.TransientDeliveryError` (and its :class:`otpgate.errors.DeliveryTimeout`) /
:class:`otpgate.errors.PermanentDeliveryError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from otpgate.domain.billing import LedgerEntry
from otpgate.domain.fraud import Block, Conversion, ListEntry, ListName
from otpgate.domain.model import (
    Account,
    ApiKey,
    AttemptOutcome,
    Channel,
    Message,
    MessageStatus,
    OutboundMessage,
    SendReceipt,
    Service,
    ServicePolicy,
    Verification,
    VerificationStatus,
)
from otpgate.domain.spend import SpendCap

if TYPE_CHECKING:  # domain.events builds on the Event below
    from otpgate.domain.events import AuditRecord, EventRecord


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


# --------------------------------------------------------------------------------------------
# Delivery


class Sender(Protocol):
    """Hands one message to a provider, on one of the channels it carries.

    ``name`` is the sender's stable identifier in routes, metrics, stored messages and receipt
    URLs (lower case letters, digits, ``-`` and ``_``). ``channels`` says what it can carry;
    the dispatcher only gives it messages of those channels.

    ``send`` returns when the provider has accepted the message, with the provider's reference
    if it gives one. It raises ``TransientDeliveryError`` when the message certainly did not go
    out and a later attempt (or another provider) may succeed; its subclass ``DeliveryTimeout``
    when the request went out but no answer came in time, so the provider may have sent it; and
    ``PermanentDeliveryError`` when this message can never go out on this route. A send does
    not outlast the timeout the sender was built with. It never logs ``message.text``.
    """

    name: str
    channels: frozenset[Channel]

    async def send(self, message: OutboundMessage) -> SendReceipt: ...

    async def check(self) -> None:
        """Connect to the provider without sending anything (an SMPP bind, an HTTP request
        that proves reachability and credentials). Raises a ``DeliveryError`` subclass whose
        text names the failure and carries no secret."""
        ...

    async def aclose(self) -> None:
        """Release connections; the sender is not used afterwards."""
        ...


@dataclass(frozen=True, slots=True)
class DeliveryReport:
    """A provider's delivery receipt, translated: which message (by the reference we gave the
    provider) and its new status. ``status`` is ``None`` when the report changes nothing."""

    provider_ref: str
    status: MessageStatus | None
    detail: str | None = None


@runtime_checkable
class ReceiptParser(Protocol):
    def parse_receipt(self, params: Mapping[str, str]) -> DeliveryReport | None:
        """The report carried by a receipt request's parameters, or ``None`` if it names no
        message. Authentication of the request is the caller's job, not the parser's."""
        ...


#: Where a provider hands the reports that arrive on its own connection.
ReportSink = Callable[[DeliveryReport], Awaitable[object]]


@runtime_checkable
class ReportSource(Protocol):
    """A sender whose delivery reports arrive on its own connection (an SMPP bind's
    ``deliver_sm``) rather than at otpgate's receipt URL."""

    def report_to(self, sink: ReportSink) -> None:
        """Hand every report received from now on to ``sink`` (awaited; a sink that raises
        is logged and the report acknowledged anyway)."""
        ...


@runtime_checkable
class ReceiptAuthenticator(Protocol):
    """A receipt parser whose provider signs its requests (Twilio's ``X-Twilio-Signature``).
    The receipt endpoint checks the URL's token first, then this."""

    def authenticate_receipt(
        self, url: str, params: Mapping[str, str], headers: Mapping[str, str]
    ) -> bool:
        """True when the request to ``url`` (the receipt URL otpgate gave the provider, built
        from ``OTPGATE_PUBLIC_URL`` with the request's own query, token included) with
        ``params`` (the fields of its POST body; the query is part of ``url``) and
        ``headers`` (lower-case names) carries the provider's valid signature."""
        ...


class Outbox(Protocol):
    """Where committed messages are announced (the delivery dispatcher)."""

    def lease_until(self, now: datetime) -> datetime | None:
        """A lease to write with a message queued now, if the caller's process will send it
        itself; None to leave it for whichever dispatcher claims it."""
        ...

    def queued(self, item: ClaimedMessage | None = None) -> None:
        """A message was committed: ``item`` (leased) to send now, or None to wake a claimer."""
        ...


# --------------------------------------------------------------------------------------------
# Storage

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """An outbox row claimed by a dispatcher, with what it needs to render and send it."""

    message: Message
    verification: Verification | None
    service: Service | None
    #: Until when this dispatcher holds the message (no other may claim it before).
    lease_until: datetime | None = None
    #: The text of a plain SMS (a verification's message is rendered from its sealed code
    #: instead, and its stored body is masked).
    body: str | None = None


@dataclass(frozen=True, slots=True)
class Callback:
    """An outbound call owed to a caller: a GET of ``url`` carrying what happened to a message
    (``params``: ``status``, ``detail``, ``client_ref``, ``to``, ``reported_at``; the surface
    that sends it words them in its own protocol, e.g. LabsMobile's ack parameters)."""

    id: str
    account_id: str
    message_id: str | None
    url: str
    params: dict[str, str]
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class PlainMessage:
    """A plain SMS to store in the outbox: the message (with its price, when one applies) and
    its text, which carries no code and is kept as it is."""

    message: Message
    body: str
    #: Not sent before this time (a scheduled message); None: at once.
    not_before: datetime | None = None


@dataclass(frozen=True, slots=True)
class Lockout:
    """A destination's record of consecutive failed checks in one service (across its
    verifications): how many so far, and the end of the lock when one is in force."""

    failures: int = 0
    locked_until: datetime | None = None

    def in_force(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now


NO_LOCKOUT = Lockout()


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: Sequence[T]
    next_cursor: str | None


class AccountStore(Protocol):
    async def create_account(self, account: Account) -> None:
        """Insert (with its billing mode and balance); ``InvalidRequest(param="username")`` if
        the username is taken."""
        ...

    async def get_account(self, account_id: str) -> Account | None: ...

    async def first_admin_account(self) -> Account | None:
        """The oldest admin account, or ``None`` on a fresh installation."""
        ...

    async def list_accounts(self, *, limit: int, cursor: str | None) -> Page[Account]: ...

    async def create_key(self, key: ApiKey) -> None: ...

    async def get_key_by_hash(self, key_hash: str) -> tuple[ApiKey, Account] | None:
        """The live (not revoked) key with this hash and its account."""
        ...

    async def list_keys(self, account_id: str) -> Sequence[ApiKey]: ...

    async def set_daily_spend_cap(self, account_id: str, cap: int | None) -> Account | None:
        """Set the account's daily spend cap (units; None removes it); the updated account,
        or None when there is no such account."""
        ...

    async def revoke_key(self, account_id: str, key_id: str, now: datetime) -> bool:
        """True when a live key of this account was revoked."""
        ...


class ServiceStore(Protocol):
    async def create_service(self, service: Service) -> None: ...

    async def get_service(self, account_id: str, service_id: str) -> Service | None:
        """The service if it exists, belongs to the account and is not deleted."""
        ...

    async def get_service_by_name(self, account_id: str, name: str) -> Service | None:
        """The account's oldest live service with this name (names are not unique)."""
        ...

    async def list_services(
        self, account_id: str, *, limit: int, cursor: str | None
    ) -> Page[Service]: ...

    async def update_service(
        self, account_id: str, service_id: str, policy: ServicePolicy, now: datetime
    ) -> Service | None: ...

    async def delete_service(self, account_id: str, service_id: str, now: datetime) -> bool: ...


class VerificationStore(Protocol):
    async def pending_for_destination(
        self, service_id: str, to: str, now: datetime
    ) -> tuple[Verification | None, Lockout]:
        """The pending verification of (service, to), if there is one and its time is not up
        (one whose time is up is written ``expired``, its sealed code erased, on the way), with
        its ``messages`` left empty; and the destination's lockout record. Read together."""
        ...

    async def create_verification(
        self,
        verification: Verification,
        message: Message,
        *,
        body_masked: str,
        supersede: str | None = None,
        lease_until: datetime | None = None,
        caps: Sequence[SpendCap] = (),
    ) -> bool:
        """In one transaction: cancel ``supersede`` if it is still pending, insert the
        verification and its first outbox message (kept with ``body_masked``, the text with
        the code masked), and, when the message has a price, debit it from the account with a
        ledger entry. With ``lease_until`` the message is inserted already claimed (one
        attempt counted) by the caller's own dispatcher. False (nothing written) when another
        verification for the same (service, to) is pending already; ``InsufficientCredit``
        (nothing written) when the account is prepaid and its balance does not cover the
        price. With ``caps``, the message's ``spend_units`` are counted against each of them
        for the UTC day of its ``created_at`` in the same transaction; ``SpendCapReached``
        (nothing written) when that would take one past its limit. A verification or message
        marked ``test`` is stored as it is (the caller gives a test message no price, no caps
        and no lease)."""
        ...

    async def record_resend(
        self,
        verification_id: str,
        message: Message,
        *,
        body_masked: str,
        now: datetime,
        interval_seconds: int,
        lease_until: datetime | None = None,
        caps: Sequence[SpendCap] = (),
    ) -> Verification | None:
        """In one transaction, if the verification is pending, unexpired, below its send cap
        and its last send is at least ``interval_seconds`` old: count the send, queue
        ``message`` (claimed until ``lease_until``, as in ``create_verification``) and debit
        its price and counts it against ``caps`` as ``create_verification`` does
        (``InsufficientCredit`` or ``SpendCapReached``, nothing written).
        Returns the updated verification, or ``None`` when a condition failed (the caller
        re-reads to tell which)."""
        ...

    async def get_verification(
        self, account_id: str, verification_id: str
    ) -> Verification | None: ...

    async def latest_verification(
        self, account_id: str, service_id: str, to: str
    ) -> Verification | None: ...

    async def list_verifications(
        self,
        account_id: str,
        *,
        service_id: str | None,
        status: VerificationStatus | None,
        to: str | None,
        limit: int,
        cursor: str | None,
        now: datetime,
    ) -> Page[Verification]: ...

    async def verification_for_check(
        self, account_id: str, verification_id: str
    ) -> tuple[Verification | None, Lockout]:
        """The account's verification (its ``messages`` left empty) and its destination's
        lockout record; read together."""
        ...

    async def approve(self, verification_id: str, now: datetime, *, clear_failures: bool) -> bool:
        """Atomically move a pending, unexpired verification with attempts left to
        ``approved`` and erase its sealed code; with ``clear_failures``, in the same
        transaction, clear its destination's consecutive-failure record. True for exactly one
        caller, however many race."""
        ...

    async def record_failed_check(self, verification_id: str, now: datetime) -> int | None:
        """Atomically count one wrong code on a pending, unexpired verification with attempts
        left; on the last allowed attempt it becomes ``max_attempts_reached`` (sealed code
        erased). Returns the new ``check_attempts`` or ``None`` if nothing was counted."""
        ...

    async def close(self, verification_id: str, status: VerificationStatus, now: datetime) -> bool:
        """Move a pending verification to a terminal ``status`` and erase its sealed code."""
        ...


class LockoutStore(Protocol):
    """Consecutive failed checks per (service, destination), across verifications."""

    async def lockout(self, service_id: str, to: str) -> Lockout:
        """The (service, destination) record of consecutive failures (``NO_LOCKOUT`` when
        there is none)."""
        ...

    async def record_destination_failure(
        self, service_id: str, to: str, *, now: datetime, threshold: int, lock_seconds: int
    ) -> int:
        """Count one more consecutive failure; at ``threshold`` lock the destination for
        ``lock_seconds`` and reset the count. Returns the count after this failure."""
        ...

    async def reset_destination_failures(self, service_id: str, to: str) -> None:
        """A success (or an operator) clears the consecutive-failure count and any lock."""
        ...


class PriceStore(Protocol):
    async def price_table(self) -> dict[str, int]:
        """Units per SMS segment by ISO country code (``*`` for the default); empty when no
        price table is loaded."""
        ...

    async def replace_prices(self, prices: Mapping[str, int], now: datetime) -> None:
        """Replace the whole table with ``prices``, in one transaction."""
        ...


class BillingStore(Protocol):
    async def add_credit(
        self, account_id: str, amount: int, *, note: str | None, now: datetime
    ) -> LedgerEntry | None:
        """Top up an account by ``amount`` units with a ledger entry, atomically; None when
        there is no such account."""
        ...

    async def list_ledger(
        self, account_id: str, *, limit: int, cursor: str | None
    ) -> Page[LedgerEntry]:
        """The account's ledger, newest first."""
        ...


class MessageStore(Protocol):
    async def claim_due(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[ClaimedMessage]:
        """Lease up to ``limit`` queued messages whose next attempt is due and whose lease (if
        any) has lapsed, so two dispatchers never hold the same one. Each claim counts an
        attempt. Returns them with their verification (and sealed code) and service."""
        ...

    async def mark_sent(
        self, message_id: str, *, provider: str, receipt: SendReceipt, now: datetime
    ) -> None:
        """Record that a provider accepted the message, if it is still queued. No lease is
        asked for: an acceptance is a fact whichever claim made it, and recording it stops
        any other claim from sending the message again."""
        ...

    async def mark_retry(
        self,
        message_id: str,
        *,
        provider: str | None,
        error: str,
        next_attempt_at: datetime,
        now: datetime,
        outcome: AttemptOutcome = AttemptOutcome.RETRY,
        counted: bool = True,
        lease_until: datetime | None = None,
    ) -> None:
        """Schedule another attempt at ``next_attempt_at`` and record this one in the
        message's history with ``outcome``; ``mark_sent`` and ``mark_failed`` record theirs
        the same way, in the same statement. ``counted`` false takes back the attempt the
        claim counted (nothing was attempted: the provider was not connected).

        Like ``mark_failed``, it changes only a queued message and, given the ``lease_until``
        of the caller's claim, only while the message still carries that lease: a dispatcher
        that stalled past its lease, and whose message another has claimed since, changes
        nothing (the newer claim decides). The dispatcher always passes its lease."""
        ...

    async def mark_failed(
        self,
        message_id: str,
        *,
        provider: str | None,
        error: str,
        now: datetime,
        lease_until: datetime | None = None,
    ) -> Verification | None:
        """Fail the message for good and refund its price (with a ledger entry) and give its
        ``spend_units`` back to the daily spend caps that counted them, in one transaction.
        If its verification is pending and has no other message that is queued, sent or
        delivered, the verification becomes ``failed`` too (sealed code erased) and is
        returned."""
        ...

    async def apply_report(self, provider: str, report: DeliveryReport, now: datetime) -> bool:
        """Apply a delivery report to the message with this provider and reference; False when
        no such message exists (the receipt is then acknowledged and ignored). When the report
        changes the message and the message has an ``ack_url``, a callback carrying the report
        is owed, in the same transaction."""
        ...


class PlainMessageStore(Protocol):
    async def create_messages(
        self,
        messages: Sequence[PlainMessage],
        *,
        lease_until: datetime | None = None,
        caps: Sequence[SpendCap] = (),
    ) -> None:
        """Queue every message in one transaction, debiting the sum of their prices from their
        account (one ledger entry each): all or nothing. ``InsufficientCredit`` (nothing
        written) when the account is prepaid and its balance does not cover the sum, and
        ``SpendCapReached`` when the sum of their ``spend_units`` would take one of ``caps``
        past its limit (counted as ``create_verification`` does). With
        ``lease_until`` the messages are written already claimed, as in
        ``create_verification``."""
        ...

    async def get_message(self, account_id: str, message_id: str) -> Message | None: ...

    async def cancel_scheduled(self, account_id: str, client_ref: str, now: datetime) -> int:
        """Cancel the account's messages with this reference that wait for their scheduled
        time (``canceled``, price refunded, spend given back to the caps that counted it), in
        one transaction; how many."""
        ...

    async def release_scheduled(self, account_id: str, client_ref: str, now: datetime) -> int:
        """Make those messages due now (the dispatcher sends them at once); how many."""
        ...


class SpendStore(Protocol):
    """The daily spend caps' counters (``domain.spend``), keyed by a cap's key and a UTC day."""

    async def spent(self, cap: str, day: str) -> int:
        """What the cap has counted on ``day`` (``YYYY-MM-DD``), in units; 0 when nothing."""
        ...

    async def note_cap_reached(self, cap: str, day: str, now: datetime) -> bool:
        """Note that the cap refused a send on ``day``; True only for the first such note of
        that cap and day, across processes (its event is raised once)."""
        ...


class CallbackStore(Protocol):
    """The outbox of calls owed to callers (delivery reports forwarded to an ``ackurl``)."""

    async def claim_callbacks(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[Callback]:
        """Lease up to ``limit`` pending callbacks that are due, as ``claim_due`` does for
        messages; each claim counts an attempt."""
        ...

    async def finish_callback(
        self, callback_id: str, *, delivered: bool, error: str | None, now: datetime
    ) -> None:
        """The call was answered with a 2xx (``delivered``), or will never be (given up)."""
        ...

    async def retry_callback(
        self, callback_id: str, *, error: str, next_attempt_at: datetime, now: datetime
    ) -> None: ...


class Outbound(Protocol):
    """Calls to URLs a caller supplied (a LabsMobile ``ackurl``): only to addresses the
    operator allows, never following redirects."""

    def validate(self, url: str) -> None:
        """Raise ``OutboundRefused`` for a URL that can never be called (not http or https,
        a refused address literal); a host name passes, its addresses are checked per call."""
        ...

    async def get(self, url: str, params: Mapping[str, str]) -> int:
        """GET ``url`` with ``params`` added to its query; the status of a 2xx answer. Raises
        ``OutboundRefused`` (nothing connected), ``PermanentOutboundError`` or
        ``TransientOutboundError``."""
        ...

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> int:
        """POST ``body`` with ``headers`` to ``url``, under the same rules and errors as
        ``get``."""
        ...


class IdempotencyStore(Protocol):
    async def begin(
        self, account_id: str, key: str, request_hash: str, now: datetime
    ) -> tuple[str, int | None, Any]:
        """Reserve the key. Returns ``("new", None, None)`` when this call owns it,
        ``("done", status, body)`` for a finished request with the same hash, and raises
        ``IdempotencyInProgress`` / ``IdempotencyKeyMismatch`` otherwise. Keys older than
        24 h count as absent, and so does a key left in progress for 5 minutes (its request's
        process died)."""
        ...

    async def finish(self, account_id: str, key: str, status: int, body: Any) -> None: ...

    async def abandon(self, account_id: str, key: str) -> None:
        """Forget a key whose request was refused, so it can be retried."""
        ...


class HousekeepingStore(Protocol):
    """What time closes: run now and then by the dispatcher."""

    async def expire_due(self, now: datetime) -> int:
        """Write ``expired`` on every pending verification past its time, erasing its sealed
        code; returns how many."""
        ...

    async def forget_idempotency_keys(self, now: datetime) -> int:
        """Delete idempotency keys older than 24 h; returns how many."""
        ...


class FraudStore(Protocol):
    """The SMS-pumping defence's counts, its deployment-wide blocks and each account's safe and
    deny lists (``domain.fraud``)."""

    async def prefix_conversion(
        self, prefix: str, *, since: datetime, matured: datetime
    ) -> Conversion:
        """Of every account's verifications to numbers of ``prefix`` (the prefix and exactly
        three more digits) created at or after ``since``: how many are decided (not pending,
        or created at or before ``matured``) and how many approved."""
        ...

    async def calling_code_conversion(
        self, calling_code: str, *, since: datetime, matured: datetime
    ) -> Conversion:
        """The same for every number that starts with ``calling_code`` (``+63``)."""
        ...

    async def blocks_of(self, values: Sequence[str]) -> Sequence[Block]:
        """Every block, in force or not, whose value is one of ``values``."""
        ...

    async def create_block(self, block: Block) -> bool:
        """Store a block; False when one with the same value and ``seq`` exists already."""
        ...

    async def last_block_seq(self, value: str) -> int:
        """The highest ``seq`` of ``value``'s blocks; 0 when it never had one."""
        ...

    async def get_block(self, block_id: str) -> Block | None: ...

    async def blocks_in_force(self, now: datetime) -> Sequence[Block]:
        """Blocks neither lifted nor expired, newest first."""
        ...

    async def lift_block(self, block_id: str, now: datetime) -> bool:
        """End a block now; False when it is not in force (unknown, lifted or expired)."""
        ...

    async def list_entries(self, account_id: str) -> Sequence[ListEntry]:
        """The account's safe and deny list entries, oldest first."""
        ...

    async def add_list_entry(self, entry: ListEntry) -> ListEntry:
        """Store the entry; when its list already holds the value, the entry already there."""
        ...

    async def remove_list_entry(
        self, account_id: str, name: ListName, entry_id: str
    ) -> ListEntry | None:
        """Delete an entry of the account's list; None when there is no such entry."""
        ...


class VerificationStorage(VerificationStore, LockoutStore, Protocol):
    """What the verification use cases need."""


class FallbackStore(Protocol):
    """Channel fallback: another channel of a verification's service, with the same code."""

    async def queue_fallback(
        self,
        verification_id: str,
        message: Message,
        *,
        body_masked: str,
        now: datetime,
        next_fallback_at: datetime | None,
        caps: Sequence[SpendCap] = (),
    ) -> bool:
        """In one transaction, if the verification is pending, unexpired and has no message
        on ``message.channel`` yet: queue ``message`` (due now, with its price debited as any
        send, and counted against ``caps``), show that channel on the verification and set its
        next timed fallback. False
        (nothing written) otherwise. A fallback does not count against the send cap."""
        ...

    async def fallback_due(self, now: datetime, *, limit: int) -> Sequence[Verification]:
        """Pending, unexpired verifications whose timed fallback is due (``fallback_at``
        reached), oldest first, with ``messages`` left empty."""
        ...

    async def clear_fallback(self, verification_id: str) -> None:
        """No timed fallback is left for this verification."""
        ...


class DeliveryStorage(MessageStore, HousekeepingStore, FallbackStore, SpendStore, Protocol):
    """What the delivery dispatcher needs: the outbox, closing a verification whose time is up
    before its message goes out, channel fallback, and housekeeping."""

    async def get_service(self, account_id: str, service_id: str) -> Service | None: ...

    async def get_account(self, account_id: str) -> Account | None: ...

    async def close(self, verification_id: str, status: VerificationStatus, now: datetime) -> bool:
        """Move a pending verification to a terminal ``status`` and erase its sealed code."""
        ...


@dataclass(frozen=True, slots=True)
class ClaimedEvent:
    """An event leased for one delivery attempt, with its service's sealed signing secret
    (``None`` when the service has none)."""

    record: EventRecord
    sealed_secret: bytes | None


class EventStore(Protocol):
    """The events outbox (webhook deliveries) and the services' sealed signing secrets."""

    async def insert_event(self, record: EventRecord) -> None:
        """Queue an event, due at ``record.next_attempt_at``."""
        ...

    async def claim_events(
        self, *, now: datetime, lease_seconds: int, limit: int
    ) -> Sequence[ClaimedEvent]:
        """Lease up to ``limit`` pending events that are due, as ``claim_due`` does for
        messages; each claim counts an attempt."""
        ...

    async def finish_event(
        self, event_id: str, *, delivered: bool, error: str | None, now: datetime
    ) -> None:
        """Answered with a 2xx (``delivered``, ``delivered_at`` = ``now``), or given up."""
        ...

    async def retry_event(
        self, event_id: str, *, error: str, next_attempt_at: datetime, now: datetime
    ) -> None: ...

    async def list_events(
        self,
        account_id: str | None,
        *,
        service_id: str | None,
        type: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[EventRecord]:
        """Newest first; every account's when ``account_id`` is ``None``."""
        ...

    async def set_webhook_secret(
        self, account_id: str, service_id: str, sealed: bytes, now: datetime
    ) -> bool:
        """Replace the live service's sealed signing secret; False when there is no such
        service."""
        ...


class AuditStore(Protocol):
    async def insert_audit(self, record: AuditRecord) -> None: ...

    async def list_audit(
        self, account_id: str | None, *, action: str | None, limit: int, cursor: str | None
    ) -> Page[AuditRecord]:
        """Newest first; every account's when ``account_id`` is ``None``."""
        ...


class Storage(
    EventStore,
    AuditStore,
    SpendStore,
    FallbackStore,
    CallbackStore,
    PriceStore,
    BillingStore,
    PlainMessageStore,
    AccountStore,
    ServiceStore,
    VerificationStore,
    LockoutStore,
    MessageStore,
    IdempotencyStore,
    HousekeepingStore,
    FraudStore,
    Protocol,
):
    """Everything otpgate keeps, as the one object bootstrap builds. Services never take this
    whole: each depends on the small Protocols above that it uses."""

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless storage can read and write now."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Event:
    """Something a service's integrator is told about (its ``webhook_url``): ``type`` such as
    ``verification.approved``, ``message.delivered``, ``fraud.blocked``, ``spend_cap.reached``.
    ``data`` carries ids, statuses and counts, never a code, a message text or a full number."""

    type: str
    account_id: str
    service_id: str | None
    data: Mapping[str, Any]


class EventSink(Protocol):
    async def emit(self, event: Event) -> None:
        """Record the event for delivery (an outbox: it is sent later, with retries). Never
        raises for a service without a webhook; raises only ``Unavailable``."""
        ...


class NoEvents:
    """The sink used when events are not delivered: it drops them."""

    async def emit(self, event: Event) -> None:
        return None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """A security-relevant action: who (``actor``: the API key id, or ``cli``), on what account,
    what (``action`` such as ``key.created``, ``service.updated``, ``block.lifted``), on which
    object (``target``), and its state before and after (never a secret)."""

    account_id: str
    actor: str
    action: str
    target: str
    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None


class AuditTrail(Protocol):
    async def record(self, entry: AuditEntry) -> None: ...


class NoAudit:
    """The trail used when nothing is audited: it drops entries."""

    async def record(self, entry: AuditEntry) -> None:
        return None


# --------------------------------------------------------------------------------------------
# Rate limits


@dataclass(frozen=True, slots=True)
class RateCounter:
    """One rate limit applied to one request: at most ``limit`` events per moving window of
    ``window_seconds`` under ``key``. ``name`` (``per_number``…) is what a refusal names;
    ``key`` identifies the counter (its scope and value) and is never shown to a caller."""

    name: str
    key: str
    limit: int
    window_seconds: int


@dataclass(frozen=True, slots=True)
class RateRefusal:
    """The counter without room, and the seconds until it has room for one more event."""

    counter: RateCounter
    retry_after: float


class RateLimiter(Protocol):
    """Counters shared by every process that uses the same store (in-process, or Redis)."""

    async def acquire(self, counters: Sequence[RateCounter]) -> RateRefusal | None:
        """Count one event on every counter and return None when each has room; when one has
        none, return it (the first, in order) and count nothing on any. Two concurrent calls
        may both see room in a counter with one left: the counting itself is atomic per
        counter, so the loser is refused then, and what it counted on the counters before
        stays counted. Raises ``Unavailable`` when the store cannot answer, with a text that
        names neither its address nor its password."""
        ...

    async def aclose(self) -> None: ...


class Metrics(Protocol):
    """Counts events for monitoring. Labels are low-cardinality words, never codes or numbers."""

    def count(self, event: str, **labels: str) -> None: ...
