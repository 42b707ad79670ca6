"""What the HTTP providers (Twilio, Vonage) share: one ``aiohttp`` session per sender, one way
to make a request, and one translation of transport failures into delivery errors.

The translation is the one LabsMobile's sender makes (its module docstring says why):

* no connection made within the connect budget (half the timeout), or refused: the request
  certainly carried nothing, ``TransientDeliveryError``;
* the request went out and no answer came (a timeout past the connection, a connection dropped
  before the answer): the provider may have taken it, ``DeliveryTimeout``.

An error text names the provider and the failure's kind, never the URL (the sender's URLs hold
no secret, but a provider's query string might), a header or a body.
"""

from __future__ import annotations

import functools
import json
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

import aiohttp
import certifi
import yarl

from otpgate.errors import DeliveryTimeout, TransientDeliveryError

__all__ = ["Answer", "HttpApi", "json_object", "provider_message", "retry_after_seconds"]

# Provider messages are short fixed phrases; cap them anyway before they reach an exception.
MAX_PROVIDER_MESSAGE: Final = 200
# Any word of the text with a digit in it (the code, most likely) is scrubbed from provider
# messages before they are put in an exception, in case a provider ever echoes it.
_TEXT_TOKEN: Final = re.compile(r"\w*\d\w*")
_FORM: Final = "application/x-www-form-urlencoded"


class Answer(NamedTuple):
    """What a sender keeps of an HTTP answer (read whole before the connection goes back)."""

    status: int
    content: bytes
    retry_after: str


class HttpApi:
    """Requests to one provider's base URL with a whole-request ``timeout_seconds``.

    The session is made on first use (inside the event loop, as aiohttp wants) unless one is
    passed in; ``aclose`` closes only a session made here. After ``aclose`` every request
    raises ``TransientDeliveryError``. Redirects are not followed, proxies and ``.netrc`` of
    the environment are ignored, HTTPS verifies against certifi's CA bundle."""

    def __init__(
        self,
        *,
        provider: str,
        base_url: str,
        timeout_seconds: float,
        client: aiohttp.ClientSession | None = None,
    ) -> None:
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        # Connecting gets half the budget: a connection not made in that time carried nothing.
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, connect=timeout_seconds / 2)
        self._client = client
        self._owns_client = client is None
        self._closed = False

    def url(self, path: str) -> yarl.URL:
        # encoded=True: the path is ours and already safe; yarl would otherwise re-quote it.
        return yarl.URL(f"{self.base_url}{path}", encoded=True)

    async def request(
        self,
        method: str,
        url: yarl.URL,
        *,
        headers: Mapping[str, str],
        form: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        """Send one request; the answer whatever its status, or a delivery error."""
        if self._closed:
            raise TransientDeliveryError(f"{self.provider}: the sender is closed")
        if self._client is None:
            self._client = _new_session(https=self.base_url.startswith("https://"))
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode("ascii")
            headers = {**headers, "Content-Type": _FORM}
        try:
            async with self._client.request(
                method,
                url,
                data=data,
                params=dict(params) if params is not None else None,
                headers=dict(headers),
                allow_redirects=False,
                raise_for_status=False,
                timeout=self._timeout,
            ) as response:
                content = await response.read()
                return Answer(response.status, content, response.headers.get("retry-after", ""))
        # The order matters: aiohttp's timeouts are TimeoutErrors and ClientErrors both, and a
        # connection that was never made is the one failure that certainly sent nothing. The
        # cause is dropped (``from None``): aiohttp's texts hold the URL, and a query string
        # may hold a credential (Vonage's balance request).
        except aiohttp.ConnectionTimeoutError:
            raise TransientDeliveryError(
                f"{self.provider}: no connection within the timeout"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise TransientDeliveryError(
                f"{self.provider}: transport error ({type(exc).__name__})"
            ) from None
        except TimeoutError:
            raise DeliveryTimeout(f"{self.provider}: no answer within the timeout") from None
        except aiohttp.ClientError as exc:  # the request may have gone out: outcome unknown
            raise DeliveryTimeout(
                f"{self.provider}: no answer, connection lost ({type(exc).__name__})"
            ) from None

    async def aclose(self) -> None:
        self._closed = True
        if self._owns_client and self._client is not None:
            await self._client.close()


def _new_session(*, https: bool) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=_tls_context() if https else True),
        trust_env=False,
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


def json_object(content: bytes) -> dict[str, Any] | None:
    """The JSON object in ``content``, or ``None`` when it holds anything else (a provider's
    answer nested past the parser's depth included)."""
    try:
        payload = json.loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def retry_after_seconds(header: str) -> float | None:
    """A ``Retry-After`` of whole seconds (the HTTP-date form is not used by these APIs)."""
    value = header.strip()
    return float(value) if value.isdecimal() else None


def provider_message(value: object, text: str) -> str:
    """A provider's error message, on one line, shortened, with the ``text`` we sent and every
    word of it holding a digit (the code) replaced, in case the provider echoes them."""
    if not isinstance(value, str):
        return ""
    message = " ".join(value.split())[:MAX_PROVIDER_MESSAGE]
    if text:
        message = message.replace(text, "[message text]")
        for token in sorted(set(_TEXT_TOKEN.findall(text)), key=len, reverse=True):
            if len(token) >= 4:
                message = message.replace(token, "[redacted]")
    return message
