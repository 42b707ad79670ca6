"""The ``otpgate`` command (Typer + Rich).

Server-side commands (``serve``, ``worker``, ``db``, ``accounts``, ``keys``, ``services``) act
on the configured database directly; the ``verify`` commands are a client of a running server,
given by ``OTPGATE_URL`` and ``OTPGATE_API_KEY``. With ``--json`` a command's standard output
holds only the JSON document; everything else goes to standard error.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel

from otpgate.bootstrap import Container, build, prepare_database
from otpgate.client import OtpgateClient
from otpgate.entrypoints import logs
from otpgate.entrypoints.api.schemas import render_service
from otpgate.errors import OtpgateError
from otpgate.settings import Settings

app = typer.Typer(help="otpgate: self-hosted one-time-code verification.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
accounts_app = typer.Typer(help="Accounts.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
services_app = typer.Typer(
    help="Services (per-application verification policy).", no_args_is_help=True
)
verify_app = typer.Typer(
    help="Client commands against a running server (OTPGATE_URL, OTPGATE_API_KEY).",
    no_args_is_help=True,
)
lockouts_app = typer.Typer(
    help="Destination lockouts after repeated failures (S8).", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(accounts_app, name="accounts")
app.add_typer(keys_app, name="keys")
app.add_typer(services_app, name="services")
app.add_typer(verify_app, name="verify")
app.add_typer(lockouts_app, name="lockouts")

err = Console(stderr=True)
T = TypeVar("T")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print only a JSON document.")]


def _settings() -> Settings:
    try:
        return Settings()
    except ValueError as exc:
        err.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except OtpgateError as exc:
        err.print(f"[red]{exc.code}:[/red] {exc.detail}")
        raise typer.Exit(1) from exc


async def _with_container(action: Callable[[Container], Awaitable[T]]) -> T:
    settings = _settings()
    await prepare_database(settings)
    container = build(settings)
    try:
        return await action(container)
    finally:
        await container.aclose()


def _emit(document: dict[str, Any], as_json: bool, human: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(document) + "\n")
    else:
        err.print(human)


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
    container = build(settings)
    try:
        await _default_account(container, base=f"http://{host}:{port}")
    finally:
        await container.aclose()


async def _default_account(container: Container, *, base: str = "http://127.0.0.1:8000") -> Any:
    """The installation's admin account. When this call creates it (the very first use of the
    database, by ``serve`` or any admin command), its admin key is shown, once, on stderr."""
    account, issued = await container.access.ensure_default_account()
    if issued is None:
        return account
    auth = '-H "Authorization: Bearer $OTPGATE_API_KEY" -H "Content-Type: application/json"'
    err.print(
        Panel.fit(
            f"Created the default account [bold]{account.id}[/bold] and its admin API key.\n"
            "The key is shown [bold]once[/bold]; store it now:\n\n"
            f"  [bold green]{issued.secret}[/bold green]",
            title="otpgate: first start",
        )
    )
    # Outside the panel and unwrapped, so the lines paste as they are.
    err.print(
        "Try it:\n"
        f"  export OTPGATE_API_KEY={issued.secret}\n"
        f'  curl -s -X POST {base}/v1/services {auth} -d \'{{"name": "Acme"}}\'\n'
        f"  curl -s -X POST {base}/v1/verifications {auth} "
        '-d \'{"service_id": "svc_...", "to": "+34600000000"}\'\n',
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    return account


@app.command()
def worker() -> None:
    """Run the delivery worker alone (scale mode: API nodes with OTPGATE_EMBEDDED_WORKER=false)."""
    settings = _settings()
    logs.configure(settings.log_level, as_json=settings.log_json)

    async def main() -> None:
        await prepare_database(settings)
        container = build(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        container.dispatcher.start()
        err.print("otpgate worker running; Ctrl-C stops it")
        try:
            await stop.wait()
        finally:
            await container.aclose()

    _run(main())


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration to OTPGATE_DATABASE_URL."""
    from otpgate.adapters.storage.migrate import upgrade

    settings = _settings()
    _run(upgrade(settings.effective_database_url, schema=settings.database_schema))
    err.print("database is up to date")


