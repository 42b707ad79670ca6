"""The ``otpgate`` command (Typer + Rich).

Three kinds of commands:

* **server**: ``serve``, ``worker``, ``db upgrade``;
* **admin** (server-side): ``accounts``, ``keys``, ``services``, ``lockouts``, ``prices``,
  ``credit`` act on the configured database (the same settings as ``serve``) through the
  services, never the storage;
* **client**: ``verify …`` talks to a running server (``OTPGATE_URL``, ``OTPGATE_API_KEY``)
  through :mod:`otpgate.client`.

What scripts can rely on: with ``--json`` standard output holds exactly one JSON document, on
one line (the answer, or on exit status 3 and 4 the problem document), and nothing else; without
it, a readable rendering of the answer. Messages, banners and errors always go to standard
error. The exit status is one of :class:`ExitCode`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from otpgate.client import OtpgateClient
from otpgate.domain.billing import BillingMode
from otpgate.errors import ConfigurationError, InvalidRequest, OtpgateError, Unavailable

# The server stack (settings, SQLAlchemy, Alembic, FastAPI's schemas) is imported inside the
# server-side commands only: the client commands, which scripts call often, start without it.
if TYPE_CHECKING:
    from otpgate.bootstrap import Container
    from otpgate.domain.billing import LedgerEntry
    from otpgate.domain.model import Account, ApiKey, Principal
    from otpgate.settings import Settings

app = typer.Typer(
    help="otpgate: self-hosted one-time-code verification.",
    no_args_is_help=True,
    # A traceback never shows local variables: they can hold API keys.
    pretty_exceptions_show_locals=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts (server-side).", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (server-side).", no_args_is_help=True)
services_app = typer.Typer(
    help="Services: per-application verification policy (server-side).", no_args_is_help=True
)
verify_app = typer.Typer(
    help="Client commands against a running server (OTPGATE_URL, OTPGATE_API_KEY).",
    no_args_is_help=True,
)
lockouts_app = typer.Typer(
    help="Destination lockouts after repeated failed checks (server-side).", no_args_is_help=True
)
prices_app = typer.Typer(
    help="The price table: credits per SMS part by destination country (server-side).",
    no_args_is_help=True,
)
credit_app = typer.Typer(
    help="Prepaid credit: top-ups and the ledger (server-side).", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
app.add_typer(services_app, name="services")
app.add_typer(verify_app, name="verify")
app.add_typer(lockouts_app, name="lockouts")
app.add_typer(prices_app, name="prices")
app.add_typer(credit_app, name="credit")
providers_app = typer.Typer(
    help="Delivery providers and routes (server-side).", no_args_is_help=True
)
app.add_typer(providers_app, name="providers")

T = TypeVar("T")
log = logging.getLogger("otpgate.worker")


class ExitCode(enum.IntEnum):
    """The exit statuses of every command (documented in docs/configuration.md)."""

    OK = 0
    #: ``verify check`` got an answer, and the code is not valid.
    NOT_VALID = 1
    #: Bad usage: unknown or missing options, a malformed value, no API key, invalid settings.
    USAGE = 2
    #: otpgate refused the request (a problem document; its ``code`` says why).
    REFUSED = 3
    #: otpgate or its database could not be reached, or answered ``unavailable``: retry later.
    UNAVAILABLE = 4


# Errors, banners and notes; soft wrap keeps ``code: detail`` and pasteable lines whole.
err = Console(stderr=True, soft_wrap=True, highlight=False)
# The human output. Piped, it is not cut at 80 columns, so ids stay whole in tables.
out = Console(width=None if sys.stdout.isatty() else 200, highlight=False)

JsonFlag = Annotated[
    bool,
    typer.Option("--json", help="Print exactly one JSON document on standard output."),
]
AccountOption = Annotated[
    str | None, typer.Option("--account", help="Account id; default: the default account.")
]
LimitOption = Annotated[int, typer.Option(min=1, max=200, help="Page size, 1-200.")]
CursorOption = Annotated[
    str | None, typer.Option(help="The next_cursor of the previous page.", show_default=False)
]


# --- output ----------------------------------------------------------------------------------


def _write_json(document: Any) -> None:
    # One line: line-oriented tools (and `tail -1`) get the whole document.
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


def _emit(document: Any, as_json: bool, human: RenderableType) -> None:
    """The command's answer: the JSON document, or its human rendering."""
    if as_json:
        _write_json(document)
        return
    with out.capture() as captured:
        out.print(human)
    # Rich pads table and grid lines to their full width; trailing blanks help no reader.
    sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    sys.stdout.flush()


def _exit_code(exc: OtpgateError) -> ExitCode:
    if isinstance(exc, Unavailable):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, ConfigurationError):
        return ExitCode.USAGE
    return ExitCode.REFUSED


def _problem(exc: OtpgateError) -> dict[str, Any]:
    """The problem document of an error, in the shape the HTTP API answers with."""
    document: dict[str, Any] = {
        "type": f"/errors/{exc.code}",
        "title": exc.title,
        "status": exc.status,
        "code": exc.code,
        "detail": exc.detail,
    }
    if exc.param is not None:
        document["param"] = exc.param
    if exc.retry_after is not None:
        document["retry_after"] = exc.retry_after
    return document


def _fail(exc: OtpgateError, as_json: bool) -> NoReturn:
    """End the command for an otpgate error: ``code: detail`` on stderr (and the problem
    document on stdout with ``--json``), with the exit status of its kind."""
    err.print(f"[red]{escape(exc.code)}:[/red] {escape(exc.detail)}")
    if as_json:
        _write_json(_problem(exc))
    raise typer.Exit(_exit_code(exc)) from exc


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value) or "-"
    return str(value)


