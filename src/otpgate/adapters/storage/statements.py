"""Every statement otpgate runs, defined once, in SQLAlchemy Core.

The executors (``sqlite.py``, ``postgres.py``) compile each statement for their dialect and run
it through their driver; ``store.py`` decides which to run, in which transaction. A security
predicate that guards a code is written here once and used by every statement that needs it:

* :func:`checkable` -- a check may act on the verification: pending, unexpired, attempts left
  (single use and the attempt cap hold because approval and failure counting are conditional
  ``UPDATE``\\ s with this predicate, so the database decides which of many concurrent checks
  wins, on SQLite and PostgreSQL alike);
* :func:`resendable` -- a send may be counted: pending, unexpired, below the send cap, the
  resend interval passed;
* :func:`claimable` -- an outbox row may be leased: queued, due, no live lease.

Parameters are named bind parameters with the column's type (``p``); the executor refuses a
parameter without one, so a value is encoded the same way on both backends. Statements whose
shape depends on the call (list filters, a cursor, how many ids) come from cached builders, so
each shape is compiled once.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Integer,
    LargeBinary,
    String,
    and_,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    literal_column,
    null,
    or_,
    select,
    true,
    tuple_,
    update,
)
from sqlalchemy import bindparam as _bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.sql import ColumnElement, Select
from sqlalchemy.sql.elements import BindParameter

from otpgate.adapters.storage import tables as t
from otpgate.adapters.storage.tables import UTCDateTime
from otpgate.domain.billing import BillingMode
from otpgate.domain.model import MessageStatus, VerificationStatus

accounts, api_keys, services = t.accounts, t.api_keys, t.services
verifications, messages = t.verifications, t.messages
failures, idempotency = t.destination_failures, t.idempotency_keys
prices, ledger = t.prices, t.ledger
spend = t.spend_counters
v, m = verifications, messages


def p(name: str, type_: Any = String) -> BindParameter[Any]:
    """A named parameter of the given type (text unless told)."""
    return _bindparam(name, type_=type_)


def now() -> BindParameter[Any]:
    return p("now", UTCDateTime)


def const(value: str) -> ColumnElement[str]:
    """A fixed word (a status) written into the SQL text rather than bound, so that the
    PostgreSQL planner sees it (partial indexes, selectivity) in prepared statements too."""
    if not value.replace("_", "").isalnum():
        raise ValueError("only plain words are inlined")
    return literal_column(f"'{value}'", String)


PENDING = const(VerificationStatus.PENDING.value)
PREPAID = const(BillingMode.PREPAID.value)
QUEUED = const(MessageStatus.QUEUED.value)
SENT = const(MessageStatus.SENT.value)


# --- the security predicates ----------------------------------------------------------------


def checkable() -> ColumnElement[bool]:
    """A check may act on this verification: pending, not expired, attempts left."""
    return and_(
        v.c.status == PENDING,
        v.c.expires_at > now(),
        v.c.check_attempts < v.c.max_check_attempts,
    )


def resendable() -> ColumnElement[bool]:
    """One more send may be counted: pending, not expired, below the send cap, and the last
    send at least the resend interval ago (``sent_before`` = now − interval)."""
    return and_(
        v.c.status == PENDING,
        v.c.expires_at > now(),
        v.c.send_attempts < v.c.max_send_attempts,
        v.c.last_sent_at <= p("sent_before", UTCDateTime),
    )


def claimable() -> ColumnElement[bool]:
    """An outbox row a dispatcher may lease: queued, due, and no other dispatcher's lease
    still running."""
    return and_(
        m.c.status == QUEUED,
        m.c.next_attempt_at <= now(),
        or_(m.c.lease_until.is_(None), m.c.lease_until < now()),
    )


# --- accounts and keys -----------------------------------------------------------------------

INSERT_ACCOUNT = insert(accounts)
ACCOUNT = select(accounts).where(accounts.c.id == p("id"))
FIRST_ADMIN = (
    select(accounts)
    .where(accounts.c.is_admin.is_(True))
    .order_by(accounts.c.created_at, accounts.c.id)
    .limit(1)
)

INSERT_KEY = insert(api_keys)
LIVE_KEY_WITH_ACCOUNT = (
    select(
        api_keys.c.id,
        api_keys.c.account_id,
        api_keys.c.name,
        api_keys.c.key_hash,
        api_keys.c.created_at,
        accounts.c.name.label("account_name"),
        accounts.c.username,
        accounts.c.is_admin,
        accounts.c.created_at.label("account_created_at"),
        accounts.c.billing,
        accounts.c.balance_units,
        accounts.c.daily_spend_cap,
    )
    .join_from(api_keys, accounts, accounts.c.id == api_keys.c.account_id)
    .where(api_keys.c.key_hash == p("key_hash"), api_keys.c.revoked_at.is_(None))
)
KEYS_OF_ACCOUNT = (
    select(api_keys)
    .where(api_keys.c.account_id == p("account_id"))
    .order_by(api_keys.c.created_at, api_keys.c.id)
)
REVOKE_KEY = (
    update(api_keys)
    .where(
        api_keys.c.id == p("key_id"),
        api_keys.c.account_id == p("account_id"),
        api_keys.c.revoked_at.is_(None),
    )
    .values(revoked_at=now())
)

# --- credit ----------------------------------------------------------------------------------

#: Take ``amount`` units from a prepaid account that has them; an unlimited account keeps its
#: balance and always answers. No row: a prepaid balance that cannot cover the amount.
DEBIT = (
    update(accounts)
    .where(
        accounts.c.id == p("account_id"),
        or_(accounts.c.billing != PREPAID, accounts.c.balance_units >= p("amount", BigInteger)),
    )
    .values(
        balance_units=case(
            (accounts.c.billing == PREPAID, accounts.c.balance_units - p("amount", BigInteger)),
            else_=accounts.c.balance_units,
        )
    )
    .returning(accounts.c.billing, accounts.c.balance_units)
)
#: Give back a debit to a prepaid account (an unlimited one was never charged).
REFUND = (
    update(accounts)
    .where(accounts.c.id == p("account_id"))
    .values(
        balance_units=case(
            (accounts.c.billing == PREPAID, accounts.c.balance_units + p("amount", BigInteger)),
            else_=accounts.c.balance_units,
        )
    )
    .returning(accounts.c.balance_units)
)
TOP_UP = (
    update(accounts)
    .where(accounts.c.id == p("account_id"))
    .values(balance_units=accounts.c.balance_units + p("amount", BigInteger))
    .returning(accounts.c.balance_units)
)
INSERT_LEDGER = insert(ledger).values(
    {column.name: p("l_" + column.name, column.type) for column in ledger.c}
)
#: Set (or, with NULL, remove) an account's daily spend cap.
SET_ACCOUNT_CAP = (
    update(accounts)
    .where(accounts.c.id == p("account_id"))
    .values(daily_spend_cap=p("cap", BigInteger))
    .returning(*accounts.c)
)
PRICES = select(prices.c.country, prices.c.unit_price)
DELETE_PRICES = delete(prices)
INSERT_PRICE = insert(prices)

# --- services --------------------------------------------------------------------------------


def _live_service() -> ColumnElement[bool]:
    return and_(services.c.account_id == p("account_id"), services.c.deleted_at.is_(None))


INSERT_SERVICE = insert(services)
SERVICE = select(services).where(services.c.id == p("service_id"), _live_service())
#: The oldest live service of the account with this name (LabsMobile's ``env``).
SERVICE_BY_NAME = (
    select(services)
    .where(services.c.name == p("name"), _live_service())
    .order_by(services.c.created_at, services.c.id)
    .limit(1)
)
UPDATE_SERVICE = (
    update(services)
    .where(services.c.id == p("service_id"), _live_service())
    .values(name=p("name"), policy=p("policy", JSON), updated_at=now())
    .returning(*services.c)
)
DELETE_SERVICE = (
    update(services)
    .where(services.c.id == p("service_id"), _live_service())
    .values(deleted_at=now(), updated_at=now())
)
#: A deleted service's codes must not stay usable or recoverable.
CANCEL_PENDING_OF_SERVICE = (
    update(v)
    .where(v.c.service_id == p("service_id"), v.c.status == PENDING)
    .values(status=const(VerificationStatus.CANCELED.value), code_sealed=null(), updated_at=now())
)

# --- verifications ---------------------------------------------------------------------------


def _one_row(table: Any, prefix: str) -> dict[str, BindParameter[Any]]:
    """The values of a one-row INSERT: a parameter per column, named ``prefix`` + column, so
    that a verification's and a message's values can share one statement's parameters."""
    return {column.name: p(prefix + column.name, column.type) for column in table.c}


