"""A small Python client for the native ``/v1`` API (httpx), used by the CLI.

Errors come back as the same :mod:`otpgate.errors` classes the server raised, matched by the
problem's ``code``; a wrong code is not an error (``check`` returns ``valid: false``).
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

from otpgate.errors import PUBLIC_ERRORS, OtpgateError, Unavailable

_BY_CODE = {cls.code: cls for cls in PUBLIC_ERRORS}


class OtpgateClient:
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

    def start_verification(
        self,
        service_id: str,
        to: str,
        *,
        channel: str | None = None,
        locale: str | None = None,
        context: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"service_id": service_id, "to": to}
        for key, value in (("channel", channel), ("locale", locale), ("context", context)):
            if value is not None:
                body[key] = value
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._call("POST", "/v1/verifications", json=body, headers=headers)

    def check(
        self, verification_id: str, code: str, context: dict[str, str] | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"code": code}
        if context is not None:
            body["context"] = context
        return self._call("POST", f"/v1/verifications/{verification_id}/check", json=body)

    def get_verification(self, verification_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/verifications/{verification_id}")

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach otpgate: {exc}") from exc
        if response.is_success:
            result: dict[str, Any] = response.json()
            return result
        try:
            problem = response.json()
        except ValueError:
            problem = {}
        cls = _BY_CODE.get(problem.get("code", ""), OtpgateError)
        raise cls(
            problem.get("detail") or f"HTTP {response.status_code}",
            param=problem.get("param"),
            retry_after=problem.get("retry_after"),
        )