# --- accounts, keys, services ----------------------------------------------------------------


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Option(help="Account name.")],
    username: Annotated[str | None, typer.Option(help="Login (e-mail); default: the id.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an account."""
    account = _run(_with_container(lambda c: c.access.create_account(name, username=username)))
    _emit(
        {"id": account.id, "name": account.name, "username": account.username},
        as_json,
        f"created account [bold]{account.id}[/bold] ({account.username})",
    )


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    account: Annotated[
        str | None, typer.Option(help="Account id; default: the default account.")
    ] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create an API key; it is shown once."""

    async def action(c: Container) -> Any:
        account_id = account or (await _default_account(c)).id
        return await c.access.create_key(account_id, name=name)

    issued = _run(_with_container(action))
    _emit(
        {"id": issued.key.id, "key": issued.secret, "account_id": issued.key.account_id},
        as_json,
        f"key [bold]{issued.key.id}[/bold] for {issued.key.account_id} "
        f"(shown once):\n{issued.secret}",
    )


@services_app.command("create")
def services_create(
    name: Annotated[str, typer.Option(help="Brand shown in messages.")],
    account: Annotated[
        str | None, typer.Option(help="Account id; default: the default account.")
    ] = None,
    code_length: Annotated[int | None, typer.Option(help="4-10 (default 6).")] = None,
    code_type: Annotated[str | None, typer.Option(help="numeric | alphanumeric.")] = None,
    ttl_seconds: Annotated[int | None, typer.Option(help="Validity, 60-86400.")] = None,
    max_check_attempts: Annotated[int | None, typer.Option(help="1-20.")] = None,
    max_send_attempts: Annotated[int | None, typer.Option(help="1-10.")] = None,
    resend_interval_seconds: Annotated[int | None, typer.Option(help="0-3600.")] = None,
    allowed_country: Annotated[
        list[str] | None,
        typer.Option(help="Allowed destination country (repeatable); default: all."),
    ] = None,
    sender_id: Annotated[str | None, typer.Option(help="SMS sender.")] = None,
    default_locale: Annotated[str | None, typer.Option(help="e.g. en, es.")] = None,
    webotp_domain: Annotated[str | None, typer.Option(help="Host for the WebOTP line.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a service."""
    fields: dict[str, Any] = {"name": name}
    for key, value in {
        "code_length": code_length,
        "code_type": code_type,
        "ttl_seconds": ttl_seconds,
        "max_check_attempts": max_check_attempts,
        "max_send_attempts": max_send_attempts,
        "resend_interval_seconds": resend_interval_seconds,
        "allowed_countries": allowed_country or None,
        "sender_id": sender_id,
        "default_locale": default_locale,
        "webotp_domain": webotp_domain,
    }.items():
        if value is not None:
            fields[key] = value

    async def action(c: Container) -> Any:
        from otpgate.domain.model import Principal

        owner = await c.access.get_account(account) if account else await _default_account(c)
        return await c.catalog.create(Principal(account=owner, key_id="cli"), fields)

    service = _run(_with_container(action))
    _emit(render_service(service), as_json, f"created service [bold]{service.id}[/bold]")


@lockouts_app.command("clear")
def lockouts_clear(
    service: Annotated[str, typer.Option(help="Service id.")],
    to: Annotated[str, typer.Option(help="Destination in E.164.")],
) -> None:
    """Lift a destination's lockout and reset its failure count."""
    from otpgate.domain.phone import parse_phone

    try:
        e164 = parse_phone(to).e164
    except OtpgateError as exc:
        err.print(f"[red]{exc.code}:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    _run(_with_container(lambda c: c.storage.reset_destination_failures(service, e164)))
    err.print("lockout cleared")


# --- client ----------------------------------------------------------------------------------


@verify_app.callback()
def verify_options(
    ctx: typer.Context,
    url: Annotated[str, typer.Option(envvar="OTPGATE_URL", help="Server base URL.")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str, typer.Option(envvar="OTPGATE_API_KEY", help="API key.", show_default=False)
    ] = "",
) -> None:
    ctx.obj = (url, api_key)


def _client_call(ctx: typer.Context, call: Callable[[OtpgateClient], dict[str, Any]]) -> None:
    url, api_key = ctx.obj
    if not api_key:
        err.print("[red]set OTPGATE_API_KEY[/red] (and OTPGATE_URL if not the default)")
        raise typer.Exit(2)
    with OtpgateClient(url, api_key=api_key) as client:
        try:
            document = call(client)
        except OtpgateError as exc:
            err.print(f"[red]{exc.code}:[/red] {exc.detail}")
            raise typer.Exit(1) from exc
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


@verify_app.command("start")
def verify_start(
    ctx: typer.Context,
    service: Annotated[str, typer.Option(help="Service id.")],
    to: Annotated[str, typer.Option(help="Destination (E.164).")],
    channel: Annotated[str | None, typer.Option()] = None,
    locale: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Start a verification (or resend the pending one's code)."""
    _client_call(ctx, lambda c: c.start_verification(service, to, channel=channel, locale=locale))


@verify_app.command("check")
def verify_check(
    ctx: typer.Context,
    verification: Annotated[str, typer.Option("--id", help="Verification id.")],
    code: Annotated[str, typer.Option(help="The code the user typed.")],
) -> None:
    """Check a code."""
    _client_call(ctx, lambda c: c.check(verification, code))


@verify_app.command("status")
def verify_status(
    ctx: typer.Context,
    verification: Annotated[str, typer.Option("--id", help="Verification id.")],
) -> None:
    """Show a verification."""
    _client_call(ctx, lambda c: c.get_verification(verification))
