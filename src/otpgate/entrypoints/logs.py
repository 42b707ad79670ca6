"""Structured logs (S18): one JSON object a line, with the request id of the request being
served. Callers pass masked destinations (``domain.phone.mask``); codes, API keys and provider
credentials are never handed to a logger in the first place."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# Attributes every LogRecord has; anything else came in through ``extra=`` and is logged.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", *, as_json: bool = True) -> None:
    """Send otpgate's and uvicorn's logs to stderr, as JSON lines unless ``as_json`` is off."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if as_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Access lines carry full request paths (receipt tokens); and database drivers and HTTP
    # clients log statement parameters and URLs at DEBUG (destinations, sealed codes). They stay
    # at WARNING whatever level otpgate itself logs at.
    for name in (
        "uvicorn.access",
        "aiosqlite",
        "asyncpg",
        "sqlalchemy",
        "httpx",
        "httpcore",
        "aiohttp",
        "asyncio",
        "watchfiles",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