INSERT_VERIFICATION = insert(v).values(_one_row(v, "v_"))
INSERT_MESSAGE = insert(m).values(_one_row(m, "m_"))
#: Cancel the verification a new one supersedes (parameter ``superseded``).
CANCEL_SUPERSEDED = (
    update(v)
    .where(v.c.id == p("superseded"), v.c.status == PENDING)
    .values(
        status=const(VerificationStatus.CANCELED.value),
        code_sealed=null(),
        updated_at=p("v_created_at", UTCDateTime),
    )
)


MESSAGE_OF_ACCOUNT = select(m).where(m.c.id == p("id"), m.c.account_id == p("account_id"))


def _scheduled() -> ColumnElement[bool]:
    """The account's messages with this reference still waiting for their time."""
    return and_(
        m.c.account_id == p("account_id"),
        m.c.client_ref == p("client_ref"),
        m.c.status == QUEUED,
        m.c.next_attempt_at > now(),
        m.c.lease_until.is_(None),
    )


CANCEL_SCHEDULED = (
    update(m)
    .where(_scheduled())
    .values(
        status=const(MessageStatus.CANCELED.value),
        next_attempt_at=null(),
        updated_at=now(),
    )
    .returning(m.c.id, m.c.price_units, m.c.spend_units, m.c.spend_caps, m.c.created_at)
)
RELEASE_SCHEDULED = update(m).where(_scheduled()).values(next_attempt_at=now(), updated_at=now())


