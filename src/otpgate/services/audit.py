"""The audit trail of security-relevant actions, and its list (``GET /v1/audit``).

:class:`AuditLog` is the ``AuditTrail`` the use cases record to: API keys created or revoked,
service settings changed (before and after, never a secret), destinations locked after
consecutive failed checks and lockouts cleared, and whatever other controls add (blocks,
safe-list edits). Each entry is written after the action it records commits, by the same
request; a storage failure there answers ``503`` although the action took effect.
"""

from __future__ import annotations

from otpgate.domain.events import AuditRecord
from otpgate.domain.model import Principal, new_id
from otpgate.domain.ports import AuditEntry, AuditStore, Clock, Page
from otpgate.errors import InvalidRequest
from otpgate.services.events import scope

#: What ``action`` may be filtered on: at most this long, of these characters.
_MAX_ACTION = 64


class AuditLog:
    def __init__(self, *, store: AuditStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def record(self, entry: AuditEntry) -> None:
        await self._store.insert_audit(
            AuditRecord(
                id=new_id("aud"),
                account_id=entry.account_id,
                actor=entry.actor[:64],
                action=entry.action[:_MAX_ACTION],
                target=entry.target[:255],
                before=None if entry.before is None else dict(entry.before),
                after=None if entry.after is None else dict(entry.after),
                created_at=self._clock.now(),
            )
        )

    async def list(
        self,
        principal: Principal,
        *,
        account_id: str | None,
        action: str | None,
        limit: int,
        cursor: str | None,
    ) -> Page[AuditRecord]:
        """The entries the principal may see (``events.scope``), newest first."""
        if action is not None and (
            len(action) > _MAX_ACTION or not action.replace(".", "").replace("_", "").isalnum()
        ):
            raise InvalidRequest("action is not an audit action", param="action")
        return await self._store.list_audit(
            scope(principal, account_id), action=action, limit=limit, cursor=cursor
        )
