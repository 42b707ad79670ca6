"""The SMS-pumping defence at work: the detector, deployment-wide blocks, and each account's
safe and deny lists (the rules are in ``domain.fraud``; docs/security.md explains the figures).

Where it sits in a start (``VerificationService.start``), each step before anything is stored
or sent:

* :meth:`FraudGuard.refuse_denied` with the geo and number-type checks: the account's deny list;
* :meth:`FraudGuard.screen` at the blocks step: a safe-listed destination passes; a destination
  under a block in force is refused (``403 destination_blocked`` with ``retry_after``); then the
  detector looks at the destination's prefix and, when its conversion is too low for the
  service's ``fraud_guard`` level, blocks the prefix for everyone and refuses this start too.

The counts are not kept anywhere of their own: one indexed query over ``verifications``
(``ix_verifications_to_created``, a range of ``to``) counts a prefix's recent starts and
approvals, so an approval needs no extra write and every process sees the same numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from otpgate.domain.fraud import (
    LEVELS,
    MANUAL_BLOCK_DEFAULT,
    MANUAL_BLOCK_MAX,
    AccountLists,
    Block,
    BlockKind,
    Conversion,
    EntryKind,
    GuardLevel,
    ListEntry,
    ListName,
    Sensitivity,
    automatic_duration,
    country_failing,
    prefix_of,
    suspicious,
    too_low,
    validate_country,
    validate_number,
    validate_prefix,
)
from otpgate.domain.model import Principal, new_id
from otpgate.domain.phone import Destination, calling_code_of, country_of, mask
from otpgate.domain.ports import (
    AuditEntry,
    AuditTrail,
    Clock,
    Event,
    EventSink,
    FraudStore,
    Metrics,
    NoAudit,
    NoEvents,
)
from otpgate.errors import CountryNotAllowed, DestinationBlocked, InvalidRequest, NotFound
from otpgate.services.cache import TtlCache

log = logging.getLogger(__name__)

#: The shortest prefix a number is matched against (``+`` and four digits).
_SHORTEST_PREFIX = 5
#: How long a country's conversion, once counted, is reused (it is counted only for prefixes
#: that are half-way to a block, and a country can have many rows).
COUNTRY_MEMORY_SECONDS = 30
#: The actor of audit entries the detector writes itself.
DETECTOR = "fraud_guard"


def _candidates(destination: Destination) -> list[str]:
    """The values a block of this destination could have: each leading part of the number
    that could be a prefix, and its country."""
    e164 = destination.e164
    return [e164[:k] for k in range(_SHORTEST_PREFIX, len(e164))] + [destination.country]


def _applies(block: Block, destination: Destination) -> bool:
    if block.kind is BlockKind.COUNTRY:
        return block.value == destination.country
    return destination.e164.startswith(block.value)


def render_block_reason(counts: Conversion, level: GuardLevel, sensitivity: Sensitivity) -> str:
    minutes = sensitivity.window_seconds // 60
    return (
        f"SMS pumping suspected: {counts.text()} within {minutes} min "
        f"(fraud_guard {level.value}: at least {sensitivity.min_volume} decided and at most "
        f"{sensitivity.max_conversion:.0%} approved)"
    )


class FraudGuard:
    def __init__(
        self,
        *,
        store: FraudStore,
        clock: Clock,
        metrics: Metrics,
        lists_cache: TtlCache[AccountLists],
        events: EventSink | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        """``lists_cache`` holds each account's lists (edits through this process forget the
        entry at once; another process's edit is seen within the cache's time)."""
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._lists = lists_cache
        self._events: EventSink = events or NoEvents()
        self._audit: AuditTrail = audit or NoAudit()
        self._countries: dict[tuple[str, GuardLevel], tuple[datetime, Conversion]] = {}

    # --- on the path of every start ---------------------------------------------------------

    async def lists_of(self, account_id: str) -> AccountLists:
        async def load() -> AccountLists:
            return AccountLists.of(list(await self._store.list_entries(account_id)))

        found = await self._lists.get(account_id, load)
        return found if found is not None else AccountLists()

    async def is_safe(self, account_id: str, e164: str) -> bool:
        """Whether the account's safe list holds the number or a prefix of it: such a
        destination bypasses the detector, the blocks and the per-prefix rate limits."""
        return (await self.lists_of(account_id)).is_safe(e164)

    async def refuse_denied(self, account_id: str, destination: Destination) -> None:
        """The account's deny list: ``CountryNotAllowed`` for a denied country,
        ``DestinationBlocked`` (no ``retry_after``: waiting does not help) for a denied prefix."""
        lists = await self.lists_of(account_id)
        if destination.country in lists.denied_countries:
            raise CountryNotAllowed(
                f"destination country {destination.country} is on this account's deny list",
                param="to",
            )
        if lists.denied_prefix(destination.e164):
            raise DestinationBlocked(
                "this destination's number range is on this account's deny list", param="to"
            )

    async def screen(
        self,
        *,
        account_id: str,
        service_id: str | None,
        destination: Destination,
        level: GuardLevel | None,
    ) -> None:
        """The blocks step: pass a safe-listed destination; refuse one under a block in force;
        then, unless ``level`` is off or None (plain messages), let the detector judge its
        prefix, which may block it (and refuse this start) now."""
        if await self.is_safe(account_id, destination.e164):
            return
        now = self._clock.now()
        history = await self._store.blocks_of(_candidates(destination))
        self._refuse_if_blocked(history, destination, now)
        if level is None or level is GuardLevel.OFF:
            return
        sensitivity = LEVELS[level]
        prefix = prefix_of(destination.e164)
        own = [b for b in history if b.kind is BlockKind.PREFIX and b.value == prefix]
        # Only what happened since the prefix's last block ended counts: a lifted or expired
        # block starts the count again instead of tripping at once on the same starts.
        since = max(
            [now - timedelta(seconds=sensitivity.window_seconds)] + [b.ended_at() for b in own]
        )
        matured = now - timedelta(seconds=sensitivity.grace_seconds)
        counts = await self._store.prefix_conversion(prefix, since=since, matured=matured)
        if not suspicious(counts, sensitivity):
            return
        reason = render_block_reason(counts, level, sensitivity)
        if not too_low(counts, sensitivity):
            # Half-way there: trip anyway when the whole country is failing (an attack spread
            # thinly over many prefixes of one country).
            country = await self._country(destination, level, sensitivity, now)
            if not country_failing(country, sensitivity):
                return
            reason += f"; country {destination.country}: {country.text()}"
        block = await self._block_prefix(
            prefix, destination.country, reason, own, now, account_id, service_id
        )
        raise DestinationBlocked(
            "this destination's number range is blocked: SMS pumping suspected",
            retry_after=(block.expires_at - now).total_seconds(),
        )

    def _refuse_if_blocked(
        self, history: Sequence[Block], destination: Destination, now: datetime
    ) -> None:
        in_force = [b for b in history if b.in_force(now) and _applies(b, destination)]
        if not in_force:
            return
        until = max(b.expires_at for b in in_force)
        what = "country" if any(b.kind is BlockKind.COUNTRY for b in in_force) else "number range"
        self._metrics.count("destination_blocked", kind=in_force[0].kind.value)
        raise DestinationBlocked(
            f"this destination's {what} is blocked on this server (SMS pumping defence)",
            retry_after=(until - now).total_seconds(),
        )

    async def _country(
        self, destination: Destination, level: GuardLevel, sensitivity: Sensitivity, now: datetime
    ) -> Conversion:
        code = calling_code_of(destination)
        kept = self._countries.get((code, level))
        if kept is not None and kept[0] > now:
            return kept[1]
        counts = await self._store.calling_code_conversion(
            code,
            since=now - timedelta(seconds=sensitivity.window_seconds),
            matured=now - timedelta(seconds=sensitivity.grace_seconds),
        )
        if len(self._countries) > 1_000:
            self._countries.clear()
        self._countries[(code, level)] = (now + timedelta(seconds=COUNTRY_MEMORY_SECONDS), counts)
        return counts

    async def _block_prefix(
        self,
        prefix: str,
        country: str,
        reason: str,
        own: Sequence[Block],
        now: datetime,
        account_id: str,
        service_id: str | None,
    ) -> Block:
        block = Block(
            id=new_id("blk"),
            kind=BlockKind.PREFIX,
            value=prefix,
            country=country,
            reason=reason[:300],
            created_at=now,
            expires_at=now + automatic_duration(list(own), now),
            seq=max((b.seq for b in own), default=0) + 1,
            automatic=True,
        )
        if not await self._store.create_block(block):
            # Another request (or process) blocked it a moment ago: that block answers.
            current = [b for b in await self._store.blocks_of([prefix]) if b.in_force(now)]
            if current:
                return max(current, key=lambda b: b.expires_at)
            return block  # pragma: no cover - lifted within the same instant
        self._metrics.count("block_created", kind="prefix", by="detector")
        log.warning(
            "number prefix blocked (SMS pumping suspected)",
            extra={"block_id": block.id, "prefix": prefix, "country": country},
        )
        await self._announce(block, account_id, service_id, actor=DETECTOR)
        return block

    async def _announce(
        self, block: Block, account_id: str, service_id: str | None, *, actor: str
    ) -> None:
        data = render_block(block)
        await self._events.emit(
            Event(type="fraud.blocked", account_id=account_id, service_id=service_id, data=data)
        )
        await self._audit.record(
            AuditEntry(
                account_id=account_id,
                actor=actor,
                action="block.created",
                target=block.id,
                before=None,
                after=data,
            )
        )

    # --- operators: blocks -------------------------------------------------------------------

    async def blocks(self) -> Sequence[Block]:
        return await self._store.blocks_in_force(self._clock.now())

    async def create_block(
        self, principal: Principal, *, fields: dict[str, Any], reason: str | None
    ) -> Block:
        """An operator's block of ``{"country": "PH"}`` or ``{"prefix": "+63917555"}`` for
        ``duration_seconds`` (default 30 days, at most 365). A block already in force for the
        same value is replaced (lifted, and this one created)."""
        kind, value = _one_of(fields, ("country", "prefix"))
        value = validate_country(value) if kind == "country" else validate_prefix(value)
        duration = fields.get("duration_seconds")
        if duration is None:
            length = MANUAL_BLOCK_DEFAULT
        elif (
            isinstance(duration, bool)
            or not isinstance(duration, int)
            or not (60 <= duration <= MANUAL_BLOCK_MAX.total_seconds())
        ):
            raise InvalidRequest(
                "duration_seconds must be an integer from 60 to 31536000 (365 days)",
                param="duration_seconds",
            )
        else:
            length = timedelta(seconds=duration)
        text = (reason or "").strip() or "blocked by an operator"
        if len(text) > 300:
            raise InvalidRequest("reason must be at most 300 characters", param="reason")
        now = self._clock.now()
        for earlier in await self._store.blocks_of([value]):
            if earlier.in_force(now) and await self._store.lift_block(earlier.id, now):
                await self._lifted(principal, earlier)
        country = value if kind == "country" else country_of(value + "000")
        for _ in range(3):
            block = Block(
                id=new_id("blk"),
                kind=BlockKind(kind),
                value=value,
                country=country,
                reason=text,
                created_at=now,
                expires_at=now + length,
                seq=await self._store.last_block_seq(value) + 1,
                automatic=False,
            )
            if await self._store.create_block(block):
                break
        else:  # pragma: no cover - three lost races in a row
            raise InvalidRequest("another block of this value is being created; try again")
        self._metrics.count("block_created", kind=kind, by="operator")
        log.warning(
            "destination blocked by an operator",
            extra={"block_id": block.id, "kind": kind, "value": value},
        )
        await self._announce(block, principal.account.id, None, actor=principal.key_id)
        return block

    async def lift_block(self, principal: Principal, block_id: str) -> None:
        now = self._clock.now()
        block = await self._store.get_block(block_id)
        if block is None or not await self._store.lift_block(block_id, now):
            raise NotFound("no block in force with this id")
        await self._lifted(principal, block)

    async def _lifted(self, principal: Principal, block: Block) -> None:
        log.warning("block lifted", extra={"block_id": block.id, "value": block.value})
        await self._audit.record(
            AuditEntry(
                account_id=principal.account.id,
                actor=principal.key_id,
                action="block.lifted",
                target=block.id,
                before=render_block(block),
                after=None,
            )
        )

    # --- each account's lists ----------------------------------------------------------------

    async def entries(self, principal: Principal, name: ListName) -> list[ListEntry]:
        found = await self._store.list_entries(principal.account.id)
        return [e for e in found if e.list is name]

    async def add_entry(
        self, principal: Principal, name: ListName, fields: dict[str, Any]
    ) -> tuple[ListEntry, bool]:
        """Add ``{"number"}`` or ``{"prefix"}`` to the safe list, ``{"country"}`` or
        ``{"prefix"}`` to the deny list. Returns the entry and whether it is new."""
        allowed = ("number", "prefix") if name is ListName.SAFE else ("country", "prefix")
        kind, raw = _one_of(fields, allowed)
        if kind == "number":
            value = validate_number(raw)
        elif kind == "prefix":
            value = validate_prefix(raw)
        else:
            value = validate_country(raw)
        entry = ListEntry(
            id=new_id("sfe" if name is ListName.SAFE else "dny"),
            account_id=principal.account.id,
            list=name,
            kind=EntryKind(kind),
            value=value,
            created_at=self._clock.now(),
        )
        stored = await self._store.add_list_entry(entry)
        self._lists.forget(principal.account.id)
        created = stored.id == entry.id
        if created:
            await self._audit.record(
                AuditEntry(
                    account_id=principal.account.id,
                    actor=principal.key_id,
                    action=f"{name.value}_list.added",
                    target=stored.id,
                    before=None,
                    after=_audited_entry(stored),
                )
            )
        return stored, created

    async def remove_entry(self, principal: Principal, name: ListName, entry_id: str) -> None:
        removed = await self._store.remove_list_entry(principal.account.id, name, entry_id)
        self._lists.forget(principal.account.id)
        if removed is None:
            raise NotFound(f"no such {name.value} list entry")
        await self._audit.record(
            AuditEntry(
                account_id=principal.account.id,
                actor=principal.key_id,
                action=f"{name.value}_list.removed",
                target=removed.id,
                before=_audited_entry(removed),
                after=None,
            )
        )


def _one_of(fields: dict[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
    given = [n for n in names if fields.get(n) is not None]
    if len(given) != 1:
        raise InvalidRequest(
            f"give exactly one of {', '.join(names)}", param=given[1] if given else names[0]
        )
    return given[0], fields[given[0]]


def _stamp(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, as the API writes times."""
    if value is None:
        return None
    return value.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def render_block(block: Block) -> dict[str, Any]:
    """A block as the API, events and audit entries show it (a prefix, never a number)."""
    return {
        "id": block.id,
        "kind": block.kind.value,
        "value": block.value,
        "country": block.country,
        "reason": block.reason,
        "automatic": block.automatic,
        "created_at": _stamp(block.created_at),
        "expires_at": _stamp(block.expires_at),
    }


def _audited_entry(entry: ListEntry) -> dict[str, Any]:
    """A list entry as the audit trail keeps it: a number masked (an audit entry never holds
    a full number); a prefix or a country as it is."""
    shown = render_entry(entry)
    if entry.kind is EntryKind.NUMBER:
        shown["value"] = mask(entry.value)
    return shown


def render_entry(entry: ListEntry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "kind": entry.kind.value,
        "value": entry.value,
        "created_at": _stamp(entry.created_at),
    }