@functools.cache
def create_verification(
    dialect: str, *, superseding: bool, charged: bool, capped: bool = False
) -> tuple[Any, ...]:
    """The statements that store a new verification and its first message (cancelling the
    verification it supersedes first), to run in one transaction. ``charged``: the message has
    a price; the account is debited (``DEBIT``, no row: refused) and a ledger entry written,
    by the chained statement below or, for the other forms, by the caller in the same
    transaction.

    On PostgreSQL, when nothing is superseded (the common case), one statement chains the
    writes (a data-modifying ``WITH``): one round trip and one commit instead of a
    transaction's four or more. Each insert selects from the step before it, so when the debit
    is refused nothing is inserted (the statement inserts no row), and the message goes in only
    with its verification. Superseding keeps the transaction: PostgreSQL runs the parts of one
    statement in no set order, and the cancel must come before the insert that the
    one-pending-per-destination index would refuse; so does a send counted against a daily
    spend cap (``capped``: the caller counts it in the same transaction).
    """
    if dialect == "postgresql" and not superseding and not capped:
        gate = DEBIT.cte("debit") if charged else None
        new = _insert_from(INSERT_VERIFICATION, verifications, "v_", gate).returning(v.c.id)
        new_verification = new.cte("new_verification")
        message = _insert_from(INSERT_MESSAGE, messages, "m_", new_verification)
        if not charged:
            return (message,)
        assert gate is not None
        new_message = message.returning(m.c.id).cte("new_message")
        entry: dict[str, Any] = {c.name: p("l_" + c.name, c.type) for c in ledger.c}
        entry["balance"] = gate.c.balance_units  # the balance right after the debit
        row = select(*entry.values()).select_from(gate.join(new_message, true()))
        return (insert(ledger).from_select(list(entry), row),)
    steps: tuple[Any, ...] = (INSERT_VERIFICATION, INSERT_MESSAGE)
    # The caller adds the debit and its ledger entry (``DEBIT``, ``INSERT_LEDGER``) to the
    # same transaction when the message is charged.
    return (CANCEL_SUPERSEDED, *steps) if superseding else steps


def _insert_from(statement: Any, table: Any, prefix: str, source: Any) -> Any:
    """``statement``'s one row, inserted by selecting its parameters from ``source`` (a CTE):
    one row when ``source`` has one, none when it has none."""
    row = select(*_one_row(table, prefix).values())
    if source is not None:
        row = row.select_from(source)
    return insert(table).from_select([c.name for c in table.c], row)