def _details(title: str, rows: Mapping[str, Any]) -> RenderableType:
    """A titled two-column summary of one object."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for label, value in rows.items():
        # Text, not str: values come from users (names, metadata) and are never Rich markup.
        grid.add_row(label, value if isinstance(value, Text) else Text(_text(value)))
    return Group(Text(title, style="bold"), grid)


def _table(
    title: str, page: Mapping[str, Any], columns: Sequence[tuple[str, str]]
) -> RenderableType:
    """One page of objects as a table; ``columns`` are (heading, field) pairs."""
    table = Table(title=title, title_justify="left")
    for heading, _ in columns:
        table.add_column(heading, overflow="fold")
    for item in page.get("data", []):
        table.add_row(*(Text(_text(item.get(field))) for _, field in columns))
    parts: list[RenderableType] = [table]
    if page.get("next_cursor"):
        parts.append(Text(f"more: --cursor {page['next_cursor']}"))
    return Group(*parts)


def _verification_view(v: Mapping[str, Any]) -> RenderableType:
    messages = [
        f"{m.get('id')}  {m.get('channel')}  {m.get('status')}  "
        f"{m.get('segments')} segment(s) {m.get('encoding') or ''}".rstrip()
        for m in v.get("messages") or []
    ]
    return _details(
        f"verification {v.get('id')}",
        {
            "service": v.get("service_id"),
            "to": v.get("to"),
            "status": v.get("status"),
            "channel": v.get("channel"),
            "created": v.get("created_at"),
            "expires": v.get("expires_at"),
            "checks": f"{v.get('check_attempts')} of {v.get('max_check_attempts')}",
            "sends": f"{v.get('send_attempts')} of {v.get('max_send_attempts')}",
            "context": v.get("context"),
            "metadata": v.get("metadata"),
            "messages": "\n".join(messages) or "-",
        },
    )


def _check_view(result: Mapping[str, Any]) -> RenderableType:
    if result.get("valid"):
        return Text(f"valid: verification {result.get('id')} is {result.get('status')}")
    remaining = result.get("remaining_attempts")
    return Text(
        f"not valid: verification {result.get('id')} is {result.get('status')}, "
        f"{remaining} check attempt(s) left"
    )


def _object_view(kind: str, document: Mapping[str, Any]) -> RenderableType:
    rows = {k.replace("_", " "): v for k, v in document.items() if k != "id"}
    return _details(f"{kind} {document.get('id')}", rows)


_VERIFICATION_COLUMNS = [
    ("id", "id"),
    ("service", "service_id"),
    ("to", "to"),
    ("status", "status"),
    ("created", "created_at"),
    ("expires", "expires_at"),
]
_SERVICE_COLUMNS = [
    ("id", "id"),
    ("name", "name"),
    ("code", "code_length"),
    ("type", "code_type"),
    ("ttl (s)", "ttl_seconds"),
    ("checks", "max_check_attempts"),
    ("sends", "max_send_attempts"),
    ("countries", "allowed_countries"),
]
_KEY_COLUMNS = [
    ("id", "id"),
    ("name", "name"),
    ("account", "account_id"),
    ("created", "created_at"),
    ("revoked", "revoked_at"),
]
_ACCOUNT_COLUMNS = [
    ("id", "id"),
    ("name", "name"),
    ("username", "username"),
    ("admin", "is_admin"),
    ("billing", "billing"),
    ("balance", "balance"),
    ("daily cap", "daily_spend_cap"),
    ("created", "created_at"),
]
_PRICE_COLUMNS = [
    ("country", "country"),
    ("name", "name"),
    ("calling code", "calling_code"),
    ("credits per part", "credits"),
]
_LEDGER_COLUMNS = [
    ("id", "id"),
    ("kind", "kind"),
    ("credits", "credits"),
    ("balance", "balance"),
    ("message", "message_id"),
    ("note", "note"),
    ("created", "created_at"),
]


def _pairs(values: Sequence[str] | None, option: str) -> dict[str, str] | None:
    """``KEY=VALUE`` options as a mapping; a malformed or repeated key is a usage error."""
    if not values:
        return None
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {value!r}", param_hint=option)
        if key in pairs:
            raise typer.BadParameter(f"{key} is given twice", param_hint=option)
        pairs[key] = item
    return pairs


# --- server-side plumbing ----------------------------------------------------------------------


def _settings() -> Settings:
    from otpgate.settings import Settings

    try:
        return Settings()
    except ValueError as exc:
        err.print(f"[red]invalid settings:[/red] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc


def _run(coro: Coroutine[Any, Any, T], *, as_json: bool = False) -> T:
    try:
        return asyncio.run(coro)
    except OtpgateError as exc:
        _fail(exc, as_json)


async def _with_container(action: Callable[[Container], Awaitable[T]]) -> T:
    from otpgate.bootstrap import build, prepare_database

    settings = _settings()
    await prepare_database(settings)
    container = build(settings)
    try:
        return await action(container)
    finally:
        await container.aclose()


def _admin(action: Callable[[Container], Awaitable[T]], as_json: bool) -> T:
    """Run a server-side command on the configured database."""
    return _run(_with_container(action), as_json=as_json)


async def _principal(container: Container, account_id: str | None) -> Principal:
    """The operator acting as ``account_id``, or as the default (admin) account."""
    from otpgate.domain.model import Principal

    if account_id is None:
        account = await _default_account(container)
    else:
        account = await container.access.get_account(account_id)
    return Principal(account=account, key_id="cli")


def _page(items: list[dict[str, Any]], next_cursor: str | None) -> dict[str, Any]:
    """A list answer, in the shape of the API's list pages."""
    return {"data": items, "next_cursor": next_cursor}


# --- server ----------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
) -> None:
    """Start the HTTP API (and the in-process delivery worker). SQLite is migrated by itself;
    on the very first start a default account and an admin API key are created and shown once."""
    import uvicorn

    from otpgate.bootstrap import prepare_database
    from otpgate.entrypoints import logs

    settings = _settings()
    logs.configure(settings.log_level, as_json=settings.log_json)
    _run(prepare_database(settings))
    _run(_first_start(settings, host, port))
    uvicorn.run(
        "otpgate.entrypoints.api.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        access_log=False,
        proxy_headers=False,
        lifespan="on",
    )


async def _first_start(settings: Settings, host: str, port: int) -> None:
    from otpgate.bootstrap import build

    container = build(settings)
    try:
        shown_host = f"[{host}]" if ":" in host else host
        await _default_account(container, base=f"http://{shown_host}:{port}")
    finally:
        await container.aclose()


