"""Services: the per-application policy that every verification follows (API.md §3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from otpgate.domain import policy as rules
from otpgate.domain.events import policy_snapshot
from otpgate.domain.model import Principal, Service, new_id
from otpgate.domain.ports import AuditEntry, AuditTrail, Clock, NoAudit, Page, ServiceStore
from otpgate.errors import InvalidRequest, NotFound
from otpgate.services.cache import TtlCache


class ServiceCatalog:
    def __init__(
        self,
        *,
        storage: ServiceStore,
        clock: Clock,
        cache: TtlCache[Service] | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._cache = cache or TtlCache(0)
        self._audit: AuditTrail = audit or NoAudit()

    async def _audited(
        self,
        principal: Principal,
        action: str,
        service_id: str,
        before: Service | None,
        after: Service | None,
    ) -> None:
        """Record a settings change: the policy before and after, never a secret (the
        webhook URL is reduced to its origin)."""
        await self._audit.record(
            AuditEntry(
                account_id=principal.account.id,
                actor=principal.key_id,
                action=action,
                target=service_id,
                before=None if before is None else policy_snapshot(before.policy),
                after=None if after is None else policy_snapshot(after.policy),
            )
        )

    async def lookup(self, account_id: str, service_id: str) -> Service | None:
        """The account's live service, through the shared cache (every start reads it)."""
        return await self._cache.get(
            (account_id, service_id), lambda: self._storage.get_service(account_id, service_id)
        )

    async def create(self, principal: Principal, fields: Mapping[str, Any]) -> Service:
        policy = rules.build_policy(fields)
        now = self._clock.now()
        service = Service(
            id=new_id("svc"),
            account_id=principal.account.id,
            policy=policy,
            created_at=now,
            updated_at=now,
        )
        await self._storage.create_service(service)
        await self._audited(principal, "service.created", service.id, None, service)
        return service

    async def named(self, principal: Principal, name: str) -> Service:
        """The account's service with this name, created with default settings on first use
        (LabsMobile's ``env``: an application names its environment, not a service id)."""
        found = await self._storage.get_service_by_name(principal.account.id, name)
        if found is not None:
            return found
        return await self.create(principal, {"name": name})

    async def find_named(self, principal: Principal, name: str) -> Service | None:
        """The account's oldest live service with this name, or None; never creates one (a
        LabsMobile ``resendCode``, ``validateCode`` or ``checkCode`` for an ``env`` that was
        never used must leave nothing behind)."""
        return await self._storage.get_service_by_name(principal.account.id, name)

    async def get(self, principal: Principal, service_id: str) -> Service:
        service = await self._storage.get_service(principal.account.id, service_id)
        if service is None:
            raise NotFound("no such service")
        return service

    async def list(self, principal: Principal, *, limit: int, cursor: str | None) -> Page[Service]:
        return await self._storage.list_services(principal.account.id, limit=limit, cursor=cursor)

    async def update(
        self, principal: Principal, service_id: str, fields: Mapping[str, Any]
    ) -> Service:
        current = await self.get(principal, service_id)
        if "name" in fields and fields["name"] is None:
            raise InvalidRequest("name cannot be null", param="name")
        policy = rules.build_policy(fields, base=current.policy)
        updated = await self._storage.update_service(
            principal.account.id, service_id, policy, self._clock.now()
        )
        if updated is None:
            raise NotFound("no such service")
        self._cache.forget((principal.account.id, service_id))
        await self._audited(principal, "service.updated", service_id, current, updated)
        return updated

    async def delete(self, principal: Principal, service_id: str) -> None:
        """Delete the service; its pending verifications are canceled with it."""
        current = await self._storage.get_service(principal.account.id, service_id)
        if current is None or not await self._storage.delete_service(
            principal.account.id, service_id, self._clock.now()
        ):
            raise NotFound("no such service")
        self._cache.forget((principal.account.id, service_id))
        await self._audited(principal, "service.deleted", service_id, current, None)