_destination = select(p("service_id").label("service_id"), p("to").label("to")).subquery(
    "destination"
)
#: The pending verification of a destination (or a row of NULLs) and its failure record, in
#: one read: a one-row table of the parameters, outer-joined to both.
PENDING_FOR_DESTINATION = select(
    v,
    failures.c.consecutive_failures.label("lockout_failures"),
    failures.c.locked_until.label("lockout_until"),
).select_from(
    _destination.outerjoin(
        v,
        and_(
            v.c.service_id == _destination.c.service_id,
            v.c.to == _destination.c.to,
            v.c.status == PENDING,
        ),
    ).outerjoin(
        failures,
        and_(
            failures.c.service_id == _destination.c.service_id,
            failures.c.to == _destination.c.to,
        ),
    )
)
VERIFICATION = select(v).where(v.c.id == p("id"))
VERIFICATION_OF_ACCOUNT = select(v).where(v.c.id == p("id"), v.c.account_id == p("account_id"))
LATEST_FOR_DESTINATION = (
    select(v)
    .where(v.c.account_id == p("account_id"), v.c.service_id == p("service_id"), v.c.to == p("to"))
    .order_by(v.c.created_at.desc(), v.c.id.desc())
    .limit(1)
)
#: Move a pending verification to a terminal ``status`` and erase its sealed code (no
#: recoverable code outlives ``pending``).
CLOSE = (
    update(v)
    .where(v.c.id == p("id"), v.c.status == PENDING)
    .values(status=p("status"), code_sealed=null(), updated_at=now())
    .returning(v.c.id)
)
EXPIRE_DUE = (
    update(v)
    .where(v.c.status == PENDING, v.c.expires_at <= now())
    .values(status=const(VerificationStatus.EXPIRED.value), code_sealed=null(), updated_at=now())
)
#: Claim a channel fallback: the verification is pending and unexpired and has no message on
#: that channel yet (at most one per channel); it now shows that channel, and its next timed
#: fallback is ``fallback_at`` (NULL: none).
CLAIM_FALLBACK = (
    update(v)
    .where(
        v.c.id == p("id"),
        v.c.status == PENDING,
        v.c.expires_at > now(),
        ~exists().where(m.c.verification_id == v.c.id, m.c.channel == p("channel")),
    )
    .values(channel=p("channel"), fallback_at=p("fallback_at", UTCDateTime), updated_at=now())
    .returning(v.c.id)
)
#: Pending verifications whose timed fallback is due.
FALLBACK_DUE = (
    select(v)
    .where(v.c.fallback_at <= now(), v.c.status == PENDING, v.c.expires_at > now())
    .order_by(v.c.fallback_at)
    .limit(p("limit", Integer))
)
CLEAR_FALLBACK = update(v).where(v.c.id == p("id")).values(fallback_at=null())
COUNT_RESEND = (
    update(v)
    .where(v.c.id == p("id"), resendable())
    .values(send_attempts=v.c.send_attempts + 1, last_sent_at=now(), updated_at=now())
    .returning(v.c.id)
)
#: The verification with its destination's failure record.
FOR_CHECK = (
    select(
        v,
        failures.c.consecutive_failures.label("lockout_failures"),
        failures.c.locked_until.label("lockout_until"),
    )
    .outerjoin(
        failures,
        and_(failures.c.service_id == v.c.service_id, failures.c.to == v.c.to),
    )
    .where(v.c.id == p("id"), v.c.account_id == p("account_id"))
)
APPROVE = (
    update(v)
    .where(v.c.id == p("id"), checkable())
    .values(status=const(VerificationStatus.APPROVED.value), code_sealed=null(), updated_at=now())
    .returning(v.c.service_id, v.c.to)
)
_LAST_ATTEMPT = v.c.check_attempts + 1 >= v.c.max_check_attempts
COUNT_FAILED_CHECK = (
    update(v)
    .where(v.c.id == p("id"), checkable())
    .values(
        check_attempts=v.c.check_attempts + 1,
        status=case(
            (_LAST_ATTEMPT, const(VerificationStatus.MAX_ATTEMPTS_REACHED.value)), else_=PENDING
        ),
        code_sealed=case((_LAST_ATTEMPT, None), else_=v.c.code_sealed),
        updated_at=now(),
    )
    .returning(v.c.check_attempts)
)
LOCKOUT = select(failures.c.consecutive_failures, failures.c.locked_until).where(
    failures.c.service_id == p("service_id"), failures.c.to == p("to")
)
CLEAR_DESTINATION_FAILURES = delete(failures).where(
    failures.c.service_id == p("service_id"), failures.c.to == p("to")
)


@functools.cache
def record_destination_failure(dialect: str) -> Any:
    """Count one more consecutive failure of a destination; the one that reaches
    ``threshold`` resets the count to 0 and locks the destination until ``lock_until``.
    Returns the new count and lock (count 0 with a lock: this failure locked it)."""
    insert_ = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(failures)
    threshold = p("threshold", Integer)
    first_locks = literal(1, Integer) >= threshold
    reached = failures.c.consecutive_failures + 1 >= threshold
    return (
        insert_.values(
            service_id=p("service_id"),
            to=p("to"),
            consecutive_failures=case((first_locks, 0), else_=1),
            locked_until=case((first_locks, p("lock_until", UTCDateTime)), else_=None),
        )
        .on_conflict_do_update(
            index_elements=[failures.c.service_id, failures.c.to],
            set_={
                "consecutive_failures": case(
                    (reached, 0), else_=failures.c.consecutive_failures + 1
                ),
                "locked_until": case(
                    (reached, p("lock_until", UTCDateTime)), else_=failures.c.locked_until
                ),
            },
        )
        .returning(failures.c.consecutive_failures, failures.c.locked_until)
    )