async def _default_account(container: Container, *, base: str = "http://127.0.0.1:8000") -> Account:
    """The installation's admin account. When this call creates it (the very first use of the
    database, by ``serve`` or any admin command), its credentials are shown, once, on stderr:
    the admin key and the account's username, which HTTP Basic pairs with it."""
    account, issued = await container.access.ensure_default_account()
    if issued is None:
        return account
    err.print(
        Panel.fit(
            f"Created the default account [bold]{account.id}[/bold]\n"
            "and its admin API key. The key is shown [bold]once[/bold]; store it now:\n\n"
            f"  API key:         [bold green]{issued.secret}[/bold green]\n"
            f"  Basic username:  [bold]{escape(account.username)}[/bold]\n\n"
            "Send it as 'Authorization: Bearer <key>',\n"
            "or as HTTP Basic with '<username>:<key>'.",
            title="otpgate: first start",
        ),
        soft_wrap=False,
    )
    bearer = '-H "Authorization: Bearer $OTPGATE_API_KEY" -H "Content-Type: application/json"'
    # Outside the panel and unwrapped, so the lines paste as they are.
    err.print(
        "Try it:\n"
        f"  export OTPGATE_API_KEY={issued.secret}\n"
        f'  curl -s -X POST {base}/v1/services {bearer} -d \'{{"name": "Acme"}}\'\n'
        f"  curl -s -X POST {base}/v1/verifications {bearer} "
        '-d \'{"service_id": "svc_...", "to": "+34600000000"}\'\n'
        f'  curl -s -u "{account.username}:$OTPGATE_API_KEY" {base}/v1/account\n',
        markup=False,
    )
    return account


@app.command()
def worker() -> None:
    """Run the delivery dispatcher (and the callback sender) as a process of its own: the scale
    mode, beside API processes started with OTPGATE_EMBEDDED_WORKER=false.

    Any number of workers may share one PostgreSQL database: each claims due messages with a
    lease (FOR UPDATE SKIP LOCKED), so a message goes to one worker at a time, and the lease of a
    worker that dies lapses to the others after OTPGATE_DELIVERY_LEASE_SECONDS. On SQLite one
    worker process per database file is allowed; a second one exits with status 2.

    SIGTERM or SIGINT stops it gracefully: no new claims, the sends in flight finish and their
    sent-marks are recorded, then it exits 0."""
    from otpgate.bootstrap import build, prepare_database
    from otpgate.entrypoints import logs

    settings = _settings()
    logs.configure(settings.log_level, as_json=settings.log_json)

    async def main() -> None:
        with _sqlite_worker_lock(settings):
            await prepare_database(settings)
            container = build(settings)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _stop_on_signal, sig, stop)
            try:
                container.start_workers()
                _log_worker_start(container)
                err.print("otpgate worker running; Ctrl-C stops it")
                await stop.wait()
                log.info("worker stopping: no new claims; waiting for the sends in flight")
            finally:
                await container.aclose()
                log.info(
                    "worker stopped",
                    extra={"unrecorded_sends": len(container.dispatcher.unrecorded_sends)},
                )

    _run(main())


def _stop_on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    if stop.is_set():
        # The sends in flight are bounded by OTPGATE_PROVIDER_TIMEOUT_SECONDS; SIGKILL ends the
        # process at once (their leases lapse to the other workers).
        log.warning("worker already stopping", extra={"signal": sig.name})
        return
    log.info("worker received a stop signal", extra={"signal": sig.name})
    stop.set()


def _log_worker_start(container: Container) -> None:
    """The start line: what this worker sends through and with which lease (names and numbers
    only: never a URL, which can hold a password, nor a credential)."""
    from otpgate.adapters.storage.engine import is_sqlite

    settings = container.settings
    log.info(
        "worker started",
        extra={
            "providers": [
                {"name": health.name, "type": health.type}
                for health in container.dispatcher.health.values()
            ],
            "channels": sorted(c.value for c in container.dispatcher.channels),
            "database": "sqlite" if is_sqlite(settings.effective_database_url) else "postgresql",
            "lease_seconds": settings.delivery_lease_seconds,
            "provider_timeout_seconds": settings.provider_timeout_seconds,
        },
    )


@contextlib.contextmanager
def _sqlite_worker_lock(settings: Settings) -> Iterator[None]:
    """On SQLite, hold an exclusive lock on ``<database>.worker.lock`` for the life of the
    worker: one ``otpgate worker`` per SQLite file. (Several would be safe, since claims take
    SQLite's write lock, but they would only take turns on that lock, and each turn makes the
    API's writes wait.) The operating system drops the lock when the process ends, even by
    SIGKILL. Nothing to do on PostgreSQL."""
    import fcntl

    from otpgate.adapters.storage.engine import is_sqlite, sqlite_file

    url = settings.effective_database_url
    path = sqlite_file(url) if is_sqlite(url) else None
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".worker.lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                "another otpgate worker already runs on this SQLite database "
                "(OTPGATE_DATABASE_URL); SQLite takes one worker process: use PostgreSQL "
                "to run several"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@db_app.command("upgrade")
def db_upgrade(as_json: JsonFlag = False) -> None:
    """Apply every pending migration to OTPGATE_DATABASE_URL."""
    from otpgate.adapters.storage.migrate import upgrade

    settings = _settings()
    _run(upgrade(settings.effective_database_url, schema=settings.database_schema), as_json=as_json)
    _emit({"status": "up_to_date"}, as_json, Text("database is up to date"))


# --- accounts --------------------------------------------------------------------------------


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Option(help="Account name.")],
    username: Annotated[str | None, typer.Option(help="Login (e-mail); default: the id.")] = None,
    billing: Annotated[
        BillingMode,
        typer.Option(
            help="prepaid: each message is paid from the balance (top it up with "
            "'otpgate credit add'); unlimited: never refused for credit, usage still recorded."
        ),
    ] = BillingMode.PREPAID,
    as_json: JsonFlag = False,
) -> None:
    """Create a (non-admin) account; it starts with a balance of 0."""
    from otpgate.entrypoints.api.schemas import render_account

    account = _admin(
        lambda c: c.access.create_account(name, username=username, billing=billing), as_json
    )
    document = render_account(account)
    _emit(document, as_json, _object_view("created account", document))


