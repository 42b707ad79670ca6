"""A small synchronous Python client for the native ``/v1`` API (httpx), used by the CLI.

Every method sends one request and returns the decoded JSON answer (``None`` for the answers
without a body). Errors come back as the same :mod:`otpgate.errors` classes the server raised,
matched by the problem's ``code``; a wrong code is not an error (``check`` returns
``valid: false``).

* A problem document with a ``code`` this client does not know raises :class:`OtpgateError`
  carrying the server's ``status``, ``code`` and ``title``.
* No answer at all (connection refused, timeout, DNS failure), or a gateway's 502/503/504
  without a problem document, raises :class:`~otpgate.errors.Unavailable`.
* Any other answer that is not the expected JSON raises :class:`OtpgateError` with the code
  ``unexpected_response``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

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