# --- listing ---------------------------------------------------------------------------------


def _paged(query: Select[Any], table: Any, with_cursor: bool) -> Select[Any]:
    """Newest first; the caller asks for one row more than it shows to learn whether there is
    a next page. The cursor is the (created_at, id) of the last row shown."""
    if with_cursor:
        query = query.where(
            tuple_(table.c.created_at, table.c.id)
            < tuple_(p("cursor_at", UTCDateTime), p("cursor_id"))
        )
    return query.order_by(table.c.created_at.desc(), table.c.id.desc()).limit(p("limit", Integer))


@functools.cache
def accounts_page(with_cursor: bool) -> Select[Any]:
    return _paged(select(accounts), accounts, with_cursor)


@functools.cache
def ledger_page(with_cursor: bool) -> Select[Any]:
    return _paged(select(ledger).where(ledger.c.account_id == p("account_id")), ledger, with_cursor)


@functools.cache
def services_page(with_cursor: bool) -> Select[Any]:
    return _paged(select(services).where(_live_service()), services, with_cursor)


@functools.cache
def verifications_page(
    *, by_service: bool, by_to: bool, status: str | None, with_cursor: bool
) -> Select[Any]:
    """``status`` is the *reported* status: a pending row past its expiry is ``expired``."""
    query = select(v).where(v.c.account_id == p("account_id"))
    if by_service:
        query = query.where(v.c.service_id == p("service_id"))
    if by_to:
        query = query.where(v.c.to == p("to"))
    if status == VerificationStatus.EXPIRED.value:
        query = query.where(
            or_(
                v.c.status == const(VerificationStatus.EXPIRED.value),
                and_(v.c.status == PENDING, v.c.expires_at <= now()),
            )
        )
    elif status == VerificationStatus.PENDING.value:
        query = query.where(v.c.status == PENDING, v.c.expires_at > now())
    elif status is not None:
        query = query.where(v.c.status == p("status"))
    return _paged(query, v, with_cursor)


def _ids(count: int) -> list[BindParameter[Any]]:
    return [p(f"id{index}") for index in range(count)]


def id_params(ids: list[str]) -> dict[str, str]:
    """The parameters of a statement built for ``len(ids)`` ids."""
    return {f"id{index}": value for index, value in enumerate(ids)}


@functools.cache
def messages_of(count: int) -> Select[Any]:
    """The messages of ``count`` verifications (parameters from :func:`id_params`)."""
    return select(m).where(m.c.verification_id.in_(_ids(count))).order_by(m.c.created_at, m.c.id)


@functools.cache
def verifications_by_id(count: int) -> Select[Any]:
    return select(v).where(v.c.id.in_(_ids(count)))


@functools.cache
def services_by_id(count: int) -> Select[Any]:
    return select(services).where(services.c.id.in_(_ids(count)))


# --- the outbox ------------------------------------------------------------------------------