@accounts_app.command("list")
def accounts_list(
    limit: LimitOption = 50, cursor: CursorOption = None, as_json: JsonFlag = False
) -> None:
    """List every account, oldest first, with its billing mode and balance."""
    from otpgate.entrypoints.api.schemas import render_account

    async def action(c: Container) -> Any:
        principal = await _principal(c, None)
        return await c.access.list_accounts(principal, limit=limit, cursor=cursor)

    result = _admin(action, as_json)
    document = _page([render_account(a) for a in result.items], result.next_cursor)
    _emit(document, as_json, _table("accounts", document, _ACCOUNT_COLUMNS))


@accounts_app.command("show")
def accounts_show(
    account: Annotated[
        str | None, typer.Option("--id", help="Account id; default: the default account.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show an account, with its billing mode and balance (its username is the one HTTP Basic
    pairs with its keys)."""
    from otpgate.entrypoints.api.schemas import render_account

    async def action(c: Container) -> Account:
        return (await _principal(c, account)).account

    document = render_account(_admin(action, as_json))
    _emit(document, as_json, _object_view("account", document))


@accounts_app.command("update")
def accounts_update(
    daily_cap: Annotated[
        str,
        typer.Option(
            "--daily-cap",
            help="The most the account's messages may cost in one UTC day, in credits "
            "(such as 100 or 12.5); 'none' removes the cap.",
        ),
    ],
    account: Annotated[
        str | None, typer.Option("--id", help="Account id; default: the default account.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change an account's settings: its daily spend cap."""
    from otpgate.entrypoints.api.schemas import render_account

    cap = None if daily_cap.strip().lower() == "none" else daily_cap

    async def action(c: Container) -> Account:
        target = (await _principal(c, account)).account
        return await c.access.set_daily_spend_cap(None, target.id, cap)

    document = render_account(_admin(action, as_json))
    _emit(document, as_json, _object_view("updated account", document))


# --- keys ------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    account: AccountOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key; it is shown once."""
    from otpgate.entrypoints.api.schemas import render_key

    async def action(c: Container) -> Any:
        principal = await _principal(c, account)
        return await c.access.create_key(principal.account.id, name=name)

    issued = _admin(action, as_json)
    document = render_key(issued.key, issued.secret)
    human = Group(
        _object_view("created key", document),
        Text("The key is shown once; store it now.", style="bold"),
    )
    _emit(document, as_json, human)


@keys_app.command("list")
def keys_list(account: AccountOption = None, as_json: JsonFlag = False) -> None:
    """List an account's keys, live and revoked (never their secrets)."""
    from otpgate.entrypoints.api.schemas import render_key

    async def action(c: Container) -> Any:
        return await c.access.list_keys(await _principal(c, account))

    document = _page([render_key(k) for k in _admin(action, as_json)], None)
    _emit(document, as_json, _table("API keys", document, _KEY_COLUMNS))


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Option("--id", help="Key id (key_…).")],
    account: AccountOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Revoke a live key of the account; prints the revoked key."""
    from otpgate.entrypoints.api.schemas import render_key

    async def action(c: Container) -> ApiKey:
        principal = await _principal(c, account)
        await c.access.revoke_key(principal, key)
        (revoked,) = [k for k in await c.access.list_keys(principal) if k.id == key]
        return revoked

    document = render_key(_admin(action, as_json))
    _emit(document, as_json, _object_view("revoked key", document))


# --- services --------------------------------------------------------------------------------

CodeLength = Annotated[int | None, typer.Option(help="4-10 (default 6).")]
CodeType = Annotated[str | None, typer.Option(help="numeric | alphanumeric.")]
TtlSeconds = Annotated[int | None, typer.Option(help="Validity, 60-86400.")]
MaxCheckAttempts = Annotated[int | None, typer.Option(help="1-20.")]
MaxSendAttempts = Annotated[int | None, typer.Option(help="1-10.")]
ResendInterval = Annotated[int | None, typer.Option(help="0-3600.")]
AllowedCountry = Annotated[
    list[str] | None,
    typer.Option(help="Allowed destination country, ISO alpha-2 (repeatable); default: all."),
]
SenderId = Annotated[str | None, typer.Option(help="SMS sender.")]
DefaultLocale = Annotated[str | None, typer.Option(help="e.g. en, es.")]
WebOtpDomain = Annotated[str | None, typer.Option(help="Host for the WebOTP line.")]
AllowMultipart = Annotated[
    bool | None,
    typer.Option(
        "--allow-multipart/--no-allow-multipart",
        help="Accept templates longer than one SMS segment (each part billed).",
    ),
]
ServiceChannel = Annotated[
    list[str] | None,
    typer.Option(
        "--channel", help="sms, voice or email, in fallback order (repeatable); default: sms."
    ),
]
FallbackAfter = Annotated[
    int | None,
    typer.Option(help="With several channels: seconds without a check before the next one."),
]
WebhookUrl = Annotated[str | None, typer.Option(help="Where the service's events are sent.")]
FraudGuard = Annotated[
    str | None, typer.Option(help="SMS-pumping detector: off | basic | standard | strict.")
]
AllowVoip = Annotated[
    bool | None,
    typer.Option("--allow-voip/--no-allow-voip", help="Send SMS codes to VoIP numbers too."),
]
CustomCodes = Annotated[
    bool | None,
    typer.Option("--custom-code/--no-custom-code", help="Accept a start's own code."),
]
DailySpendCap = Annotated[
    str | None, typer.Option(help='Most credits per UTC day, such as "25" or "12.5".')
]
TestNumber = Annotated[
    list[str] | None,
    typer.Option(
        metavar="NUMBER=CODE",
        help="A test number and its fixed code: nothing is sent to it (repeatable; the ones "
        "given replace the service's list).",
    ),
]
RateLimit = Annotated[
    list[str] | None,
    typer.Option(
        metavar="KIND=LIMIT/SECONDS",
        help="A limit on starts: per_number, per_prefix, per_country, per_ip or per_service, "
        "such as per_number=5/3600 (repeatable; on update, the kinds given change and the "
        "others stay as they are).",
    ),
]
RateLimitsFailOpen = Annotated[
    bool | None,
    typer.Option(
        "--rate-limits-fail-open/--rate-limits-fail-closed",
        help="Whether starts go on while the shared limit store (Redis) is down.",
    ),
]
ResetField = Annotated[
    list[str] | None,
    typer.Option(
        "--reset",
        metavar="FIELD",
        help="Set a field back to its default, such as daily_spend_cap, test_numbers, "
        "rate_limits or webhook_url (repeatable).",
    ),
]
ServiceId = Annotated[str, typer.Option("--id", help="Service id (svc_…).")]


def _rate_limits(values: Sequence[str] | None, fail_open: bool | None) -> dict[str, Any] | None:
    """``KIND=LIMIT/SECONDS`` options (and the fail-open switch) as a ``rate_limits`` object.
    The kinds and figures are the service policy's to judge; only the form is checked here."""
    pairs = _pairs(values, "--rate-limit")
    if pairs is None and fail_open is None:
        return None
    limits: dict[str, Any] = {}
    for kind, figures in (pairs or {}).items():
        limit, sep, window = figures.partition("/")
        if not (sep and all(part.isascii() and part.isdigit() for part in (limit, window))):
            raise typer.BadParameter(
                f"expected {kind}=LIMIT/SECONDS, got {figures!r}", param_hint="--rate-limit"
            )
        limits[kind] = {"limit": int(limit), "window_seconds": int(window)}
    if fail_open is not None:
        limits["fail_open"] = fail_open
    return limits


def _service_fields(
    *, rate_limit: Sequence[str] | None = None, fail_open: bool | None = None, **options: Any
) -> dict[str, Any]:
    """The service fields the operator gave (an option left out is not a field)."""
    if options.get("allowed_countries") == []:
        options["allowed_countries"] = None
    if options.get("channels") == []:
        options["channels"] = None
    options["test_numbers"] = _pairs(options.get("test_numbers"), "--test-number")
    options["rate_limits"] = _rate_limits(rate_limit, fail_open)
    return {name: value for name, value in options.items() if value is not None}


def _resets(fields: Sequence[str] | None, given: Mapping[str, Any]) -> dict[str, None]:
    """``--reset FIELD`` options as fields set to null; a field both given and reset, or one
    that cannot be reset, is a usage error."""
    from otpgate.domain.policy import POLICY_FIELDS

    resettable = sorted(POLICY_FIELDS - {"name"})  # a service always has a name
    resets: dict[str, None] = {}
    for field in fields or ():
        if field not in resettable:
            raise typer.BadParameter(
                f"{field!r} is not a service field that can be reset; one of "
                + ", ".join(resettable),
                param_hint="--reset",
            )
        if field in given:
            raise typer.BadParameter(f"{field} is both given and reset", param_hint="--reset")
        resets[field] = None
    return resets


@services_app.command("create")
def services_create(
    name: Annotated[str, typer.Option(help="Brand shown in messages.")],
    account: AccountOption = None,
    code_length: CodeLength = None,
    code_type: CodeType = None,
    ttl_seconds: TtlSeconds = None,
    max_check_attempts: MaxCheckAttempts = None,
    max_send_attempts: MaxSendAttempts = None,
    resend_interval_seconds: ResendInterval = None,
    allowed_country: AllowedCountry = None,
    sender_id: SenderId = None,
    default_locale: DefaultLocale = None,
    webotp_domain: WebOtpDomain = None,
    allow_multipart: AllowMultipart = None,
    channel: ServiceChannel = None,
    fallback_after_seconds: FallbackAfter = None,
    webhook_url: WebhookUrl = None,
    fraud_guard: FraudGuard = None,
    allow_voip: AllowVoip = None,
    custom_code: CustomCodes = None,
    daily_spend_cap: DailySpendCap = None,
    test_number: TestNumber = None,
    rate_limit: RateLimit = None,
    rate_limits_fail_open: RateLimitsFailOpen = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a service; options not given keep their defaults. The answer carries the
    service's webhook signing secret, shown this once (``services rotate-webhook-secret``
    issues a new one)."""
    from otpgate.entrypoints.api.schemas import render_service

    fields = _service_fields(
        name=name,
        code_length=code_length,
        code_type=code_type,
        ttl_seconds=ttl_seconds,
        max_check_attempts=max_check_attempts,
        max_send_attempts=max_send_attempts,
        resend_interval_seconds=resend_interval_seconds,
        allowed_countries=allowed_country,
        sender_id=sender_id,
        default_locale=default_locale,
        webotp_domain=webotp_domain,
        allow_multipart=allow_multipart,
        channels=channel,
        fallback_after_seconds=fallback_after_seconds,
        webhook_url=webhook_url,
        fraud_guard=fraud_guard,
        allow_voip=allow_voip,
        custom_code_enabled=custom_code,
        daily_spend_cap=daily_spend_cap,
        test_numbers=test_number,
        rate_limit=rate_limit,
        fail_open=rate_limits_fail_open,
    )

    async def action(c: Container) -> dict[str, Any]:
        principal = await _principal(c, account)
        service = await c.catalog.create(principal, fields)
        secret = await c.webhook_secrets.issue(principal, service.id, rotated=False)
        return {**render_service(service), "webhook_secret": secret}

    document = _admin(action, as_json)
    _emit(document, as_json, _object_view("created service", document))


@services_app.command("list")
def services_list(
    account: AccountOption = None,
    limit: LimitOption = 50,
    cursor: CursorOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List an account's services."""
    from otpgate.entrypoints.api.schemas import render_service

    async def action(c: Container) -> Any:
        return await c.catalog.list(await _principal(c, account), limit=limit, cursor=cursor)

    result = _admin(action, as_json)
    document = _page([render_service(s) for s in result.items], result.next_cursor)
    _emit(document, as_json, _table("services", document, _SERVICE_COLUMNS))


@services_app.command("show")
def services_show(
    service: ServiceId, account: AccountOption = None, as_json: JsonFlag = False
) -> None:
    """Show a service and its whole policy."""
    from otpgate.entrypoints.api.schemas import render_service

    async def action(c: Container) -> Any:
        return await c.catalog.get(await _principal(c, account), service)

    document = render_service(_admin(action, as_json))
    _emit(document, as_json, _object_view("service", document))


@services_app.command("update")
def services_update(
    service: ServiceId,
    account: AccountOption = None,
    name: Annotated[str | None, typer.Option(help="Brand shown in messages.")] = None,
    code_length: CodeLength = None,
    code_type: CodeType = None,
    ttl_seconds: TtlSeconds = None,
    max_check_attempts: MaxCheckAttempts = None,
    max_send_attempts: MaxSendAttempts = None,
    resend_interval_seconds: ResendInterval = None,
    allowed_country: AllowedCountry = None,
    sender_id: SenderId = None,
    default_locale: DefaultLocale = None,
    webotp_domain: WebOtpDomain = None,
    allow_multipart: AllowMultipart = None,
    channel: ServiceChannel = None,
    fallback_after_seconds: FallbackAfter = None,
    webhook_url: WebhookUrl = None,
    fraud_guard: FraudGuard = None,
    allow_voip: AllowVoip = None,
    custom_code: CustomCodes = None,
    daily_spend_cap: DailySpendCap = None,
    test_number: TestNumber = None,
    rate_limit: RateLimit = None,
    rate_limits_fail_open: RateLimitsFailOpen = None,
    reset: ResetField = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a service: only the options given change (``--reset`` sets a field back to its
    default), the rest stays as it is. The whole policy is checked again; a refused change
    changes nothing."""
    from otpgate.entrypoints.api.schemas import render_service

    fields = _service_fields(
        name=name,
        code_length=code_length,
        code_type=code_type,
        ttl_seconds=ttl_seconds,
        max_check_attempts=max_check_attempts,
        max_send_attempts=max_send_attempts,
        resend_interval_seconds=resend_interval_seconds,
        allowed_countries=allowed_country,
        sender_id=sender_id,
        default_locale=default_locale,
        webotp_domain=webotp_domain,
        allow_multipart=allow_multipart,
        channels=channel,
        fallback_after_seconds=fallback_after_seconds,
        webhook_url=webhook_url,
        fraud_guard=fraud_guard,
        allow_voip=allow_voip,
        custom_code_enabled=custom_code,
        daily_spend_cap=daily_spend_cap,
        test_numbers=test_number,
        rate_limit=rate_limit,
        fail_open=rate_limits_fail_open,
    )

    changes = {**fields, **_resets(reset, fields)}

    async def action(c: Container) -> Any:
        principal = await _principal(c, account)
        if changes.get("rate_limits") is not None:
            # Only the kinds (and the switch) given change: the rest of the service's own
            # limits stay, so flipping fail-open never loosens a limit set before.
            current = await c.catalog.get(principal, service)
            kept = current.policy.rate_limits
            merged: dict[str, Any] = {
                name: {"limit": limit.limit, "window_seconds": limit.window_seconds}
                for name, limit in kept.overrides
            }
            merged["fail_open"] = kept.fail_open
            changes["rate_limits"] = {**merged, **changes["rate_limits"]}
        return await c.catalog.update(principal, service, changes)

    document = render_service(_admin(action, as_json))
    _emit(document, as_json, _object_view("updated service", document))


@services_app.command("rotate-webhook-secret")
def services_rotate_webhook_secret(
    service: ServiceId, account: AccountOption = None, as_json: JsonFlag = False
) -> None:
    """Issue a new webhook signing secret for a service, shown this once. The old one stops
    signing at once: deliveries from now on, retries included, use the new one."""

    async def action(c: Container) -> dict[str, Any]:
        secret = await c.webhook_secrets.issue(await _principal(c, account), service)
        return {"service_id": service, "webhook_secret": secret}

    document = _admin(action, as_json)
    _emit(document, as_json, _details("new webhook secret", document))


# --- lockouts --------------------------------------------------------------------------------


@lockouts_app.command("clear")
def lockouts_clear(
    service: Annotated[str, typer.Option(help="Service id.")],
    to: Annotated[str, typer.Option(help="Destination, international format.")],
    country: Annotated[
        str | None, typer.Option(help="ISO alpha-2 when --to is in national format.")
    ] = None,
    account: AccountOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Lift a destination's lockout and reset its count of consecutive failed checks."""
    from otpgate.entrypoints.api.schemas import timestamp

    async def action(c: Container) -> tuple[str, Any]:
        principal = await _principal(c, account)
        return await c.verifications.clear_lockout(principal, service, to, country=country)

    e164, locked_until = _admin(action, as_json)
    was_locked_until = timestamp(locked_until)
    document = {"service_id": service, "to": e164, "was_locked_until": was_locked_until}
    state = f"it was locked until {was_locked_until}" if locked_until else "it was not locked"
    _emit(document, as_json, Text(f"lockout cleared for {e164} in {service} ({state})"))


# --- prices ----------------------------------------------------------------------------------


def _read_price_file(path: Path) -> str:
    """The text of the price file (``-``: standard input). A byte order mark, as spreadsheets
    write, is dropped; bytes that are not UTF-8 are refused naming their line."""
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot read {path}: {exc.strerror or exc}", param_hint="FILE"
        ) from exc
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        where = f"line {line}"
        raise InvalidRequest(f"{where}: the file is not UTF-8 text", param=where) from None


def _price_list(rows: list[dict[str, Any]], title: str) -> RenderableType:
    """Price rows as a table, calling codes with their ``+``."""
    shown = [{**row, "calling_code": row["prefix"] and f"+{row['prefix']}"} for row in rows]
    parts: list[RenderableType] = [_table(title, {"data": shown}, _PRICE_COLUMNS)]
    if not rows:
        parts.append(Text("no prices: messages carry no price and no credit is spent"))
    return Group(*parts)


@prices_app.command("import")
def prices_import(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            help="CSV with the header country,credits; '*' as the country sets the price of "
            "every country without a line of its own; '-' reads standard input.",
            show_default=False,
        ),
    ],
    as_json: JsonFlag = False,
) -> None:
    """Replace the whole price table with FILE, in one transaction. A bad line (unknown country,
    negative or malformed price, repeated country, no header) is refused naming the line, and
    the table stays as it was. Prints the new table."""
    from otpgate.entrypoints.api.schemas import render_price
    from otpgate.services.billing import price_rows

    try:
        text = _read_price_file(file)
    except OtpgateError as exc:
        _fail(exc, as_json)
    table = _admin(lambda c: c.billing.import_prices(text), as_json)
    document = {"data": [render_price(row) for row in price_rows(table)]}
    human = Group(
        Text(f"imported {len(table)} price(s); the previous table is replaced"),
        _price_list(document["data"], "prices"),
    )
    _emit(document, as_json, human)


