"""Verification use cases: start (or resend), check, cancel, read and list (API.md §4).

Each flow reads as a checklist; the order matters and the comments say why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from otpgate.domain import policy as rules
from otpgate.domain import sms
from otpgate.domain import test_numbers as testing
from otpgate.domain.codes import (
    CodeVault,
    generate_code,
    normalize_code,
    presented_code,
    validate_custom_code,
)
from otpgate.domain.events import (
    VERIFICATION_APPROVED,
    VERIFICATION_FAILED,
    VERIFICATION_MAX_ATTEMPTS,
    verification_event,
)
from otpgate.domain.model import (
    Account,
    Channel,
    CheckResult,
    CodeType,
    Message,
    Principal,
    Service,
    ServicePolicy,
    Verification,
    VerificationStatus,
    new_id,
)
from otpgate.domain.phone import (
    Destination,
    country_of,
    mask,
    parse_phone,
    require_allowed_country,
    require_sms_capable,
    require_voice_capable,
)
from otpgate.domain.ports import (
    NO_LOCKOUT,
    AuditEntry,
    AuditTrail,
    ClaimedMessage,
    Clock,
    Event,
    EventSink,
    Lockout,
    Metrics,
    NoAudit,
    NoEvents,
    Outbox,
    Page,
    VerificationStorage,
)
from otpgate.domain.spend import SpendCap
from otpgate.errors import (
    ChannelNotAllowed,
    DestinationBlocked,
    Forbidden,
    InvalidRequest,
    MaxSendAttemptsReached,
    NotFound,
    ResendTooSoon,
    SpendCapReached,
    Unavailable,
)
from otpgate.services.billing import Billing
from otpgate.services.catalog import ServiceCatalog
from otpgate.services.fraud import FraudGuard
from otpgate.services.ratelimit import RateLimiting
from otpgate.services.spend import SpendCaps

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StartRequest:
    service_id: str
    to: str
    channel: str | None = None
    locale: str | None = None
    custom_code: str | None = None
    context: dict[str, str] | None = None
    metadata: dict[str, Any] | None = None
    country: str | None = None
    #: This verification's own message template (otpgate's syntax, ``{code}``), sender and
    #: code length, in place of the service's (LabsMobile's sendCode ``message``, ``sender``,
    #: ``digits``).
    template: str | None = None
    sender_id: str | None = None
    code_length: int | None = None
    #: Supersede a pending verification of the destination even with the same context: a new
    #: code (LabsMobile's sendCode), under the same resend rules as any superseding.
    replace_pending: bool = False
    #: Where the code goes if the service falls back to e-mail.
    email: str | None = None
    #: The end user's IP address, as the integrator's backend saw it (the per_ip limit).
    client_ip: str | None = None


def destination_key(to: str, country: str | None = None) -> str:
    """How a destination is stored: an e-mail address as :func:`validate_email` writes it, a
    number in E.164 (``InvalidPhoneNumber`` when it is neither)."""
    if "@" in to:
        return rules.validate_email(to, param="to")
    return parse_phone(to, country).e164


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    """S8: ``threshold`` consecutive failed checks lock a destination for ``seconds``."""

    threshold: int = rules.LOCKOUT_THRESHOLD
    seconds: int = 86_400


class VerificationService:
    def __init__(
        self,
        *,
        storage: VerificationStorage,
        catalog: ServiceCatalog,
        vault: CodeVault,
        clock: Clock,
        metrics: Metrics,
        channels_available: frozenset[Channel],
        lockout: LockoutPolicy,
        outbox: Outbox,
        billing: Billing | None = None,
        rate_limits: RateLimiting | None = None,
        events: EventSink | None = None,
        audit: AuditTrail | None = None,
        fraud: FraudGuard | None = None,
        spend: SpendCaps | None = None,
    ) -> None:
        """``billing`` prices each message; without it messages carry no price. Without
        ``rate_limits`` nothing is rate-limited (bootstrap always gives one). ``events`` hears
        of approvals and failures (for the service's webhook); ``audit`` of lockouts. ``fraud``
        is the SMS-pumping defence (deny list, blocks, detector); without it, none applies.
        ``spend`` applies the daily spend caps; without it none applies."""
        self._storage = storage
        self._catalog = catalog
        self._vault = vault
        self._clock = clock
        self._metrics = metrics
        self._channels_available = channels_available
        self._lockout = lockout
        self._outbox = outbox
        self._billing = billing
        self._rate_limits = rate_limits
        self._events: EventSink = events or NoEvents()
        self._audit: AuditTrail = audit or NoAudit()
        self._fraud = fraud
        self._spend = spend

    # --- start and resend --------------------------------------------------------------------

    async def start(self, principal: Principal, request: StartRequest) -> tuple[Verification, bool]:
        """Create a verification and queue its code, or send a pending one's code again.

        Returns ``(verification, created)``. Everything that can refuse the request is checked
        before anything is stored or queued, so a refusal leaves no trace and costs nothing.
        """
        service = await self._service(principal, request.service_id)
        policy = service.policy
        channel = self._channel(service, request.channel)
        code_length, template, sender_id = self._own_settings(policy, request)
        # 1. Destination: an e-mail address, or a valid, assigned number of a type that
        #    receives the channel, in an allowed country.
        country: str | None = None
        destination: Destination | None = None
        fixed_code: str | None = None
        if channel is Channel.EMAIL:
            to = rules.validate_email(request.to, param="to")
        else:
            destination = parse_phone(request.to, request.country)
            # Test numbers (short-circuit): a fixed code, nothing sent, and none of the
            # checks below nor any limit, block, credit or spend cap applies.
            fixed_code = testing.fixed_code(policy, destination.e164)
            if fixed_code is None:
                if channel is Channel.SMS:
                    require_sms_capable(destination, allow_voip=policy.allow_voip)
                else:
                    require_voice_capable(destination)
                require_allowed_country(destination, policy.allowed_countries)
                if self._fraud is not None:  # geo: the account's deny list
                    await self._fraud.refuse_denied(principal.account.id, destination)
            to, country = destination.e164, destination.country
        fallback_email = (
            rules.validate_email(request.email, param="email")
            if request.email is not None
            else None
        )
        # 2. Request fields, validated before any write.
        locale = rules.validate_locale(request.locale) or policy.default_locale
        client_ip = rules.validate_client_ip(request.client_ip)
        context = rules.validate_context(request.context)
        if context and channel is not Channel.SMS:
            raise InvalidRequest(
                "a code bound to a transaction (context) goes by SMS only, where the amount "
                "and payee are shown with it",
                param="channel",
            )
        metadata = rules.validate_metadata(
            request.metadata, len(json.dumps(request.metadata or {}))
        )
        if request.custom_code is not None and not policy.custom_code_enabled:
            raise Forbidden(
                "this service does not accept custom codes (custom_code_enabled is false)",
                param="custom_code",
            )
        custom_code = (
            None
            if request.custom_code is None
            else validate_custom_code(
                request.custom_code, length=code_length, code_type=policy.code_type
            )
        )
        # Blocks (unless safe-listed) and the SMS-pumping detector; not for a test number.
        if fixed_code is None:
            await self._screen(principal, service, destination)
        now = self._clock.now()
        pending, lockout = await self._storage.pending_for_destination(service.id, to, now)
        # 3. Lockout after too many consecutive failures (S8): neither a resend nor a new
        #    verification may restart the guessing.
        self._refuse_if_locked(lockout)
        # 4. A pending verification for this destination: send its code again, unless the
        #    caller binds a different code or context, which supersedes it. A pending one of
        #    the other kind (a test verification of a number that is no longer a test number,
        #    or whose fixed code changed; a real one of a number that became a test number) is
        #    superseded too, and its sends carry nothing over: a test send reached no phone.
        changed_kind = pending is not None and not self._same_kind(pending, fixed_code)
        resend = (
            custom_code is None
            and pending is not None
            and pending.context == context
            and not changed_kind
        )
        if pending is not None and resend and not request.replace_pending:
            if self._code_of(pending) is not None:
                resent = await self._resend(
                    principal.account, service, pending, channel, client_ip=client_ip
                )
                return resent, False
            # Its code was sealed under another master key (a rotation): it can never be sent
            # again, so it fails and a new verification takes its place.
            if await self._storage.close(pending.id, VerificationStatus.FAILED, now):
                await self._emit(verification_event(VERIFICATION_FAILED, pending))
            pending = None
        sends_so_far = 0
        if pending is not None and not changed_kind:
            # Superseding is a send within the same process of proving this destination: the
            # resend interval and the send cap carry over, so changing the context or the
            # custom code is no way around them (S9).
            rules.refuse_resend(pending, interval_seconds=policy.resend_interval_seconds, now=now)
            sends_so_far = pending.send_attempts
        # 5. Rate limits (services/ratelimit.py): this send of a code is counted, or refused
        #    with nothing stored or sent. A test number uses none.
        if fixed_code is None:
            await self._limit_send(service, to, country, client_ip)
        verification, message, body_masked = self._new(
            service,
            principal,
            to,
            channel,
            locale,
            context,
            metadata,
            fixed_code or custom_code,
            sends_so_far=sends_so_far,
            code_length=code_length,
            template=template,
            sender_id=sender_id,
        )
        caps: tuple[SpendCap, ...] = ()
        if fixed_code is not None:
            # A test number's message is stored as sent and never goes out: no price, no cap.
            message = testing.as_test_message(message)
            verification = replace(verification, test=True)
        else:
            # 6. Spend caps: what the message counts against the account's and the service's
            #    daily caps, counted (or refused) in the same transaction as the insert.
            # 7. The price, when a price table applies: a prepaid account cannot send where
            #    there is none, and the debit happens in the same transaction as the insert.
            message = await self._priced(principal.account, message, country)
            message, caps = self._capped(principal.account, service, message)
        verification = replace(
            verification,
            messages=(message,),
            fallback_email=fallback_email,
            fallback_at=None if verification.test else rules.fallback_at(policy, channel, now),
        )
        lease_until = None if verification.test else self._outbox.lease_until(now)
        try:
            created = await self._storage.create_verification(
                verification,
                message,
                body_masked=body_masked,
                supersede=None if pending is None else pending.id,
                lease_until=lease_until,
                caps=caps,
            )
        except SpendCapReached as exc:
            await self._cap_refused(exc, principal.account.id, service.id)
            raise
        if not created:
            # A concurrent start won the race for this destination; ours becomes a resend.
            pending, _ = await self._storage.pending_for_destination(service.id, to, now)
            if pending is None:
                raise ResendTooSoon(
                    "another start for this destination is in progress", retry_after=1
                )
            resent = await self._resend(principal.account, service, pending, channel, counted=True)
            return resent, False
        self._hand_over(message, verification, service, lease_until)
        if verification.test:
            self._metrics.count("test_verification", kind="start")
        else:
            self._metrics.count("verification_started", channel=channel.value)
        log.info(
            "verification started",
            extra={"verification_id": verification.id, "to": mask(to), "test": verification.test},
        )
        return verification, True

    async def resend(
        self, principal: Principal, verification_id: str, channel: str | None = None
    ) -> Verification:
        """Send the same code again on a pending verification (API.md §4.2)."""
        verification = await self._verification(principal, verification_id)
        service = await self._service(principal, verification.service_id)
        chosen = self._channel(service, channel or verification.channel.value)
        if verification.status_at(self._clock.now()) is not VerificationStatus.PENDING:
            raise InvalidRequest(
                f"verification is {verification.status_at(self._clock.now()).value}; "
                "only a pending verification can be sent again",
                param="id",
            )
        self._refuse_if_locked(await self._storage.lockout(service.id, verification.to))
        if "@" not in verification.to and not verification.test:  # blocks: every real send
            await self._screen(principal, service, parse_phone(verification.to))
        return await self._resend(principal.account, service, verification, chosen)

    async def resend_to_destination(
        self, principal: Principal, *, service_id: str, to: str
    ) -> Verification:
        """Send the same code again on the pending verification of ``to`` (E.164) in the
        service (LabsMobile's resendCode): the rules of :meth:`resend` apply, and
        ``NotFound`` when the destination has no pending verification there."""
        service = await self._service(principal, service_id)
        destination = parse_phone(to)
        pending, lockout = await self._storage.pending_for_destination(
            service.id, destination.e164, self._clock.now()
        )
        if pending is None:
            raise NotFound("no pending verification for this destination in this service")
        self._refuse_if_locked(lockout)
        if not pending.test:
            await self._screen(principal, service, destination)
        channel = self._channel(service, pending.channel.value)
        return await self._resend(principal.account, service, pending, channel)

    @staticmethod
    def check_own_settings(policy: ServicePolicy, request: StartRequest) -> None:
        """Refuse, as :meth:`start` would under ``policy``, the request's own code length,
        template or sender id; for a caller that must refuse them before the service exists
        (LabsMobile's sendCode creates its ``env``'s service on first use, and a refused
        request leaves nothing behind)."""
        VerificationService._own_settings(policy, request)

    def _hand_over(
        self,
        message: Message,
        verification: Verification,
        service: Service,
        lease_until: datetime | None,
    ) -> None:
        """Announce a committed message; with a lease, hand it over to be sent right away. A
        test number's message is stored as sent: there is nothing to announce."""
        if message.test:
            return
        if lease_until is None:
            self._outbox.queued()
            return
        claimed = replace(message, attempts=message.attempts + 1)  # as the row now says
        self._outbox.queued(ClaimedMessage(claimed, verification, service, lease_until))

    @staticmethod
    def _own_settings(
        policy: ServicePolicy, request: StartRequest
    ) -> tuple[int, str | None, str | None]:
        """The code length, template and sender this verification uses, checked: the
        request's own where it gives them (a template must fit one SMS like a service's)."""
        code_length = policy.code_length
        if request.code_length is not None:
            code_length = rules.checked_code_length(request.code_length, param="code_length")
        template = request.template
        if template is not None:
            sms.validate_template(
                template,
                brand=policy.name,
                code_length=code_length,
                max_minutes=rules.minutes_of(policy),
                webotp_domain=policy.webotp_domain,
                android_app_hash=policy.android_app_hash,
                param="template",
                allow_multipart=policy.allow_multipart,
            )
        sender_id = request.sender_id
        if sender_id is not None:
            sender_id = sms.validate_sender_id(sender_id)
        return code_length, template, sender_id

    async def _priced(self, account: Account, message: Message, country: str | None) -> Message:
        """The message with its price, or as it is when no price applies (no price table, or
        not an SMS: prices are per SMS part); ``CountryNotAllowed`` when a prepaid account
        cannot be billed for ``country``."""
        if self._billing is None or message.channel is not Channel.SMS or country is None:
            return message
        price = await self._billing.price(account, country=country, segments=message.segments)
        return message if price is None else replace(message, price_units=price)

    def _capped(
        self, account: Account, service: Service, message: Message
    ) -> tuple[Message, tuple[SpendCap, ...]]:
        """The message with what it counts against the caps in force, and those caps."""
        if self._spend is None:
            return message, ()
        caps = self._spend.caps(account, service)
        return self._spend.counted(message, caps), caps

    async def _cap_refused(self, exc: SpendCapReached, account_id: str, service_id: str) -> None:
        if self._spend is not None:
            await self._spend.refused(exc, account_id=account_id, service_id=service_id)

    def _code_of(self, verification: Verification) -> str | None:
        """The sealed code, or None when it is erased or sealed under another master key."""
        if verification.code_sealed is None:
            return None
        try:
            return self._vault.unseal(verification.id, verification.code_sealed)
        except ValueError:
            return None

    async def _limit_send(
        self, service: Service, to: str, country: str | None, client_ip: str | None
    ) -> None:
        if self._rate_limits is not None:
            # A safe-listed destination bypasses the prefix limit, as it bypasses the blocks.
            safe = self._fraud is not None and await self._fraud.is_safe(service.account_id, to)
            await self._rate_limits.send(
                service, to=to, country=country, client_ip=client_ip, safe=safe
            )

    async def _resend(
        self,
        account: Account,
        service: Service,
        verification: Verification,
        channel: Channel,
        *,
        client_ip: str | None = None,
        counted: bool = False,
    ) -> Verification:
        """Send the pending code again. ``counted``: this send already went through the rate
        limits (a start that lost the race to create and became a resend)."""
        now = self._clock.now()
        rules.refuse_resend(
            verification, interval_seconds=service.policy.resend_interval_seconds, now=now
        )
        code = self._code_of(verification)
        if code is None:
            if await self._storage.close(verification.id, VerificationStatus.FAILED, now):
                await self._emit(verification_event(VERIFICATION_FAILED, verification))
            raise InvalidRequest(
                "this verification's code can no longer be sent (the secret key changed); "
                "start a new verification",
                param="id",
            )
        if not counted and not verification.test:
            # Rate limits (services/ratelimit.py): a resend sends a code, so it counts as one
            # (a test verification's sends go nowhere and count nothing).
            await self._limit_send(service, verification.to, country_of(verification.to), client_ip)
        message, body_masked = self._message(
            rules.effective_policy(
                service.policy, template=verification.template, sender_id=verification.sender_id
            ),
            verification.account_id,
            verification.id,
            verification.to,
            channel,
            verification.locale,
            code,
            verification.context,
        )
        caps: tuple[SpendCap, ...] = ()
        if verification.test:
            message = testing.as_test_message(message)
        else:
            message = await self._priced(account, message, country_of(verification.to))
            message, caps = self._capped(account, service, message)
        lease_until = None if verification.test else self._outbox.lease_until(now)
        try:
            updated = await self._storage.record_resend(
                verification.id,
                message,
                body_masked=body_masked,
                now=now,
                interval_seconds=service.policy.resend_interval_seconds,
                lease_until=lease_until,
                caps=caps,
            )
        except SpendCapReached as exc:
            await self._cap_refused(exc, account.id, service.id)
            raise
        if updated is None:
            # Another request changed it between our read and our write: re-read and explain.
            current = await self._storage.get_verification(verification.account_id, verification.id)
            if current is not None and current.status_at(now) is VerificationStatus.PENDING:
                rules.refuse_resend(
                    current, interval_seconds=service.policy.resend_interval_seconds, now=now
                )
            raise MaxSendAttemptsReached("this verification can no longer be sent")
        self._hand_over(message, updated, service, lease_until)
        if updated.test:
            self._metrics.count("test_verification", kind="resend")
        else:
            self._metrics.count("verification_resent", channel=channel.value)
        return updated

    def _new(
        self,
        service: Service,
        principal: Principal,
        to: str,
        channel: Channel,
        locale: str,
        context: dict[str, str] | None,
        metadata: dict[str, Any],
        custom_code: str | None,
        *,
        sends_so_far: int = 0,
        code_length: int,
        template: str | None,
        sender_id: str | None,
    ) -> tuple[Verification, Message, str]:
        policy = service.policy
        now = self._clock.now()
        verification_id = new_id("ver")
        code = custom_code or generate_code(code_length, policy.code_type)
        message, body_masked = self._message(
            rules.effective_policy(policy, template=template, sender_id=sender_id),
            principal.account.id,
            verification_id,
            to,
            channel,
            locale,
            code,
            context,
        )
        verification = Verification(
            id=verification_id,
            account_id=principal.account.id,
            service_id=service.id,
            to=to,
            channel=channel,
            status=VerificationStatus.PENDING,
            code_digest=self._vault.digest(verification_id, code, context),
            code_sealed=self._vault.seal(verification_id, code),
            locale=locale,
            created_at=now,
            updated_at=now,
            expires_at=rules.expires_at(policy, now),
            last_sent_at=now,
            check_attempts=0,
            max_check_attempts=policy.max_check_attempts,
            send_attempts=sends_so_far + 1,
            max_send_attempts=policy.max_send_attempts,
            context=context,
            metadata=metadata,
            messages=(message,),
            template=template,
            sender_id=sender_id,
        )
        return verification, message, body_masked

    def _message(
        self,
        policy: ServicePolicy,
        account_id: str,
        verification_id: str,
        to: str,
        channel: Channel,
        locale: str,
        code: str,
        context: Mapping[str, str] | None,
    ) -> tuple[Message, str]:
        """The outbox row for one send, with the text measured now (segments and encoding are
        part of the answer) and kept only with the code masked."""
        return rules.code_message(
            policy,
            message_id=new_id("msg"),
            account_id=account_id,
            verification_id=verification_id,
            to=to,
            channel=channel,
            locale=locale,
            code=code,
            context=context,
            now=self._clock.now(),
        )

    # --- check ------------------------------------------------------------------------------

    async def check(
        self,
        principal: Principal,
        verification_id: str,
        code: Any,
        context: Any = None,
    ) -> CheckResult:
        """Check a code (API.md §4.3). A wrong code is an answer, not an error."""
        presented = self._presented(code)
        checked_context = rules.validate_context(context)
        verification, lockout = await self._storage.verification_for_check(
            principal.account.id, verification_id
        )
        if verification is None:
            raise NotFound("no such verification")
        return await self._check(
            verification, presented, checked_context, lockout, actor=principal.key_id
        )

    async def check_destination(
        self,
        principal: Principal,
        *,
        service_id: str,
        to: str,
        code: Any,
        context: Any = None,
        country: str | None = None,
    ) -> CheckResult:
        """Check against the most recent verification of ``to`` in the service."""
        presented = self._presented(code)
        checked_context = rules.validate_context(context)
        service = await self._service(principal, service_id)
        destination = destination_key(to, country)
        verification = await self._storage.latest_verification(
            principal.account.id, service.id, destination
        )
        if verification is None:
            raise NotFound("no verification for this destination in this service")
        lockout = await self._storage.lockout(service.id, destination)
        return await self._check(
            verification, presented, checked_context, lockout, actor=principal.key_id
        )

    @staticmethod
    def _presented(code: Any) -> str:
        """The presented code normalised, or ``InvalidRequest`` before any lookup, and so
        before any attempt is counted, when it cannot be a code (``codes.presented_code``)."""
        return presented_code(code)

    async def _check(
        self,
        verification: Verification,
        presented: str,
        context: dict[str, str] | None,
        lockout: Lockout,
        *,
        actor: str,
    ) -> CheckResult:
        now = self._clock.now()
        # 1. Closed verifications answer with their status and never look at the code, so a
        #    closed verification tells a right code from a wrong one in no way.
        status = verification.status_at(now)
        if status is not VerificationStatus.PENDING:
            self._metrics.count("check", result="closed")
            return self._result(verification, status, valid=False)
        # 2. A locked destination (S8) gets no more guesses, for this or any verification.
        if lockout.in_force(now):
            self._metrics.count("check", result="locked")
            return self._result(verification, status, valid=False)
        # 2a. A test verification approves only while its number is still a test number of
        #     the service with the same fixed code: removing it ends the published code's use.
        if verification.test and not await self._still_a_test_number(verification):
            if await self._storage.close(verification.id, VerificationStatus.CANCELED, now):
                log.info(
                    "test verification canceled: no longer a test number",
                    extra={"verification_id": verification.id},
                )
            return await self._reread(verification, now)
        # 2b. Rate limit on checks per destination (services/ratelimit.py): bounds guessing
        #     across the destination's verifications; refuses (503) when it cannot count.
        if self._rate_limits is not None:
            await self._rate_limits.check(service_id=verification.service_id, to=verification.to)
        # 3. Constant-time comparison of keyed digests; the context is part of the digest,
        #    so a code shown for another amount or payee does not match (S5).
        # Upper-casing is harmless for numeric codes, so no service lookup is needed here.
        normalized = normalize_code(presented, CodeType.ALPHANUMERIC)
        if self._vault.matches(verification.code_digest, verification.id, normalized, context):
            # 4. Exactly one concurrent check can move pending → approved (S4); the same
            #    transaction clears the destination's consecutive failures, if it has any.
            if await self._storage.approve(
                verification.id, now, clear_failures=lockout != NO_LOCKOUT
            ):
                self._metrics.count("check", result="approved")
                log.info("verification approved", extra={"verification_id": verification.id})
                # After the commit: a crash right here loses this event (services/events.py).
                await self._emit(
                    verification_event(
                        VERIFICATION_APPROVED,
                        verification,
                        check_attempts=verification.check_attempts,
                    )
                )
                return CheckResult(
                    verification.id,
                    VerificationStatus.APPROVED,
                    True,
                    verification.remaining_attempts,
                )
            return await self._reread(verification, now)
        # 5. A wrong code is counted atomically; the cap holds under any concurrency (S7).
        attempts = await self._storage.record_failed_check(verification.id, now)
        if attempts is None:
            return await self._reread(verification, now)
        failures = await self._storage.record_destination_failure(
            verification.service_id,
            verification.to,
            now=now,
            threshold=self._lockout.threshold,
            lock_seconds=self._lockout.seconds,
        )
        if failures >= self._lockout.threshold:
            log.warning(
                "destination locked after consecutive failures",
                extra={"service_id": verification.service_id, "to": mask(verification.to)},
            )
            self._metrics.count("destination_locked")
            await self._audit.record(
                AuditEntry(
                    account_id=verification.account_id,
                    actor=actor,
                    action="lockout.imposed",
                    target=verification.service_id,
                    after={
                        "service_id": verification.service_id,
                        "to": mask(verification.to),
                        "consecutive_failures": failures,
                        "locked_seconds": self._lockout.seconds,
                    },
                )
            )
        remaining = max(0, verification.max_check_attempts - attempts)
        new_status = (
            VerificationStatus.PENDING if remaining else VerificationStatus.MAX_ATTEMPTS_REACHED
        )
        self._metrics.count("check", result="wrong")
        if not remaining:
            await self._emit(
                verification_event(VERIFICATION_MAX_ATTEMPTS, verification, check_attempts=attempts)
            )
        return CheckResult(verification.id, new_status, False, remaining)

    async def _reread(self, verification: Verification, now: Any) -> CheckResult:
        """Someone else closed the verification between our read and our write."""
        current = await self._storage.get_verification(verification.account_id, verification.id)
        assert current is not None  # verifications are never deleted
        self._metrics.count("check", result="closed")
        return self._result(current, current.status_at(now), valid=False)

    @staticmethod
    def _result(v: Verification, status: VerificationStatus, *, valid: bool) -> CheckResult:
        return CheckResult(v.id, status, valid, v.remaining_attempts)

    # --- cancel, read, list -----------------------------------------------------------------

    async def latest_for_destination(
        self, principal: Principal, *, service_id: str, to: str
    ) -> Verification | None:
        """The most recent verification of ``to`` (a number, or ``InvalidPhoneNumber``; or an
        e-mail address) in the service, whatever its status; None when it never had one."""
        service = await self._service(principal, service_id)
        return await self._storage.latest_verification(
            principal.account.id, service.id, destination_key(to)
        )

    async def cancel(self, principal: Principal, verification_id: str) -> Verification:
        """Cancel a pending verification; a closed one is returned unchanged."""
        verification = await self._verification(principal, verification_id)
        now = self._clock.now()
        if verification.status_at(now) is VerificationStatus.PENDING:
            await self._storage.close(verification.id, VerificationStatus.CANCELED, now)
        return await self._verification(principal, verification_id)

    async def approve(self, principal: Principal, verification_id: str) -> Verification:
        """Approve a pending verification without a code (the integrator verified the user
        some other way: Twilio's ``Status=approved``); a closed one is returned unchanged."""
        verification = await self._verification(principal, verification_id)
        now = self._clock.now()
        if verification.status_at(
            now
        ) is VerificationStatus.PENDING and await self._storage.approve(
            verification.id, now, clear_failures=False
        ):
            log.info(
                "verification approved by the caller", extra={"verification_id": verification.id}
            )
            await self._emit(
                verification_event(
                    VERIFICATION_APPROVED, verification, check_attempts=verification.check_attempts
                )
            )
        return await self._verification(principal, verification_id)

    async def get(self, principal: Principal, verification_id: str) -> Verification:
        return await self._verification(principal, verification_id)

    async def list(
        self,
        principal: Principal,
        *,
        service_id: str | None,
        status: str | None,
        to: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[Verification]:
        try:
            wanted = None if status is None else VerificationStatus(status)
        except ValueError:
            raise InvalidRequest("unknown status", param="status") from None
        e164 = None if to is None else parse_phone(to).e164
        return await self._storage.list_verifications(
            principal.account.id,
            service_id=service_id,
            status=wanted,
            to=e164,
            limit=limit,
            cursor=cursor,
            now=self._clock.now(),
        )

    def now(self) -> Any:
        return self._clock.now()

    # --- operator actions -------------------------------------------------------------------

    async def clear_lockout(
        self, principal: Principal, service_id: str, to: str, *, country: str | None = None
    ) -> tuple[str, datetime | None]:
        """Lift a destination's lockout (S8) in one of the principal's services and reset its
        consecutive-failure count.

        Returns the destination in E.164 and the end of the lock that was lifted (``None`` when
        it was not locked). ``NotFound`` for a service the account does not have and
        ``InvalidPhoneNumber`` for a destination that is not a phone number; both are checked
        before anything is written.
        """
        service = await self._service(principal, service_id)
        destination = destination_key(to, country)
        lockout = await self._storage.lockout(service.id, destination)
        locked_until = lockout.locked_until if lockout.in_force(self._clock.now()) else None
        await self._storage.reset_destination_failures(service.id, destination)
        await self._audit.record(
            AuditEntry(
                account_id=principal.account.id,
                actor=principal.key_id,
                action="lockout.cleared",
                target=service.id,
                before={
                    "service_id": service.id,
                    "to": mask(destination),
                    "consecutive_failures": lockout.failures,
                    "locked_until": None if locked_until is None else locked_until.isoformat(),
                },
                after={
                    "service_id": service.id,
                    "to": mask(destination),
                    "consecutive_failures": 0,
                },
            )
        )
        log.info(
            "destination lockout cleared",
            extra={"service_id": service.id, "to": mask(destination)},
        )
        return destination, locked_until

    # --- helpers ----------------------------------------------------------------------------

    async def _emit(self, event: Event) -> None:
        """Queue an event after its state change committed. Storage failing now must not turn
        an approval that took effect into an error answer: the event is lost, and logged."""
        try:
            await self._events.emit(event)
        except Unavailable:
            log.warning(
                "event lost: storage unavailable",
                extra={"event_type": event.type, "service_id": event.service_id},
            )

    def _same_kind(self, pending: Verification, fixed_code: str | None) -> bool:
        """Whether a start with ``fixed_code`` (None: not a test number) may resend
        ``pending``: both real, or both test verifications with the same fixed code."""
        if pending.test != (fixed_code is not None):
            return False
        return fixed_code is None or self._code_of(pending) == fixed_code

    async def _still_a_test_number(self, verification: Verification) -> bool:
        """Whether the test verification's number is still one of its service's test numbers,
        with the fixed code it was started with (the service as the lookup cache has it)."""
        service = await self._catalog.lookup(verification.account_id, verification.service_id)
        if service is None:
            return False
        current = testing.fixed_code(service.policy, verification.to)
        return current is not None and self._code_of(verification) == current

    async def _service(self, principal: Principal, service_id: str) -> Service:
        service = await self._catalog.lookup(principal.account.id, service_id)
        if service is None:
            raise NotFound("no such service", param="service_id")
        return service

    async def _verification(self, principal: Principal, verification_id: str) -> Verification:
        verification = await self._storage.get_verification(principal.account.id, verification_id)
        if verification is None:
            raise NotFound("no such verification")
        return verification

    def _channel(self, service: Service, requested: str | None) -> Channel:
        if requested is None:
            channel = service.policy.channels[0]
        else:
            try:
                channel = Channel(requested)
            except ValueError:
                raise InvalidRequest(
                    "channel must be sms, voice or email", param="channel"
                ) from None
        if channel not in service.policy.channels:
            raise ChannelNotAllowed(
                f"channel {channel.value} is not enabled for this service", param="channel"
            )
        if channel not in self._channels_available:
            raise ChannelNotAllowed(
                f"no {channel.value} provider is configured on this server", param="channel"
            )
        return channel

    async def _screen(
        self, principal: Principal, service: Service, destination: Destination | None
    ) -> None:
        """The blocks step (``services.fraud``): nothing for an e-mail address."""
        if self._fraud is None or destination is None:
            return
        await self._fraud.screen(
            account_id=principal.account.id,
            service_id=service.id,
            destination=destination,
            level=service.policy.fraud_guard,
        )

    def _refuse_if_locked(self, lockout: Lockout) -> None:
        now = self._clock.now()
        if lockout.locked_until is not None and lockout.in_force(now):
            raise DestinationBlocked(
                "too many failed checks for this destination; it is locked for a while",
                retry_after=(lockout.locked_until - now).total_seconds(),
            )