CLAIM = (
    update(m)
    .where(
        m.c.id.in_(
            select(m.c.id)
            .where(claimable())
            .order_by(m.c.next_attempt_at)
            .limit(p("limit", Integer))
            # PostgreSQL: concurrent dispatchers skip each other's rows instead of waiting.
            # SQLite has one writer at a time and ignores it.
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(
        lease_until=p("lease_until", UTCDateTime),
        attempts=m.c.attempts + 1,
        updated_at=now(),
    )
    .returning(*m.c)
)


def _logged() -> ColumnElement[str]:
    """``attempt_log`` with the ``entry`` parameter (one JSON line) appended, while the log is
    under :data:`ATTEMPT_LOG_LIMIT` characters; past it the first attempts are kept and the
    rest only counted (``attempts``). ``||`` on both dialects."""
    log = func.coalesce(m.c.attempt_log, "")
    return case(
        (func.length(log) < ATTEMPT_LOG_LIMIT, log + p("entry")),
        else_=log,
    )


#: The most characters of delivery history a message keeps (about a hundred attempts).
ATTEMPT_LOG_LIMIT = 20_000

MARK_SENT = (
    update(m)
    .where(m.c.id == p("id"), m.c.status == QUEUED)
    .values(
        attempt_log=_logged(),
        status=SENT,
        provider=p("provider"),
        provider_ref=p("provider_ref"),
        error=null(),
        lease_until=null(),
        next_attempt_at=null(),
        updated_at=now(),
    )
)
MARK_RETRY = (
    update(m)
    .where(m.c.id == p("id"), m.c.status == QUEUED)
    .values(
        attempt_log=_logged(),
        # ``uncounted`` is 1 when nothing was attempted (the provider was not connected): the
        # claim's count is taken back.
        attempts=m.c.attempts - p("uncounted", Integer),
        provider=p("provider"),
        error=p("error"),
        lease_until=null(),
        next_attempt_at=p("next_attempt_at", UTCDateTime),
        updated_at=now(),
    )
)
MARK_FAILED = (
    update(m)
    .where(m.c.id == p("id"), m.c.status == QUEUED)
    .values(
        attempt_log=_logged(),
        status=const(MessageStatus.FAILED.value),
        provider=p("provider"),
        error=p("error"),
        lease_until=null(),
        next_attempt_at=null(),
        updated_at=now(),
    )
    .returning(
        m.c.verification_id,
        m.c.account_id,
        m.c.price_units,
        m.c.spend_units,
        m.c.spend_caps,
        m.c.created_at,
    )
)
#: The retry and failure marks as the holder of a claim writes them: only while the message
#: still carries that claim's lease (``lease_until``), so a dispatcher that stalled past its
#: lease, whose message another has claimed since, cannot reschedule or fail (and refund) what
#: the newer claim holds. ``MARK_SENT`` needs no lease: a provider's acceptance is a fact,
#: whichever claim made it.
MARK_RETRY_LEASED = MARK_RETRY.where(m.c.lease_until == p("lease_until", UTCDateTime))
MARK_FAILED_LEASED = MARK_FAILED.where(m.c.lease_until == p("lease_until", UTCDateTime))
#: Messages of a verification, other than one, that may still reach the phone.
OTHER_LIVE_MESSAGES = (
    select(func.count().label("n"))
    .select_from(m)
    .where(
        m.c.verification_id == p("verification_id"),
        m.c.id != p("id"),
        or_(
            m.c.status == QUEUED,
            m.c.status == SENT,
            m.c.status == const(MessageStatus.DELIVERED.value),
        ),
    )
)
APPLY_REPORT = (
    update(m)
    .where(
        m.c.provider == p("provider"),
        m.c.provider_ref == p("provider_ref"),
        or_(m.c.status == QUEUED, m.c.status == SENT),
    )
    .values(status=p("status"), error=p("error"), updated_at=now())
    .returning(
        m.c.id,
        m.c.account_id,
        m.c.to,
        m.c.client_ref,
        m.c.ack_url,
        m.c.verification_id,
        m.c.channel,
    )
)
#: The service of a verification, for its webhook (a delivery report's event).
SERVICE_OF_VERIFICATION = (
    select(services.c.id, services.c.policy)
    .select_from(v.join(services, services.c.id == v.c.service_id))
    .where(v.c.id == p("verification_id"), services.c.deleted_at.is_(None))
)
MESSAGE_BY_REFERENCE = (
    select(m.c.id)
    .where(m.c.provider == p("provider"), m.c.provider_ref == p("provider_ref"))
    .limit(1)
)

# --- callbacks (outbound calls owed to callers) -----------------------------------------------

callbacks = t.callbacks
INSERT_CALLBACK = insert(callbacks)
CLAIM_CALLBACKS = (
    update(callbacks)
    .where(
        callbacks.c.id.in_(
            select(callbacks.c.id)
            .where(
                callbacks.c.status == PENDING,
                callbacks.c.next_attempt_at <= now(),
                or_(callbacks.c.lease_until.is_(None), callbacks.c.lease_until < now()),
            )
            .order_by(callbacks.c.next_attempt_at)
            .limit(p("limit", Integer))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(
        lease_until=p("lease_until", UTCDateTime),
        attempts=callbacks.c.attempts + 1,
        updated_at=now(),
    )
    .returning(*callbacks.c)
)
FINISH_CALLBACK = (
    update(callbacks)
    .where(callbacks.c.id == p("id"), callbacks.c.status == PENDING)
    .values(
        status=p("status"),
        error=p("error"),
        lease_until=null(),
        next_attempt_at=null(),
        updated_at=now(),
    )
)
RETRY_CALLBACK = (
    update(callbacks)
    .where(callbacks.c.id == p("id"), callbacks.c.status == PENDING)
    .values(
        error=p("error"),
        lease_until=null(),
        next_attempt_at=p("next_attempt_at", UTCDateTime),
        updated_at=now(),
    )
)

# --- events (the webhook outbox) and the audit log ---------------------------------------------

events, audit = t.events, t.audit_log
INSERT_EVENT = insert(events)
CLAIM_EVENTS = (
    update(events)
    .where(
        events.c.id.in_(
            select(events.c.id)
            .where(
                events.c.status == PENDING,
                events.c.next_attempt_at <= now(),
                or_(events.c.lease_until.is_(None), events.c.lease_until < now()),
            )
            .order_by(events.c.next_attempt_at)
            .limit(p("limit", Integer))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
    )
    .values(
        lease_until=p("lease_until", UTCDateTime),
        attempts=events.c.attempts + 1,
        updated_at=now(),
    )
    .returning(*events.c)
)
FINISH_EVENT = (
    update(events)
    .where(events.c.id == p("id"), events.c.status == PENDING)
    .values(
        status=p("status"),
        last_error=p("error"),
        lease_until=null(),
        next_attempt_at=null(),
        delivered_at=p("delivered_at", UTCDateTime),
        updated_at=now(),
    )
)
RETRY_EVENT = (
    update(events)
    .where(events.c.id == p("id"), events.c.status == PENDING)
    .values(
        last_error=p("error"),
        lease_until=null(),
        next_attempt_at=p("next_attempt_at", UTCDateTime),
        updated_at=now(),
    )
)
SET_WEBHOOK_SECRET = (
    update(services)
    .where(services.c.id == p("service_id"), _live_service())
    .values(webhook_secret_sealed=p("sealed", LargeBinary), updated_at=now())
)


@functools.cache
def webhook_secrets_of(count: int) -> Select[Any]:
    """The sealed signing secrets of ``count`` services (parameters from :func:`id_params`)."""
    return select(services.c.id, services.c.webhook_secret_sealed).where(
        services.c.id.in_(_ids(count))
    )


@functools.cache
def events_page(
    *, by_account: bool, by_service: bool, by_type: bool, with_cursor: bool
) -> Select[Any]:
    query = select(events)
    if by_account:
        query = query.where(events.c.account_id == p("account_id"))
    if by_service:
        query = query.where(events.c.service_id == p("service_id"))
    if by_type:
        query = query.where(events.c.type == p("type"))
    return _paged(query, events, with_cursor)


INSERT_AUDIT = insert(audit)


@functools.cache
def audit_page(*, by_account: bool, by_action: bool, with_cursor: bool) -> Select[Any]:
    query = select(audit)
    if by_account:
        query = query.where(audit.c.account_id == p("account_id"))
    if by_action:
        query = query.where(audit.c.action == p("action"))
    return _paged(query, audit, with_cursor)


# --- idempotency keys ------------------------------------------------------------------------


def _idempotency_key() -> ColumnElement[bool]:
    return and_(idempotency.c.account_id == p("account_id"), idempotency.c.key == p("key"))


INSERT_IDEMPOTENCY_KEY = insert(idempotency)
IDEMPOTENCY_KEY = select(idempotency).where(_idempotency_key())
#: Take over a stale key: delete exactly the row that was read, not a newer one.
DELETE_STALE_IDEMPOTENCY_KEY = delete(idempotency).where(
    _idempotency_key(), idempotency.c.created_at == p("created_at", UTCDateTime)
)
FINISH_IDEMPOTENCY_KEY = (
    update(idempotency)
    .where(_idempotency_key())
    .values(
        state=const("done"),
        response_status=p("response_status", Integer),
        response_body=p("response_body", JSON),
    )
)
ABANDON_IDEMPOTENCY_KEY = delete(idempotency).where(_idempotency_key())
FORGET_IDEMPOTENCY_KEYS = delete(idempotency).where(
    idempotency.c.created_at <= p("before", UTCDateTime)
)


# --- the SMS-pumping defence -----------------------------------------------------------------

blocks, lists = t.fraud_blocks, t.destination_lists
APPROVED = const(VerificationStatus.APPROVED.value)


#: A message of the verification reached a provider: only then could its code be typed.
_REACHED = exists().where(
    m.c.verification_id == v.c.id,
    m.c.status.in_(
        [
            const(s.value)
            for s in (MessageStatus.SENT, MessageStatus.DELIVERED, MessageStatus.UNDELIVERED)
        ]
    ),
)


def _conversion(*where: ColumnElement[bool]) -> Select[Any]:
    """Decided and approved verifications among those created since ``since``: a verification
    is decided when it is approved, or when its code reached a provider and it is no longer
    pending or was created before ``matured`` (its grace period is over). A code that never
    went out (a provider outage) is no evidence of pumping. Deployment-wide: every account's
    verifications count."""
    unconverted = and_(
        or_(v.c.status != PENDING, v.c.created_at <= p("matured", UTCDateTime)), _REACHED
    )
    # CASE tries its branches in order: the messages are looked at for unapproved rows only.
    decided = case((v.c.status == APPROVED, 1), (unconverted, 1), else_=0)
    return select(
        func.coalesce(func.sum(decided), 0).label("decided"),
        func.coalesce(func.sum(case((v.c.status == APPROVED, 1), else_=0)), 0).label("approved"),
    ).where(
        # A range of ``to`` (``low`` ≤ to < ``high``) walks ix_verifications_to_created.
        v.c.to >= p("low"),
        v.c.to < p("high"),
        v.c.created_at >= p("since", UTCDateTime),
        *where,
    )


#: A prefix's numbers: the range, and exactly as long as the prefix and three digits.
PREFIX_CONVERSION = _conversion(func.length(v.c.to) == p("length", Integer))
#: A calling code's numbers (a country, or the shared +1 and +7 plans).
COUNTRY_CONVERSION = _conversion()


@functools.cache
def blocks_for(count: int) -> Select[Any]:
    """Every block (in force or not) of ``count`` values: a number's prefixes of each length
    and its country (parameters from :func:`id_params`)."""
    return select(blocks).where(blocks.c.value.in_(_ids(count)))


INSERT_BLOCK = insert(blocks)
BLOCK = select(blocks).where(blocks.c.id == p("id"))
BLOCKS_IN_FORCE = (
    select(blocks)
    .where(blocks.c.lifted_at.is_(None), blocks.c.expires_at > now())
    .order_by(blocks.c.created_at.desc(), blocks.c.id)
)
LIFT_BLOCK = (
    update(blocks)
    .where(blocks.c.id == p("id"), blocks.c.lifted_at.is_(None), blocks.c.expires_at > now())
    .values(lifted_at=now())
    .returning(blocks.c.id)
)
LAST_SEQ = select(func.coalesce(func.max(blocks.c.seq), 0).label("seq")).where(
    blocks.c.value == p("value")
)

INSERT_LIST_ENTRY = insert(lists)
LIST_ENTRIES = (
    select(lists)
    .where(lists.c.account_id == p("account_id"))
    .order_by(lists.c.created_at, lists.c.id)
)
LIST_ENTRY = select(lists).where(
    lists.c.account_id == p("account_id"), lists.c.list == p("list"), lists.c.id == p("id")
)
DELETE_LIST_ENTRY = delete(lists).where(
    lists.c.account_id == p("account_id"), lists.c.list == p("list"), lists.c.id == p("id")
)


# --- daily spend caps ------------------------------------------------------------------------


@functools.cache
def count_spend(dialect: str) -> Any:
    """Count ``amount`` on a cap's counter for ``day`` if the sum stays within ``cap`` (the
    caller has checked that ``amount`` alone does): the conditional upsert returns the new sum,
    or no row when the cap would be passed. The counter row is locked until the transaction
    ends, so concurrent sends against one cap are counted one after the other."""
    insert_ = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(spend)
    amount = p("amount", BigInteger)
    return (
        insert_.values(cap=p("cap"), day=p("day"), spent_units=amount, reached_at=None)
        .on_conflict_do_update(
            index_elements=[spend.c.cap, spend.c.day],
            set_={"spent_units": spend.c.spent_units + amount},
            where=spend.c.spent_units + amount <= p("limit", BigInteger),
        )
        .returning(spend.c.spent_units)
    )


@functools.cache
def mark_cap_reached(dialect: str) -> Any:
    """Note that a cap refused a send on ``day``; a row only the first time that day."""
    insert_ = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(spend)
    return (
        insert_.values(cap=p("cap"), day=p("day"), spent_units=0, reached_at=now())
        .on_conflict_do_update(
            index_elements=[spend.c.cap, spend.c.day],
            set_={"reached_at": now()},
            where=spend.c.reached_at.is_(None),
        )
        .returning(spend.c.cap)
    )


SPENT = select(spend.c.spent_units).where(spend.c.cap == p("cap"), spend.c.day == p("day"))
#: A refund gives a message's amount back to a counter (never below 0).
GIVE_BACK_SPEND = (
    update(spend)
    .where(spend.c.cap == p("cap"), spend.c.day == p("day"))
    .values(
        spent_units=case(
            (
                spend.c.spent_units > p("amount", BigInteger),
                spend.c.spent_units - p("amount", BigInteger),
            ),
            else_=0,
        )
    )
)