@prices_app.command("list")
def prices_list(
    country: Annotated[
        list[str] | None,
        typer.Option(
            help="Only this country, ISO alpha-2 (repeatable). A country without a line of its "
            "own shows the '*' price, if any.",
            show_default=False,
        ),
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Show the price table: credits per SMS part by destination country, as GET /v1/prices."""
    from otpgate.entrypoints.api.schemas import render_price

    async def action(c: Container) -> Any:
        return await c.billing.list_prices(country or None)

    document = {"data": [render_price(row) for row in _admin(action, as_json)]}
    _emit(document, as_json, _price_list(document["data"], "prices"))


# --- providers -------------------------------------------------------------------------------

_PROVIDER_COLUMNS = (("name", "name"), ("type", "type"), ("result", "result"), ("detail", "detail"))


@providers_app.command("check")
def providers_check(as_json: JsonFlag = False) -> None:
    """Validate the delivery configuration (OTPGATE_CONFIG, or the OTPGATE_SMS_PROVIDER form)
    and connect to every provider without sending anything: an SMPP bind, an HTTP request that
    proves reachability and credentials. Exit status 0 when every provider answered, 4 when
    one did not, 2 when the configuration itself is wrong. Never prints a secret."""
    from otpgate.adapters.providers.config import load_delivery
    from otpgate.errors import DeliveryError

    settings = _settings()
    try:
        delivery = load_delivery(settings)
    except ConfigurationError as exc:
        _fail(exc, as_json)
    limit = settings.provider_timeout_seconds

    async def probe() -> list[dict[str, Any]]:
        results = []
        for provider in delivery.providers:
            detail: str | None = None
            try:
                async with asyncio.timeout(limit + 1):
                    await provider.sender.check()
            except DeliveryError as exc:
                detail = exc.detail
            except TimeoutError:
                detail = f"no answer within {limit} s"
            finally:
                await provider.sender.aclose()
            results.append(
                {
                    "name": provider.name,
                    "type": provider.type,
                    "channels": sorted(c.value for c in provider.sender.channels),
                    "ok": detail is None,
                    "result": "ok" if detail is None else "failed",
                    "detail": detail,
                }
            )
        return results

    results = _run(probe(), as_json=as_json)
    route_rows = [
        {"countries": sorted(r.countries) or ["*"], "providers": list(r.providers)}
        for r in delivery.routes
    ]
    document = {"source": delivery.source, "data": results, "routes": route_rows}
    routes = Table(title="routes", title_justify="left")
    routes.add_column("countries")
    routes.add_column("providers, in order")
    for route in route_rows:
        routes.add_row(", ".join(route["countries"]), " → ".join(route["providers"]))
    human = Group(
        Text(f"delivery configuration from {delivery.source}"),
        _table("providers", document, _PROVIDER_COLUMNS),
        routes,
    )
    _emit(document, as_json, human)
    if not all(r["ok"] for r in results):
        raise typer.Exit(ExitCode.UNAVAILABLE)


# --- credit ----------------------------------------------------------------------------------


@credit_app.command("add")
def credit_add(
    account: Annotated[str, typer.Option("--account", help="Account id (acc_…).")],
    credits: Annotated[
        str,
        typer.Option(help="Credits to add: more than 0, at most 4 decimals (20, 12.5, 0.0725)."),
    ],
    note: Annotated[
        str | None, typer.Option(help="Why (an order or invoice number), kept in the ledger.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Top an account up. Prints the ledger entry, whose balance is the account's new one."""
    from otpgate.entrypoints.api.schemas import render_ledger_entry

    async def action(c: Container) -> tuple[LedgerEntry, Account]:
        entry = await c.billing.add_credit(account, credits, note=note)
        return entry, await c.access.get_account(account)

    entry, topped_up = _admin(action, as_json)
    document = render_ledger_entry(entry)
    human = _details(
        f"top-up {document['id']}",
        {
            "account": account,
            "credits": f"+{document['credits']}",
            "balance": document["balance"],
            "note": document["note"],
            "created": document["created_at"],
        },
    )
    if topped_up.billing is BillingMode.UNLIMITED:
        # Not an error: the credit waits there should the account become prepaid.
        err.print(f"note: {account} is unlimited; its sends do not spend its balance")
    _emit(document, as_json, human)


@credit_app.command("ledger")
def credit_ledger(
    account: Annotated[str, typer.Option("--account", help="Account id (acc_…).")],
    limit: LimitOption = 50,
    cursor: CursorOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List an account's top-ups, debits and refunds, newest first, as GET /v1/account/ledger."""
    from otpgate.entrypoints.api.schemas import render_ledger_entry

    async def action(c: Container) -> Any:
        principal = await _principal(c, account)
        return await c.billing.ledger(principal, limit=limit, cursor=cursor)

    result = _admin(action, as_json)
    document = _page([render_ledger_entry(e) for e in result.items], result.next_cursor)
    _emit(document, as_json, _table(f"ledger of {account}", document, _LEDGER_COLUMNS))


# --- client ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Server:
    url: str
    api_key: str


def _check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter("must start with http:// or https://", param_hint="--url")
    return url


@verify_app.callback()
def verify_options(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option(envvar="OTPGATE_URL", help="Server base URL.", callback=_check_url)
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str, typer.Option(envvar="OTPGATE_API_KEY", help="API key.", show_default=False)
    ] = "",
) -> None:
    ctx.obj = _Server(url, api_key)


def _client_call(
    ctx: typer.Context,
    as_json: bool,
    call: Callable[[OtpgateClient], dict[str, Any]],
    human: Callable[[dict[str, Any]], RenderableType],
) -> dict[str, Any]:
    """Send one request to the server and print its answer (or fail with its problem)."""
    server: _Server = ctx.obj
    if not server.api_key:
        err.print(
            "[red]set OTPGATE_API_KEY[/red] (or --api-key), and OTPGATE_URL if not the default"
        )
        raise typer.Exit(ExitCode.USAGE)
    try:
        with OtpgateClient(server.url, api_key=server.api_key) as client:
            document = call(client)
    except OtpgateError as exc:
        _fail(exc, as_json)
    _emit(document, as_json, human(document))
    return document


VerificationId = Annotated[str, typer.Option("--id", help="Verification id (ver_…).")]
Channel = Annotated[str | None, typer.Option(help="sms, voice or email; default: the service's.")]
IdempotencyKey = Annotated[
    str | None,
    typer.Option(help="Repeat the call safely: the same key gets the same answer."),
]
ContextOption = Annotated[
    list[str] | None,
    typer.Option(
        "--context", metavar="KEY=VALUE", help="Bind the code to amount/payee (repeatable)."
    ),
]


@verify_app.command("start")
def verify_start(
    ctx: typer.Context,
    service: Annotated[str, typer.Option(help="Service id.")],
    to: Annotated[str, typer.Option(help="Destination: E.164, or national with --country.")],
    country: Annotated[str | None, typer.Option(help="ISO alpha-2 when --to is national.")] = None,
    channel: Channel = None,
    locale: Annotated[str | None, typer.Option(help="Message language, e.g. en, es.")] = None,
    custom_code: Annotated[str | None, typer.Option(help="Send this code instead.")] = None,
    context: ContextOption = None,
    metadata: Annotated[
        list[str] | None,
        typer.Option(metavar="KEY=VALUE", help="Your own data, kept with it (repeatable)."),
    ] = None,
    idempotency_key: IdempotencyKey = None,
    as_json: JsonFlag = False,
) -> None:
    """Start a verification (or send the pending one's code again)."""
    context_pairs = _pairs(context, "--context")
    metadata_pairs = _pairs(metadata, "--metadata")
    _client_call(
        ctx,
        as_json,
        lambda c: c.start_verification(
            service,
            to,
            country=country,
            channel=channel,
            locale=locale,
            custom_code=custom_code,
            context=context_pairs,
            metadata=metadata_pairs,
            idempotency_key=idempotency_key,
        ),
        _verification_view,
    )


@verify_app.command("check")
def verify_check(
    ctx: typer.Context,
    code: Annotated[str, typer.Option(help="The code the user typed.")],
    verification: Annotated[
        str | None, typer.Option("--id", help="Verification id (or --service and --to).")
    ] = None,
    service: Annotated[
        str | None, typer.Option(help="With --to: check the latest verification of --to.")
    ] = None,
    to: Annotated[str | None, typer.Option(help="Destination, with --service.")] = None,
    country: Annotated[str | None, typer.Option(help="ISO alpha-2 when --to is national.")] = None,
    context: ContextOption = None,
    as_json: JsonFlag = False,
) -> None:
    """Check a code. Exits 0 when it is valid and 1 when it is not."""
    by_destination = service is not None or to is not None
    if (verification is None) == (not by_destination):
        raise typer.BadParameter(
            "give either --id, or --service and --to", param_hint="--id / --service, --to"
        )
    if by_destination and (service is None or to is None):
        raise typer.BadParameter("--service and --to go together", param_hint="--service, --to")
    context_pairs = _pairs(context, "--context")

    def call(c: OtpgateClient) -> dict[str, Any]:
        if verification is not None:
            return c.check(verification, code, context=context_pairs)
        assert service is not None and to is not None  # checked above
        return c.check_destination(service, to, code, country=country, context=context_pairs)

    result = _client_call(ctx, as_json, call, _check_view)
    if result.get("valid") is not True:
        raise typer.Exit(ExitCode.NOT_VALID)


@verify_app.command("status")
def verify_status(
    ctx: typer.Context, verification: VerificationId, as_json: JsonFlag = False
) -> None:
    """Show a verification and its messages."""
    _client_call(ctx, as_json, lambda c: c.get_verification(verification), _verification_view)


@verify_app.command("resend")
def verify_resend(
    ctx: typer.Context,
    verification: VerificationId,
    channel: Channel = None,
    idempotency_key: IdempotencyKey = None,
    as_json: JsonFlag = False,
) -> None:
    """Send a pending verification's code again."""
    _client_call(
        ctx,
        as_json,
        lambda c: c.resend_verification(
            verification, channel=channel, idempotency_key=idempotency_key
        ),
        _verification_view,
    )


@verify_app.command("cancel")
def verify_cancel(
    ctx: typer.Context, verification: VerificationId, as_json: JsonFlag = False
) -> None:
    """Cancel a pending verification (a closed one is shown unchanged)."""
    _client_call(ctx, as_json, lambda c: c.cancel_verification(verification), _verification_view)


@verify_app.command("list")
def verify_list(
    ctx: typer.Context,
    service: Annotated[str | None, typer.Option(help="Only this service's.")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            help="Only this status: pending, approved, expired, canceled, "
            "max_attempts_reached or failed."
        ),
    ] = None,
    to: Annotated[str | None, typer.Option(help="Only this destination.")] = None,
    limit: LimitOption = 50,
    cursor: CursorOption = None,
    as_json: JsonFlag = False,
) -> None:
    """List verifications, newest first, one page at a time."""
    _client_call(
        ctx,
        as_json,
        lambda c: c.list_verifications(
            service_id=service, status=status, to=to, limit=limit, cursor=cursor
        ),
        lambda page: _table("verifications", page, _VERIFICATION_COLUMNS),
    )
