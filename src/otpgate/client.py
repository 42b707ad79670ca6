"""Python clients for otpgate's native ``/v1`` API (httpx).

* :class:`Client` and :class:`AsyncClient` are the SDK: one method per operation, typed results
  (:class:`Verification`, :class:`CheckResult`, :class:`Message`, :class:`Service`,
  :class:`Account`, :class:`LedgerEntry`, :class:`Page`), ``idempotency_key=`` on every create,
  no retries (a refusal that can succeed later carries ``retry_after``).
* :class:`OtpgateClient` is the small synchronous client the CLI uses: the same requests, the
  decoded JSON answers as dictionaries.

Errors, for all three: every refusal raises :class:`~otpgate.errors.OtpgateError` (exported
here as :class:`OtpgateError`), with ``code``, ``status``, ``detail``, ``param`` and
``retry_after``; the subclass is the one the server raised, matched by the problem's ``code``.
A wrong code is not an error (a check answers ``valid: false``).

* A problem document with a ``code`` this client does not know raises :class:`OtpgateError`
  carrying the server's ``status``, ``code`` and ``title``.
* No answer at all (connection refused, timeout, DNS failure), or a gateway's 502/503/504
  without a problem document, raises :class:`~otpgate.errors.Unavailable`.
* Any other answer that is not the expected JSON raises :class:`OtpgateError` with the code
  ``unexpected_response``.

The API key is sent as ``Authorization: Bearer``; no ``repr`` here shows it, nor a service's
webhook secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from otpgate.errors import PUBLIC_ERRORS, OtpgateError, Unavailable

_BY_CODE = {cls.code: cls for cls in PUBLIC_ERRORS}
_GATEWAY_STATUSES = frozenset({502, 503, 504})


class OtpgateClient:
    """A client of one otpgate server, authenticated with one API key (``Bearer``)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def __repr__(self) -> str:
        return f"OtpgateClient({str(self._http.base_url)!r})"

    def __enter__(self) -> OtpgateClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- verifications ----------------------------------------------------------------------

    def start_verification(
        self,
        service_id: str,
        to: str,
        *,
        country: str | None = None,
        channel: str | None = None,
        locale: str | None = None,
        custom_code: str | None = None,
        context: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Start a verification (or send a pending one's code again)."""
        body = _without_none(
            service_id=service_id,
            to=to,
            country=country,
            channel=channel,
            locale=locale,
            custom_code=custom_code,
            context=None if context is None else dict(context),
            metadata=None if metadata is None else dict(metadata),
        )
        return self._json(
            "POST", "/v1/verifications", json=body, headers=_idempotency(idempotency_key)
        )

    def check(
        self, verification_id: str, code: str, *, context: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Check a code; the answer says ``valid`` true or false."""
        body = _without_none(code=code, context=None if context is None else dict(context))
        return self._json("POST", f"/v1/verifications/{verification_id}/check", json=body)

    def check_destination(
        self,
        service_id: str,
        to: str,
        code: str,
        *,
        country: str | None = None,
        context: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Check a code against the most recent verification of ``to`` in the service."""
        body = _without_none(
            service_id=service_id,
            to=to,
            code=code,
            country=country,
            context=None if context is None else dict(context),
        )
        return self._json("POST", "/v1/verifications/check", json=body)

    def get_verification(self, verification_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/verifications/{verification_id}")

    def resend_verification(
        self,
        verification_id: str,
        *,
        channel: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Send a pending verification's code again (on ``channel``, if given)."""
        return self._json(
            "POST",
            f"/v1/verifications/{verification_id}/resend",
            json=_without_none(channel=channel),
            headers=_idempotency(idempotency_key),
        )

    def cancel_verification(self, verification_id: str) -> dict[str, Any]:
        """Cancel a pending verification; a closed one comes back unchanged."""
        return self._json("POST", f"/v1/verifications/{verification_id}/cancel")

    def list_verifications(
        self,
        *,
        service_id: str | None = None,
        status: str | None = None,
        to: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """One page, ``{"data": [...], "next_cursor": ...}``, newest first."""
        params = _without_none(
            service_id=service_id, status=status, to=to, limit=limit, cursor=cursor
        )
        return self._json("GET", "/v1/verifications", params=params)

    # --- account and keys -------------------------------------------------------------------

    def get_account(self) -> dict[str, Any]:
        """The account of this client's key."""
        return self._json("GET", "/v1/account")

    def list_keys(self) -> dict[str, Any]:
        """The account's keys (live and revoked, never their secrets)."""
        return self._json("GET", "/v1/keys")

    def create_key(self, name: str, *, account_id: str | None = None) -> dict[str, Any]:
        """A new key; its secret (``key``) is in this answer only."""
        return self._json("POST", "/v1/keys", json=_without_none(name=name, account_id=account_id))

    def revoke_key(self, key_id: str) -> None:
        self._send("DELETE", f"/v1/keys/{key_id}")

    # --- services ---------------------------------------------------------------------------

    def create_service(self, name: str, **fields: Any) -> dict[str, Any]:
        """A new service; ``fields`` are the optional service fields (``code_length``, …)."""
        return self._json("POST", "/v1/services", json={"name": name, **fields})

    def list_services(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        return self._json("GET", "/v1/services", params=_without_none(limit=limit, cursor=cursor))

    def get_service(self, service_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/services/{service_id}")

    def update_service(self, service_id: str, **fields: Any) -> dict[str, Any]:
        """Change only the given fields."""
        return self._json("PATCH", f"/v1/services/{service_id}", json=fields)

    # --- transport --------------------------------------------------------------------------

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, **kwargs)
        try:
            document = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise _unexpected(response, "the answer is not a JSON object")
        return document

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.RequestError as exc:  # no usable answer: transport, decoding, redirects
            raise Unavailable(f"cannot reach otpgate at {self._http.base_url}: {exc}") from exc
        if response.is_success:
            return response
        raise _problem_error(response)


def _without_none(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _idempotency(key: str | None) -> dict[str, str] | None:
    return None if key is None else {"Idempotency-Key": key}


def _problem_error(response: httpx.Response) -> OtpgateError:
    """The error an unsuccessful answer stands for."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict) or not isinstance(problem.get("code"), str):
        if response.status_code in _GATEWAY_STATUSES:
            return Unavailable(f"HTTP {response.status_code} from {response.url}")
        return _unexpected(response, "the answer is not a problem document")
    detail, title = problem.get("detail"), problem.get("title")
    retry_after = problem.get("retry_after")
    if retry_after is None:  # a gateway or an older server: the header says the same
        header = response.headers.get("Retry-After", "")
        retry_after = int(header) if header.isascii() and header.isdigit() else None
    param = problem.get("param")
    cls = _BY_CODE.get(problem["code"], OtpgateError)
    error = cls(
        detail if isinstance(detail, str) else title if isinstance(title, str) else None,
        param=param if isinstance(param, str) else None,
        retry_after=retry_after if isinstance(retry_after, int | float) else None,
    )
    if cls is OtpgateError:
        # A code this client does not know yet: keep the server's words for it.
        error.code = problem["code"]
        error.status = response.status_code
        if isinstance(title, str):
            error.title = title
    return error


def _unexpected(response: httpx.Response, why: str) -> OtpgateError:
    error = OtpgateError(f"HTTP {response.status_code} from {response.url}: {why}")
    error.code = "unexpected_response"
    error.status = response.status_code
    error.title = "Unexpected response"
    return error


# === the SDK: Client and AsyncClient ==========================================================

T = TypeVar("T")


def _when(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"not a timestamp: {value!r}")
    return datetime.fromisoformat(value)


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


@dataclass(frozen=True)
class MessageAttempt:
    """One try of one provider to take a message."""

    provider: str | None
    at: datetime
    outcome: str
    error: str | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MessageAttempt:
        return cls(d.get("provider"), _when(d["at"]), d["outcome"], d.get("error"))


@dataclass(frozen=True)
class Message:
    """An SMS (or call, or email) otpgate queued: a verification's, or a plain one
    (``to``, ``sender_id`` and ``error`` are set on plain messages only)."""

    id: str
    channel: str
    status: str
    provider: str | None
    segments: int
    encoding: str
    price: Decimal | None
    test: bool
    created_at: datetime
    updated_at: datetime
    attempts: tuple[MessageAttempt, ...] = ()
    to: str | None = None
    sender_id: str | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Message:
        return cls(
            id=d["id"],
            channel=d["channel"],
            status=d["status"],
            provider=d.get("provider"),
            segments=d["segments"],
            encoding=d["encoding"],
            price=_decimal(d.get("price")),
            test=bool(d.get("test", False)),
            created_at=_when(d["created_at"]),
            updated_at=_when(d["updated_at"]),
            attempts=tuple(MessageAttempt.from_json(a) for a in d.get("attempts", ())),
            to=d.get("to"),
            sender_id=d.get("sender_id"),
            error=d.get("error"),
        )


@dataclass(frozen=True)
class Verification:
    """A verification; its code is never in it."""

    id: str
    service_id: str
    to: str
    channel: str
    status: str
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    check_attempts: int
    max_check_attempts: int
    send_attempts: int
    max_send_attempts: int
    context: dict[str, str] | None
    metadata: dict[str, Any]
    test: bool
    messages: tuple[Message, ...]

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Verification:
        return cls(
            id=d["id"],
            service_id=d["service_id"],
            to=d["to"],
            channel=d["channel"],
            status=d["status"],
            created_at=_when(d["created_at"]),
            updated_at=_when(d["updated_at"]),
            expires_at=_when(d["expires_at"]),
            check_attempts=d["check_attempts"],
            max_check_attempts=d["max_check_attempts"],
            send_attempts=d["send_attempts"],
            max_send_attempts=d["max_send_attempts"],
            context=d.get("context"),
            metadata=dict(d.get("metadata") or {}),
            test=bool(d.get("test", False)),
            messages=tuple(Message.from_json(m) for m in d.get("messages", ())),
        )


@dataclass(frozen=True)
class CheckResult:
    """The answer to a check: ``valid`` says whether the code was right."""

    id: str
    status: str
    valid: bool
    remaining_attempts: int

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CheckResult:
        return cls(d["id"], d["status"], bool(d["valid"]), d["remaining_attempts"])


@dataclass(frozen=True)
class Service:
    """A service: the policy its verifications follow. ``fields`` holds every field of the
    answer (rate limits, templates, test numbers, …) as the server sent it, and
    ``webhook_secret`` is set only on the answer to :meth:`Client.create_service`; neither is
    in the ``repr``."""

    id: str
    name: str
    code_length: int
    code_type: str
    ttl_seconds: int
    max_check_attempts: int
    max_send_attempts: int
    resend_interval_seconds: int
    channels: tuple[str, ...]
    allowed_countries: tuple[str, ...] | None
    sender_id: str | None
    created_at: datetime
    updated_at: datetime
    fields: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    webhook_secret: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Service:
        countries = d.get("allowed_countries")
        return cls(
            id=d["id"],
            name=d["name"],
            code_length=d["code_length"],
            code_type=d["code_type"],
            ttl_seconds=d["ttl_seconds"],
            max_check_attempts=d["max_check_attempts"],
            max_send_attempts=d["max_send_attempts"],
            resend_interval_seconds=d["resend_interval_seconds"],
            channels=tuple(d.get("channels", ())),
            allowed_countries=None if countries is None else tuple(countries),
            sender_id=d.get("sender_id"),
            created_at=_when(d["created_at"]),
            updated_at=_when(d["updated_at"]),
            fields={k: v for k, v in d.items() if k != "webhook_secret"},
            webhook_secret=d.get("webhook_secret"),
        )


@dataclass(frozen=True)
class Account:
    """The account of the client's key, with its balance (credits)."""

    id: str
    name: str
    username: str
    is_admin: bool
    created_at: datetime
    billing: str
    balance: Decimal
    daily_spend_cap: Decimal | None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Account:
        return cls(
            id=d["id"],
            name=d["name"],
            username=d["username"],
            is_admin=bool(d["is_admin"]),
            created_at=_when(d["created_at"]),
            billing=d["billing"],
            balance=Decimal(str(d["balance"])),
            daily_spend_cap=_decimal(d.get("daily_spend_cap")),
        )


@dataclass(frozen=True)
class LedgerEntry:
    """One top-up, debit (negative ``credits``) or refund of the account."""

    id: str
    kind: str
    credits: Decimal
    balance: Decimal
    message_id: str | None
    note: str | None
    created_at: datetime

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> LedgerEntry:
        return cls(
            id=d["id"],
            kind=d["kind"],
            credits=Decimal(str(d["credits"])),
            balance=Decimal(str(d["balance"])),
            message_id=d.get("message_id"),
            note=d.get("note"),
            created_at=_when(d["created_at"]),
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list, newest first; pass ``next_cursor`` as ``cursor`` for the next one
    (``None``: this is the last page)."""

    data: tuple[T, ...]
    next_cursor: str | None

    def __iter__(self) -> Iterator[T]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def _page(item: Callable[[Mapping[str, Any]], T]) -> Callable[[Mapping[str, Any]], Page[T]]:
    def parse(d: Mapping[str, Any]) -> Page[T]:
        cursor = d.get("next_cursor")
        return Page(tuple(item(x) for x in d["data"]), cursor if isinstance(cursor, str) else None)

    return parse


def _nothing(_: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One request and how to read its answer; both clients send the same ones."""

    method: str
    path: str
    parse: Callable[[Mapping[str, Any]], T]
    json: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] | None = None
    has_body: bool = True


def _segment(value: str) -> str:
    """An id as one path segment (an id with a ``/`` or ``?`` cannot reach another route)."""
    return quote(value, safe="")


def _opt_dict(value: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if value is None else dict(value)


class _Calls:
    """The requests of every operation (shared by :class:`Client` and :class:`AsyncClient`)."""

    @staticmethod
    def start_verification(
        service_id: str,
        to: str,
        *,
        country: str | None,
        channel: str | None,
        locale: str | None,
        custom_code: str | None,
        context: Mapping[str, str] | None,
        metadata: Mapping[str, Any] | None,
        email: str | None,
        client_ip: str | None,
        idempotency_key: str | None,
    ) -> _Call[Verification]:
        body = _without_none(
            service_id=service_id,
            to=to,
            country=country,
            channel=channel,
            locale=locale,
            custom_code=custom_code,
            context=_opt_dict(context),
            metadata=_opt_dict(metadata),
            email=email,
            client_ip=client_ip,
        )
        return _Call(
            "POST",
            "/v1/verifications",
            Verification.from_json,
            json=body,
            headers=_idempotency(idempotency_key),
        )

    @staticmethod
    def get_verification(verification_id: str) -> _Call[Verification]:
        path = f"/v1/verifications/{_segment(verification_id)}"
        return _Call("GET", path, Verification.from_json)

    @staticmethod
    def list_verifications(
        *,
        service_id: str | None,
        status: str | None,
        to: str | None,
        limit: int | None,
        cursor: str | None,
    ) -> _Call[Page[Verification]]:
        params = _without_none(
            service_id=service_id, status=status, to=to, limit=limit, cursor=cursor
        )
        return _Call("GET", "/v1/verifications", _page(Verification.from_json), params=params)

    @staticmethod
    def resend_verification(
        verification_id: str, *, channel: str | None, idempotency_key: str | None
    ) -> _Call[Verification]:
        return _Call(
            "POST",
            f"/v1/verifications/{_segment(verification_id)}/resend",
            Verification.from_json,
            json=_without_none(channel=channel),
            headers=_idempotency(idempotency_key),
        )

    @staticmethod
    def check_verification(
        verification_id: str, code: str, *, context: Mapping[str, str] | None
    ) -> _Call[CheckResult]:
        return _Call(
            "POST",
            f"/v1/verifications/{_segment(verification_id)}/check",
            CheckResult.from_json,
            json=_without_none(code=code, context=_opt_dict(context)),
        )

    @staticmethod
    def check_destination(
        service_id: str,
        to: str,
        code: str,
        *,
        country: str | None,
        context: Mapping[str, str] | None,
    ) -> _Call[CheckResult]:
        body = _without_none(
            service_id=service_id, to=to, code=code, country=country, context=_opt_dict(context)
        )
        return _Call("POST", "/v1/verifications/check", CheckResult.from_json, json=body)

    @staticmethod
    def cancel_verification(verification_id: str) -> _Call[Verification]:
        path = f"/v1/verifications/{_segment(verification_id)}/cancel"
        return _Call("POST", path, Verification.from_json)

    @staticmethod
    def create_service(
        name: str, fields: Mapping[str, Any], idempotency_key: str | None
    ) -> _Call[Service]:
        return _Call(
            "POST",
            "/v1/services",
            Service.from_json,
            json={"name": name, **fields},
            headers=_idempotency(idempotency_key),
        )

    @staticmethod
    def get_service(service_id: str) -> _Call[Service]:
        return _Call("GET", f"/v1/services/{_segment(service_id)}", Service.from_json)

    @staticmethod
    def list_services(*, limit: int | None, cursor: str | None) -> _Call[Page[Service]]:
        params = _without_none(limit=limit, cursor=cursor)
        return _Call("GET", "/v1/services", _page(Service.from_json), params=params)

    @staticmethod
    def update_service(service_id: str, fields: Mapping[str, Any]) -> _Call[Service]:
        path = f"/v1/services/{_segment(service_id)}"
        return _Call("PATCH", path, Service.from_json, json=dict(fields))

    @staticmethod
    def delete_service(service_id: str) -> _Call[None]:
        path = f"/v1/services/{_segment(service_id)}"
        return _Call("DELETE", path, _nothing, has_body=False)

    @staticmethod
    def send_message(
        to: str,
        text: str,
        *,
        country: str | None,
        sender_id: str | None,
        idempotency_key: str | None,
    ) -> _Call[Message]:
        body = _without_none(to=to, text=text, country=country, sender_id=sender_id)
        return _Call(
            "POST",
            "/v1/messages",
            Message.from_json,
            json=body,
            headers=_idempotency(idempotency_key),
        )

    @staticmethod
    def get_message(message_id: str) -> _Call[Message]:
        return _Call("GET", f"/v1/messages/{_segment(message_id)}", Message.from_json)

    @staticmethod
    def get_account() -> _Call[Account]:
        return _Call("GET", "/v1/account", Account.from_json)

    @staticmethod
    def list_ledger(*, limit: int | None, cursor: str | None) -> _Call[Page[LedgerEntry]]:
        params = _without_none(limit=limit, cursor=cursor)
        return _Call("GET", "/v1/account/ledger", _page(LedgerEntry.from_json), params=params)


def _headers(api_key: str) -> dict[str, str]:
    if not api_key:
        raise ValueError("api_key is required")
    return {"Authorization": f"Bearer {api_key}", "User-Agent": "otpgate-python"}


def _read(call: _Call[T], response: httpx.Response) -> T:
    if not response.is_success:
        raise _problem_error(response)
    if not call.has_body:
        return call.parse({})
    try:
        document = response.json()
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise _unexpected(response, "the answer is not a JSON object")
    try:
        return call.parse(document)
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:
        why = f"the answer does not have the documented shape ({exc!r})"
        raise _unexpected(response, why) from exc


class Client:
    """A synchronous client of one otpgate server, with one API key.

    ::

        with Client("https://otp.example.com", api_key=key) as otp:
            v = otp.start_verification(service_id, "+34600000001")
            result = otp.check_verification(v.id, "123456")

    Nothing is retried; a refusal that may succeed later (429, a temporary block) carries
    ``retry_after`` in seconds.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers=_headers(api_key),
        )

    def __repr__(self) -> str:
        return f"Client({str(self._http.base_url)!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _do(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(
                call.method, call.path, json=call.json, params=call.params, headers=call.headers
            )
        except httpx.RequestError as exc:
            raise Unavailable(f"cannot reach otpgate at {self._http.base_url}: {exc}") from exc
        return _read(call, response)

    # --- verifications ----------------------------------------------------------------------

    def start_verification(
        self,
        service_id: str,
        to: str,
        *,
        country: str | None = None,
        channel: str | None = None,
        locale: str | None = None,
        custom_code: str | None = None,
        context: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        email: str | None = None,
        client_ip: str | None = None,
        idempotency_key: str | None = None,
    ) -> Verification:
        """Start a verification and send its code; for a destination with a pending one, send
        that one's code again."""
        return self._do(
            _Calls.start_verification(
                service_id,
                to,
                country=country,
                channel=channel,
                locale=locale,
                custom_code=custom_code,
                context=context,
                metadata=metadata,
                email=email,
                client_ip=client_ip,
                idempotency_key=idempotency_key,
            )
        )

    def get_verification(self, verification_id: str) -> Verification:
        return self._do(_Calls.get_verification(verification_id))

    def list_verifications(
        self,
        *,
        service_id: str | None = None,
        status: str | None = None,
        to: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Verification]:
        return self._do(
            _Calls.list_verifications(
                service_id=service_id, status=status, to=to, limit=limit, cursor=cursor
            )
        )

    def resend_verification(
        self,
        verification_id: str,
        *,
        channel: str | None = None,
        idempotency_key: str | None = None,
    ) -> Verification:
        return self._do(
            _Calls.resend_verification(
                verification_id, channel=channel, idempotency_key=idempotency_key
            )
        )

    def check_verification(
        self, verification_id: str, code: str, *, context: Mapping[str, str] | None = None
    ) -> CheckResult:
        return self._do(_Calls.check_verification(verification_id, code, context=context))

    def check_destination(
        self,
        service_id: str,
        to: str,
        code: str,
        *,
        country: str | None = None,
        context: Mapping[str, str] | None = None,
    ) -> CheckResult:
        return self._do(
            _Calls.check_destination(service_id, to, code, country=country, context=context)
        )

    def cancel_verification(self, verification_id: str) -> Verification:
        return self._do(_Calls.cancel_verification(verification_id))

    # --- services ---------------------------------------------------------------------------

    def create_service(
        self, name: str, *, idempotency_key: str | None = None, **fields: Any
    ) -> Service:
        """``fields`` are the optional service fields (``code_length``, ``channels``, …)."""
        return self._do(_Calls.create_service(name, fields, idempotency_key))

    def get_service(self, service_id: str) -> Service:
        return self._do(_Calls.get_service(service_id))

    def list_services(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Service]:
        return self._do(_Calls.list_services(limit=limit, cursor=cursor))

    def update_service(self, service_id: str, **fields: Any) -> Service:
        """Change only the given fields (``None`` resets one to its default)."""
        return self._do(_Calls.update_service(service_id, fields))

    def delete_service(self, service_id: str) -> None:
        self._do(_Calls.delete_service(service_id))

    # --- messages and account ---------------------------------------------------------------

    def send_message(
        self,
        to: str,
        text: str,
        *,
        country: str | None = None,
        sender_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        return self._do(
            _Calls.send_message(
                to, text, country=country, sender_id=sender_id, idempotency_key=idempotency_key
            )
        )

    def get_message(self, message_id: str) -> Message:
        return self._do(_Calls.get_message(message_id))

    def get_account(self) -> Account:
        return self._do(_Calls.get_account())

    def list_ledger(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[LedgerEntry]:
        return self._do(_Calls.list_ledger(limit=limit, cursor=cursor))


class AsyncClient:
    """The same operations as :class:`Client`, for ``asyncio`` (``await`` each one)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            transport=transport,
            headers=_headers(api_key),
        )

    def __repr__(self) -> str:
        return f"AsyncClient({str(self._http.base_url)!r})"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, *exc: type[BaseException] | BaseException | TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _do(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, json=call.json, params=call.params, headers=call.headers
            )
        except httpx.RequestError as exc:
            raise Unavailable(f"cannot reach otpgate at {self._http.base_url}: {exc}") from exc
        return _read(call, response)

    async def start_verification(
        self,
        service_id: str,
        to: str,
        *,
        country: str | None = None,
        channel: str | None = None,
        locale: str | None = None,
        custom_code: str | None = None,
        context: Mapping[str, str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        email: str | None = None,
        client_ip: str | None = None,
        idempotency_key: str | None = None,
    ) -> Verification:
        return await self._do(
            _Calls.start_verification(
                service_id,
                to,
                country=country,
                channel=channel,
                locale=locale,
                custom_code=custom_code,
                context=context,
                metadata=metadata,
                email=email,
                client_ip=client_ip,
                idempotency_key=idempotency_key,
            )
        )

    async def get_verification(self, verification_id: str) -> Verification:
        return await self._do(_Calls.get_verification(verification_id))

    async def list_verifications(
        self,
        *,
        service_id: str | None = None,
        status: str | None = None,
        to: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> Page[Verification]:
        return await self._do(
            _Calls.list_verifications(
                service_id=service_id, status=status, to=to, limit=limit, cursor=cursor
            )
        )

    async def resend_verification(
        self,
        verification_id: str,
        *,
        channel: str | None = None,
        idempotency_key: str | None = None,
    ) -> Verification:
        return await self._do(
            _Calls.resend_verification(
                verification_id, channel=channel, idempotency_key=idempotency_key
            )
        )

    async def check_verification(
        self, verification_id: str, code: str, *, context: Mapping[str, str] | None = None
    ) -> CheckResult:
        return await self._do(_Calls.check_verification(verification_id, code, context=context))

    async def check_destination(
        self,
        service_id: str,
        to: str,
        code: str,
        *,
        country: str | None = None,
        context: Mapping[str, str] | None = None,
    ) -> CheckResult:
        return await self._do(
            _Calls.check_destination(service_id, to, code, country=country, context=context)
        )

    async def cancel_verification(self, verification_id: str) -> Verification:
        return await self._do(_Calls.cancel_verification(verification_id))

    async def create_service(
        self, name: str, *, idempotency_key: str | None = None, **fields: Any
    ) -> Service:
        return await self._do(_Calls.create_service(name, fields, idempotency_key))

    async def get_service(self, service_id: str) -> Service:
        return await self._do(_Calls.get_service(service_id))

    async def list_services(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[Service]:
        return await self._do(_Calls.list_services(limit=limit, cursor=cursor))

    async def update_service(self, service_id: str, **fields: Any) -> Service:
        return await self._do(_Calls.update_service(service_id, fields))

    async def delete_service(self, service_id: str) -> None:
        await self._do(_Calls.delete_service(service_id))

    async def send_message(
        self,
        to: str,
        text: str,
        *,
        country: str | None = None,
        sender_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        return await self._do(
            _Calls.send_message(
                to, text, country=country, sender_id=sender_id, idempotency_key=idempotency_key
            )
        )

    async def get_message(self, message_id: str) -> Message:
        return await self._do(_Calls.get_message(message_id))

    async def get_account(self) -> Account:
        return await self._do(_Calls.get_account())

    async def list_ledger(
        self, *, limit: int | None = None, cursor: str | None = None
    ) -> Page[LedgerEntry]:
        return await self._do(_Calls.list_ledger(limit=limit, cursor=cursor))


__all__ = [
    "Account",
    "AsyncClient",
    "CheckResult",
    "Client",
    "LedgerEntry",
    "Message",
    "MessageAttempt",
    "OtpgateClient",
    "OtpgateError",
    "Page",
    "Service",
    "Verification",
]
