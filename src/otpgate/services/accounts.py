"""Accounts, API keys and authentication (API.md §1, §8; SECURITY.md S16).

An API key is ``otpgate_`` followed by 256 random bits (URL-safe base64). It is shown once, at
creation; storage keeps only its SHA-256, so a stolen database yields no usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from otpgate.domain.billing import BillingMode, cap_text, parse_credits
from otpgate.domain.model import Account, ApiKey, Principal, new_id
from otpgate.domain.ports import AccountStore, AuditEntry, AuditTrail, Clock, NoAudit, Page
from otpgate.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from otpgate.services.cache import TtlCache

KEY_PREFIX = "otpgate_"
DEFAULT_ACCOUNT_NAME = "default"
_USERNAME = re.compile(r"^[A-Za-z0-9._%+@-]{1,254}$")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A new key: ``secret`` exists only in this object and in the one response that shows it."""

    key: ApiKey
    secret: str

    def __repr__(self) -> str:
        return f"IssuedKey(id={self.key.id!r}, secret=<hidden>)"


class AccessService:
    def __init__(
        self,
        *,
        storage: AccountStore,
        clock: Clock,
        key_cache: TtlCache[tuple[ApiKey, Account]] | None = None,
        audit: AuditTrail | None = None,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._audit: AuditTrail = audit or NoAudit()
        # Keys are looked up on every request; a revocation through this process drops the
        # cache at once, one through another process is seen within the cache's lifetime.
        self._key_cache = key_cache or TtlCache(0)

    # --- authentication ---------------------------------------------------------------------

    async def authenticate(self, secret: str) -> Principal:
        """The principal of a Bearer key; ``Unauthorized`` for a missing, wrong or revoked key."""
        if not secret.startswith(KEY_PREFIX) or len(secret) > 128:
            raise Unauthorized("invalid API key")
        key_hash = hash_key(secret)
        found = await self._key_cache.get(key_hash, lambda: self._storage.get_key_by_hash(key_hash))
        if found is None:
            raise Unauthorized("invalid API key")
        key, account = found
        return Principal(account=account, key_id=key.id)

    async def authenticate_basic(self, username: str, secret: str) -> Principal:
        """HTTP Basic ``username:key``: the key must belong to the account with that username
        (the LabsMobile convention). Username comparison is constant time."""
        principal = await self.authenticate(secret)
        if not hmac.compare_digest(principal.account.username.encode(), username.encode()):
            raise Unauthorized("username does not match the API key")
        return principal

    # --- accounts ----------------------------------------------------------------------------

    async def create_account(
        self,
        name: str,
        *,
        username: str | None = None,
        is_admin: bool = False,
        billing: BillingMode | str = BillingMode.PREPAID,
    ) -> Account:
        """A new account; its username defaults to its id. New accounts are prepaid, with no
        credit, unless made ``unlimited``."""
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise InvalidRequest("name must be 1 to 200 characters", param="name")
        if username is not None and not _USERNAME.match(username):
            raise InvalidRequest(
                "username must be an e-mail address or a simple identifier", param="username"
            )
        try:
            mode = BillingMode(billing)
        except ValueError:
            raise InvalidRequest("billing must be prepaid or unlimited", param="billing") from None
        account_id = new_id("acc")
        account = Account(
            id=account_id,
            name=name,
            username=username or account_id,
            is_admin=is_admin,
            created_at=self._clock.now(),
            billing=mode,
        )
        await self._storage.create_account(account)
        return account

    async def ensure_default_account(self) -> tuple[Account, IssuedKey | None]:
        """The installation's admin account, created with its first key on the very first start.
        The key is returned only then (to be printed once); later calls return ``None``."""
        existing = await self._storage.first_admin_account()
        if existing is not None:
            return existing, None
        # Unlimited, so that the embedded default needs no set-up; usage is still recorded.
        account = await self.create_account(
            DEFAULT_ACCOUNT_NAME, is_admin=True, billing=BillingMode.UNLIMITED
        )
        return account, await self.create_key(account.id, name="admin")

    async def get_account(self, account_id: str) -> Account:
        account = await self._storage.get_account(account_id)
        if account is None:
            raise NotFound("no such account")
        return account

    async def list_accounts(
        self, principal: Principal, *, limit: int, cursor: str | None
    ) -> Page[Account]:
        self.require_admin(principal)
        return await self._storage.list_accounts(limit=limit, cursor=cursor)

    async def set_daily_spend_cap(
        self, principal: Principal | None, account_id: str, credits: str | None
    ) -> Account:
        """Set (decimal credits) or remove (None) an account's daily spend cap; admin only
        (``principal`` None: the operator's command line). Applies at once in this process,
        within the key cache's lifetime in others. The audit trail of the account records
        the cap before and after (``account.updated``)."""
        if principal is not None:
            self.require_admin(principal)
        cap = None if credits is None else parse_credits(credits, param="daily_spend_cap")
        before = await self.get_account(account_id)
        account = await self._storage.set_daily_spend_cap(account_id, cap)
        if account is None:
            raise NotFound("no such account")
        self._key_cache.forget()  # requests carry the account as their key lookup read it
        await self._audit.record(
            AuditEntry(
                account_id=account_id,
                actor="cli" if principal is None else principal.key_id,
                action="account.updated",
                target=account_id,
                before={"daily_spend_cap": cap_text(before.daily_spend_cap)},
                after={"daily_spend_cap": cap_text(account.daily_spend_cap)},
            )
        )
        return account

    @staticmethod
    def require_admin(principal: Principal) -> None:
        if not principal.account.is_admin:
            raise Forbidden("this operation needs an admin account's key")

    # --- keys -------------------------------------------------------------------------------

    async def create_key(self, account_id: str, *, name: str, actor: str = "cli") -> IssuedKey:
        """A new key of the account; ``actor`` (the key id of the caller, or ``cli``) is
        recorded in the audit trail."""
        name = name.strip()
        if not 1 <= len(name) <= 200:
            raise InvalidRequest("name must be 1 to 200 characters", param="name")
        await self.get_account(account_id)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(
            id=new_id("key"),
            account_id=account_id,
            name=name,
            key_hash=hash_key(secret),
            created_at=self._clock.now(),
        )
        await self._storage.create_key(key)
        await self._audit.record(
            AuditEntry(
                account_id=account_id,
                actor=actor,
                action="key.created",
                target=key.id,
                after={"id": key.id, "name": key.name},
            )
        )
        return IssuedKey(key=key, secret=secret)

    async def list_keys(self, principal: Principal) -> Sequence[ApiKey]:
        return await self._storage.list_keys(principal.account.id)

    async def revoke_key(self, principal: Principal, key_id: str) -> None:
        if not await self._storage.revoke_key(principal.account.id, key_id, self._clock.now()):
            raise NotFound("no such API key")
        self._key_cache.forget()
        await self._audit.record(
            AuditEntry(
                account_id=principal.account.id,
                actor=principal.key_id,
                action="key.revoked",
                target=key_id,
                before={"id": key_id, "revoked": False},
                after={"id": key_id, "revoked": True},
            )
        )
