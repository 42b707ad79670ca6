"""Round-trip load benchmark: otpgate (embedded SQLite) against a bare FastAPI endpoint.

``make bench`` (or ``.venv/bin/python -m benchmarks.roundtrip [--duration S] [--levels 1,4]``):

1. starts a LabsMobile sink (``POST /json/send``) in this process, on 127.0.0.1;
2. creates an API key and a service with the ``otpgate`` CLI in a temporary data directory and
   starts ``otpgate serve`` on SQLite with the LabsMobile provider pointed at the sink;
3. drives complete round trips -- start a verification, wait for its SMS at the sink, check the
   code, expect ``approved`` -- at each concurrency level (warm-up, then a timed window);
4. measures a bare FastAPI + uvicorn JSON endpoint (``benchmarks.bare_app``) with the same
   client at the same levels;
5. prints a table and the headline ratio ``round trips/s / (bare requests/s / 2)`` and writes
   everything to ``benchmarks/results/latest.json``.

Every socket is on 127.0.0.1; every loop stops by itself (time window and request cap).
Both servers are stopped at the end (SIGTERM, then SIGKILL), also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.loadclient import LOOPBACK, Client, HttpError, RawClient, make_client
from benchmarks.sink import LabsMobileSink
from benchmarks.statements import BUSY_SERVICE_LIMITS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest.json"
BIN = Path(sys.executable).parent
SINK_USER = "bench@example.test"
SINK_TOKEN = "bench-token-not-a-secret"
TARGET_RATIO = 0.25
_PROXY_VARS = {"http_proxy", "https_proxy", "all_proxy", "ftp_proxy", "ws_proxy", "wss_proxy"}
_METRIC = re.compile(r"^otpgate_http_request_seconds_(sum|count)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')

Op = Callable[[], Awaitable[tuple[float, ...]]]
Snapshot = Callable[[], Awaitable[dict[str, Any]]]


class OpFailed(Exception):
    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.detail = detail


@dataclass
class Failures:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.examples.setdefault(kind, detail[:600])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_kind": dict(self.counts), "examples": self.examples}


@dataclass
class LevelRun:
    concurrency: int
    duration: float
    samples: list[tuple[float, ...]]
    failures: Failures
    warmup_failures: Failures
    before: dict[str, Any]
    after: dict[str, Any]
    started_ops: int


# --- measurement ---------------------------------------------------------------------------


async def run_level(
    op: Op, *, concurrency: int, warmup: float, duration: float, max_ops: int, snapshot: Snapshot
) -> LevelRun:
    """``concurrency`` closed-loop workers run ``op`` for ``warmup + duration`` seconds; only
    operations that complete inside the timed window count. No worker starts an operation
    after the window or beyond ``max_ops``, so the level ends by itself."""
    now = time.perf_counter
    start = now()
    window_from = start + warmup
    window_to = window_from + duration
    samples: list[tuple[float, ...]] = []
    failures = Failures()
    warmup_failures = Failures()
    started = 0

    async def worker() -> None:
        nonlocal started
        while started < max_ops and now() < window_to:
            started += 1
            error: tuple[str, str] | None = None
            parts: tuple[float, ...] = ()
            try:
                parts = await op()
            except OpFailed as exc:
                error = (exc.kind, exc.detail)
            except Exception as exc:
                error = (f"client: {type(exc).__name__}", repr(exc))
            done = now()
            if done < window_from:
                if error is not None:
                    warmup_failures.add(*error)
            elif done <= window_to:
                if error is None:
                    samples.append(parts)
                else:
                    failures.add(*error)

    async def snap_at(moment: float) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, moment - now()))
        return await snapshot()

    before_task = asyncio.create_task(snap_at(window_from))
    after_task = asyncio.create_task(snap_at(window_to))
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    before, after = await before_task, await after_task
    return LevelRun(
        concurrency, duration, samples, failures, warmup_failures, before, after, started
    )


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``nan`` for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def latency(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50) * 1000, 2),
        "p99": round(percentile(values, 99) * 1000, 2),
    }


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_request_metrics(text: str) -> dict[str, list[float]]:
    """``{"POST /v1/verifications 2xx": [sum_seconds, count]}`` from otpgate's /metrics."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _METRIC.match(line)
        if match is None:
            continue
        kind, labels, value = match.groups()
        lab = dict(_LABEL.findall(labels))
        key = f"{lab.get('method')} {lab.get('route')} {lab.get('status')}"
        out.setdefault(key, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return out


def make_snapshot(pid: int, metrics_port: int | None) -> Snapshot:
    """CPU counters of the server and this process, and (for otpgate) its request-latency
    histogram, read over a fresh connection each time (a kept-alive one would be closed by
    uvicorn's keep-alive timeout between the two snapshots of a level)."""

    async def snapshot() -> dict[str, Any]:
        taken: dict[str, Any] = {
            "wall": time.perf_counter(),
            "client_cpu": time.process_time(),
            "server_cpu": proc_cpu_seconds(pid),
        }
        if metrics_port is not None:
            client = RawClient(metrics_port, timeout=5.0)
            try:
                status, body = await client.get("/metrics")
                if status == 200:
                    taken["metrics"] = parse_request_metrics(body.decode())
                else:
                    taken["metrics_error"] = f"HTTP {status}"
            except (OSError, TimeoutError, HttpError) as exc:
                taken["metrics_error"] = repr(exc)
            finally:
                await client.aclose()
        return taken

    return snapshot


def cpu_and_routes(run: LevelRun) -> dict[str, Any]:
    before, after = run.before, run.after
    wall = after["wall"] - before["wall"]
    out: dict[str, Any] = {
        "server_cpu_pct": round(100 * (after["server_cpu"] - before["server_cpu"]) / wall, 1),
        "client_cpu_pct": round(100 * (after["client_cpu"] - before["client_cpu"]) / wall, 1),
    }
    for snap in (before, after):
        if "metrics_error" in snap:
            out.setdefault("metrics_errors", []).append(snap["metrics_error"])
    if "metrics" in before and "metrics" in after:
        routes: dict[str, Any] = {}
        for key, (total, count) in after["metrics"].items():
            total0, count0 = before["metrics"].get(key, [0.0, 0.0])
            if count - count0 > 0 and not key.startswith("GET /metrics"):
                routes[key] = {
                    "count": int(count - count0),
                    "mean_ms": round(1000 * (total - total0) / (count - count0), 2),
                }
        out["server_time_by_route"] = routes
    return out


# --- operations ----------------------------------------------------------------------------


def _error_code(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    return str(doc.get("code", "")) if isinstance(doc, dict) else ""


def roundtrip_op(
    client: Client,
    sink: LabsMobileSink,
    *,
    service_id: str,
    auth: bytes,
    numbers: Iterator[int],
    sms_timeout: float,
) -> Op:
    """One complete verification: start → SMS at the sink → check → approved.

    Returns ``(round trip, start, sms, check)`` seconds; ``sms`` runs from sending the start
    request to the SMS reaching the sink (it can arrive before the start answer)."""

    async def op() -> tuple[float, ...]:
        to = f"+3460{next(numbers) % 10_000_000:07d}"
        msisdn = to[1:]
        sms = sink.expect(msisdn)
        body = json.dumps({"service_id": service_id, "to": to}).encode()
        try:
            t0 = time.perf_counter()
            try:
                status, answer = await client.post("/v1/verifications", body, auth)
            except (OSError, TimeoutError, HttpError) as exc:
                raise OpFailed(f"start: {type(exc).__name__}", repr(exc)) from exc
            t1 = time.perf_counter()
            if status != 201:
                raise OpFailed(
                    f"start: HTTP {status} {_error_code(answer)}".rstrip(),
                    answer.decode(errors="replace"),
                )
            verification_id = json.loads(answer)["id"]
            try:
                code, arrived = await asyncio.wait_for(sms, sms_timeout)
            except TimeoutError:
                raise OpFailed(
                    "sms: none at the sink within the timeout",
                    f"to={to} verification={verification_id}",
                ) from None
            except LookupError as exc:
                raise OpFailed("sms: no code in the text", str(exc)) from None
            t2 = time.perf_counter()
            check = json.dumps({"code": code}).encode()
            try:
                status, answer = await client.post(
                    f"/v1/verifications/{verification_id}/check", check, auth
                )
            except (OSError, TimeoutError, HttpError) as exc:
                raise OpFailed(f"check: {type(exc).__name__}", repr(exc)) from exc
            t3 = time.perf_counter()
            if status != 200:
                raise OpFailed(
                    f"check: HTTP {status} {_error_code(answer)}".rstrip(),
                    answer.decode(errors="replace"),
                )
            result = json.loads(answer)
            if result.get("status") != "approved" or result.get("valid") is not True:
                raise OpFailed(
                    f"check: status={result.get('status')} valid={result.get('valid')}",
                    answer.decode(errors="replace"),
                )
            return (t3 - t0, t1 - t0, arrived - t0, t3 - t2)
        finally:
            sink.forget(msisdn)

    return op


def bare_op(client: Client, *, service_id: str, auth: bytes, numbers: Iterator[int]) -> Op:
    """One ``POST /echo`` with a body shaped like a verification start."""

    async def op() -> tuple[float, ...]:
        to = f"+3460{next(numbers) % 10_000_000:07d}"
        body = json.dumps({"service_id": service_id, "to": to}).encode()
        t0 = time.perf_counter()
        try:
            status, answer = await client.post("/echo", body, auth)
        except (OSError, TimeoutError, HttpError) as exc:
            raise OpFailed(f"echo: {type(exc).__name__}", repr(exc)) from exc
        t1 = time.perf_counter()
        if status != 200:
            raise OpFailed(f"echo: HTTP {status}", answer.decode(errors="replace"))
        json.loads(answer)
        return (t1 - t0,)

    return op


# --- processes -----------------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without proxies (every request must stay on loopback) and without any
    inherited OTPGATE_* setting, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTPGATE_") and k.lower() not in _PROXY_VARS
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def tool(name: str) -> str:
    candidate = BIN / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable}; run make install-dev")
    return found


async def cli_json(cmd: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    lines = (await cli_run(cmd, env, cwd)).strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(cmd)} printed nothing on stdout")
    document: dict[str, Any] = json.loads(lines[-1])
    return document


async def cli_run(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    """Run an otpgate command to completion; its standard output."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"{' '.join(cmd[1:3])}: no answer within 120 s") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited with {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
        )
    return out.decode()


#: CPUs the servers under test are pinned to (``--pin``); None: wherever the kernel puts them.
SERVER_CPUS: set[int] | None = None


def launch(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    if SERVER_CPUS is not None:
        cmd = [tool("taskset"), "-c", ",".join(map(str, sorted(SERVER_CPUS))), *cmd]
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    _CHILDREN.append(proc)
    return proc


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def wait_ready(
    proc: subprocess.Popen[bytes], port: int, log: Path, limit: float = 60.0
) -> None:
    client = RawClient(port, timeout=1.0)
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode} before it was ready:\n{tail(log)}"
                )
            try:
                status, _ = await client.get("/healthz")
                if status == 200:
                    return
            except (OSError, TimeoutError, HttpError):
                pass
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()
    raise RuntimeError(f"server not ready on port {port} within {limit:.0f} s:\n{tail(log)}")


async def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int | None:
    """SIGTERM, wait up to ``grace`` seconds (without blocking the loop, so the sink can still
    answer sends in flight), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    code = proc.wait()
    with contextlib.suppress(ValueError):
        _CHILDREN.remove(proc)
    return code


def kill_leftovers() -> None:
    for proc in list(_CHILDREN):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _CHILDREN.remove(proc)


# --- targets -------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Target:
    """A server under test, up and ready: how to load it and where its results go."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    make_op: Callable[[Client], Op]
    snapshot: Snapshot
    summarize: Callable[[LevelRun], dict[str, Any]]
    result: dict[str, Any]
    unit: str


@contextlib.asynccontextmanager
async def otpgate_target(
    args: argparse.Namespace, work: Path, numbers: Iterator[int], result: dict[str, Any]
) -> AsyncIterator[Target]:
    """The LabsMobile sink, an API key and a service made with the CLI, and ``otpgate serve``
    on SQLite in a fresh data directory. Stopped (and its log collected) on exit."""
    data_dir = work / "otpgate-data"
    data_dir.mkdir()
    log = work / "otpgate.log"
    sink = LabsMobileSink(SINK_USER, SINK_TOKEN)
    sink_port = await sink.start()
    port = free_port()
    settings = {
        "OTPGATE_DATA_DIR": str(data_dir),
        "OTPGATE_SMS_PROVIDER": "labsmobile",
        "OTPGATE_LABSMOBILE_URL": f"http://{LOOPBACK}:{sink_port}",
        "OTPGATE_LABSMOBILE_USERNAME": SINK_USER,
        "OTPGATE_LABSMOBILE_TOKEN": SINK_TOKEN,
        "OTPGATE_PUBLIC_URL": f"http://{LOOPBACK}:{port}",
        "OTPGATE_LOG_LEVEL": "WARNING",
    }
    schema = None
    if args.database == "postgres":
        # A schema of its own on the given server, dropped at the end.
        schema = "otpgate_bench_" + os.urandom(4).hex()
        settings["OTPGATE_DATABASE_URL"] = args.postgres_url
        settings["OTPGATE_DATABASE_SCHEMA"] = schema
    env = clean_env(settings)
    otpgate = tool("otpgate")
    proc: subprocess.Popen[bytes] | None = None
    try:
        if schema is not None:
            await cli_run([otpgate, "db", "upgrade"], env, work)
        key = await cli_json([otpgate, "keys", "create", "--name", "bench", "--json"], env, work)
        service = await cli_json(
            [otpgate, "services", "create", "--name", "Bench", "--max-send-attempts", "10",
             "--resend-interval-seconds", "0", "--json"],
            env, work,
        )  # fmt: skip
        auth = f"Authorization: Bearer {key['key']}\r\n".encode()
        proc = launch([otpgate, "serve", "--host", LOOPBACK, "--port", str(port)], env, work, log)
        await wait_ready(proc, port, log)
        # A load test is one very busy service: its rate limits are raised as such a service
        # would raise them (the limiter still runs and counts on every start).
        async with httpx.AsyncClient(base_url=f"http://{LOOPBACK}:{port}") as admin:
            raised = await admin.patch(
                f"/v1/services/{service['id']}",
                json={"rate_limits": BUSY_SERVICE_LIMITS},
                headers={"Authorization": f"Bearer {key['key']}"},
            )
            raised.raise_for_status()
        progress(f"otpgate ready on {LOOPBACK}:{port} (pid {proc.pid}); sink on {sink_port}")

        def make_op(client: Client) -> Op:
            return roundtrip_op(
                client, sink, service_id=service["id"], auth=auth, numbers=numbers,
                sms_timeout=args.sms_timeout,
            )  # fmt: skip

        yield Target(
            "otpgate", port, proc, make_op, make_snapshot(proc.pid, port),
            summarize_roundtrips, result, "rt/s",
        )  # fmt: skip
    finally:
        if proc is not None:
            # -15 is normal: uvicorn re-raises SIGTERM after its graceful shutdown.
            result["exit_code"] = await stop(proc)
        await sink.aclose()
        result["sink"] = dict(sink.stats)
        server_log = log.read_text(errors="replace") if log.exists() else ""
        result["server_log_lines"] = len(server_log.splitlines())
        result["server_log_tail"] = server_log.splitlines()[-40:]
        if schema is not None:
            await drop_schema(args.postgres_url, schema)


async def drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def bare_target(
    args: argparse.Namespace, work: Path, numbers: Iterator[int], result: dict[str, Any]
) -> AsyncIterator[Target]:
    """``benchmarks.bare_app`` under uvicorn, as otpgate is served. Stopped on exit."""
    log = work / "bare.log"
    port = free_port()
    proc: subprocess.Popen[bytes] | None = None
    auth = b"Authorization: Bearer bench-not-checked\r\n"
    try:
        proc = launch(
            [sys.executable, "-m", "benchmarks.bare_app", "--port", str(port)],
            clean_env({}), REPO, log,
        )  # fmt: skip
        await wait_ready(proc, port, log)
        progress(f"bare FastAPI ready on {LOOPBACK}:{port} (pid {proc.pid})")

        def make_op(client: Client) -> Op:
            return bare_op(client, service_id="svc_bare", auth=auth, numbers=numbers)

        yield Target(
            "bare", port, proc, make_op, make_snapshot(proc.pid, None), summarize_bare, result,
            "req/s",
        )  # fmt: skip
    finally:
        if proc is not None:
            result["exit_code"] = await stop(proc)
        result["server_log_tail"] = tail(log, 40).splitlines()


async def measure(target: Target, args: argparse.Namespace, concurrency: int) -> None:
    """One level on one target; its summary is appended to ``target.result["levels"]``."""
    client = make_client(
        args.client, target.port, concurrency=concurrency, timeout=args.request_timeout
    )
    try:
        run = await run_level(
            target.make_op(client), concurrency=concurrency, warmup=args.warmup,
            duration=args.duration, max_ops=args.max_ops, snapshot=target.snapshot,
        )  # fmt: skip
    finally:
        await client.aclose()
    level = target.summarize(run)
    target.result["levels"].append(level)
    rate = level.get("round_trips_per_s", level.get("requests_per_s"))
    progress(
        f"  {target.name:<8} c={concurrency:<4} {rate:8.1f} {target.unit:<6}"
        f" failures={level['failures']['total']}"
        f"  server cpu {level['cpu']['server_cpu_pct']}%"
        f"  client cpu {level['cpu']['client_cpu_pct']}%"
    )
    if target.proc.poll() is not None:
        raise RuntimeError(f"{target.name} exited with {target.proc.returncode} during the run")


def summarize_roundtrips(run: LevelRun) -> dict[str, Any]:
    columns = list(zip(*run.samples, strict=True)) if run.samples else [[], [], [], []]
    return {
        "concurrency": run.concurrency,
        "duration_s": run.duration,
        "round_trips": len(run.samples),
        "round_trips_per_s": round(len(run.samples) / run.duration, 1),
        "failures": run.failures.as_dict(),
        "warmup_failures": run.warmup_failures.as_dict(),
        "latency_ms": {
            "round_trip": latency(list(columns[0])),
            "start": latency(list(columns[1])),
            "sms": latency(list(columns[2])),
            "check": latency(list(columns[3])),
        },
        "cpu": cpu_and_routes(run),
    }


def summarize_bare(run: LevelRun) -> dict[str, Any]:
    values = [s[0] for s in run.samples]
    return {
        "concurrency": run.concurrency,
        "duration_s": run.duration,
        "requests": len(values),
        "requests_per_s": round(len(values) / run.duration, 1),
        "failures": run.failures.as_dict(),
        "warmup_failures": run.warmup_failures.as_dict(),
        "latency_ms": {"request": latency(values)},
        "cpu": cpu_and_routes(run),
    }


# --- report --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    from importlib.metadata import PackageNotFoundError, version

    for package in (
        "otpgate",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "pydantic",
        "sqlalchemy",
        "aiosqlite",
        "httpx",
    ):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    commit, src_dirty = "", None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=10,
        ).stdout.strip()
        # Read-only: were otpgate's sources edited since that commit when this ran?
        src_dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "src", "pyproject.toml"],
                cwd=REPO,
                text=True,
                capture_output=True,
                timeout=10,
            ).stdout.strip()
        )
    import sqlite3

    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
        "packages": versions,
        "git_commit": commit,
        "git_src_uncommitted_changes": src_dirty,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def combine(otp: dict[str, Any], bare: dict[str, Any]) -> dict[str, Any]:
    """Per-level ratios and the headline."""
    bare_by_c = {lvl["concurrency"]: lvl for lvl in bare.get("levels", [])}
    rows = []
    for lvl in otp.get("levels", []):
        b = bare_by_c.get(lvl["concurrency"])
        ratio = (
            lvl["round_trips_per_s"] / (b["requests_per_s"] / 2)
            if b and b["requests_per_s"]
            else None
        )
        rows.append(
            {"concurrency": lvl["concurrency"], "ratio": None if ratio is None else round(ratio, 3)}
        )
    headline: dict[str, Any] = {"target_ratio": TARGET_RATIO, "per_level": rows}
    if otp.get("levels"):
        best = max(otp["levels"], key=lambda lvl: lvl["round_trips_per_s"])
        headline["best_round_trips_per_s"] = best["round_trips_per_s"]
        headline["best_round_trips_concurrency"] = best["concurrency"]
    if bare.get("levels"):
        best_bare = max(bare["levels"], key=lambda lvl: lvl["requests_per_s"])
        headline["best_bare_requests_per_s"] = best_bare["requests_per_s"]
        headline["best_bare_concurrency"] = best_bare["concurrency"]
    if headline.get("best_round_trips_per_s") is not None and headline.get(
        "best_bare_requests_per_s"
    ):
        headline["ratio_of_bests"] = round(
            headline["best_round_trips_per_s"] / (headline["best_bare_requests_per_s"] / 2), 3
        )
        headline["meets_target"] = headline["ratio_of_bests"] >= TARGET_RATIO
    same_level = [r["ratio"] for r in rows if r["ratio"] is not None]
    if same_level:
        headline["best_same_level_ratio"] = max(same_level)
    return headline


def render_table(otp: dict[str, Any], bare: dict[str, Any], headline: dict[str, Any]) -> str:
    bare_by_c = {lvl["concurrency"]: lvl for lvl in bare.get("levels", [])}
    ratio_by_c = {r["concurrency"]: r["ratio"] for r in headline.get("per_level", [])}
    header = (
        f"{'conc':>4} | {'rt/s':>7} {'fail':>4} | {'start p50/p99':>13} | "
        f"{'sms p50/p99':>13} | {'check p50/p99':>13} | {'rt p50/p99':>13} | "
        f"{'srv/cli cpu%':>12} || {'bare req/s':>10} {'p50/p99':>11} "
        f"{'srv/cli cpu%':>12} || {'ratio':>5}"
    )
    lines = ["latencies in ms; ratio = rt/s / (bare req/s / 2)", header, "-" * len(header)]
    levels = sorted({*(lvl["concurrency"] for lvl in otp.get("levels", [])), *bare_by_c})
    otp_by_c = {lvl["concurrency"]: lvl for lvl in otp.get("levels", [])}

    def pair(d: dict[str, float]) -> str:
        return f"{_fmt(d['p50'])}/{_fmt(d['p99'])}"

    for c in levels:
        o, b = otp_by_c.get(c), bare_by_c.get(c)
        left = (
            f"{o['round_trips_per_s']:>7.1f} {o['failures']['total']:>4} | "
            f"{pair(o['latency_ms']['start']):>13} | {pair(o['latency_ms']['sms']):>13} | "
            f"{pair(o['latency_ms']['check']):>13} | "
            f"{pair(o['latency_ms']['round_trip']):>13} | "
            f"{_fmt(o['cpu']['server_cpu_pct'], 0):>5}/{_fmt(o['cpu']['client_cpu_pct'], 0):<6}"
            if o
            else f"{'-':>7} {'':>4} | {'':>13} | {'':>13} | {'':>13} | {'':>13} | {'':>12}"
        )
        right = (
            f"{b['requests_per_s']:>10.1f} {pair(b['latency_ms']['request']):>11} "
            f"{_fmt(b['cpu']['server_cpu_pct'], 0):>5}/{_fmt(b['cpu']['client_cpu_pct'], 0):<6}"
            if b
            else f"{'-':>10} {'':>11} {'':>12}"
        )
        ratio = ratio_by_c.get(c)
        lines.append(f"{c:>4} | {left} || {right} || {_fmt(ratio, 3):>5}")
    lines.append("")
    if "best_round_trips_per_s" in headline:
        lines.append(
            f"best otpgate: {headline['best_round_trips_per_s']:.1f} round trips/s "
            f"(concurrency {headline['best_round_trips_concurrency']})"
        )
    if "best_bare_requests_per_s" in headline:
        lines.append(
            f"best bare FastAPI: {headline['best_bare_requests_per_s']:.1f} requests/s "
            f"(concurrency {headline['best_bare_concurrency']})"
        )
    if "best_same_level_ratio" in headline:
        lines.append(f"best same-concurrency ratio: {headline['best_same_level_ratio']:.3f}")
    if "ratio_of_bests" in headline:
        verdict = "meets" if headline["meets_target"] else "MISSES"
        lines.append(
            f"ratio of bests: {headline['ratio_of_bests']:.3f} "
            f"({verdict} the target >= {TARGET_RATIO})"
        )
    return "\n".join(lines)


def report_problems(otp: dict[str, Any], bare: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name, target in (("otpgate", otp), ("bare", bare)):
        if "error" in target:
            problems.append(f"{name}: {target['error']}")
        for lvl in target.get("levels", []):
            for label in ("failures", "warmup_failures"):
                fails = lvl[label]
                if fails["total"]:
                    problems.append(f"{name} c={lvl['concurrency']} {label}: {fails['by_kind']}")
                    problems.extend(
                        f"    e.g. {kind}: {ex}" for kind, ex in fails["examples"].items()
                    )
    if otp.get("server_log_lines"):
        problems.append(
            f"otpgate wrote {otp['server_log_lines']} log line(s) at WARNING or above; last ones:"
        )
        problems.extend("    " + line[:400] for line in otp["server_log_tail"][-10:])
    return problems


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.roundtrip",
        description="Round trips against otpgate (SQLite, LabsMobile sink) vs a bare FastAPI "
        "endpoint, at rising concurrency. Loopback only.",
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="timed window per level, seconds (default 10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="warm-up before each window, seconds (default 3)"
    )
    parser.add_argument(
        "--levels",
        default="1,4,16,64",
        help="comma-separated concurrency levels (default 1,4,16,64)",
    )
    parser.add_argument(
        "--targets",
        default="otpgate,bare",
        help="which targets to run: otpgate, bare or both (default both)",
    )
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="otpgate's storage: the embedded SQLite (default) or PostgreSQL at --postgres-url",
    )
    parser.add_argument(
        "--postgres-url",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="PostgreSQL for --database postgres; a fresh schema is made and dropped "
        "(default postgresql://postgres@127.0.0.1:5432/test)",
    )
    parser.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="load client: raw HTTP/1.1 keep-alive (default) or httpx",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="client event loop (default uvloop when installed)",
    )
    parser.add_argument(
        "--pin",
        choices=("split", "none"),
        default="none",
        help="split: servers on the last CPU, client and sink on the others (needs taskset "
        "and 2+ CPUs); none: let the kernel place them (default)",
    )
    parser.add_argument(
        "--sms-timeout",
        type=float,
        default=15.0,
        help="seconds to wait for an SMS at the sink (default 15)",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=15.0, help="seconds per HTTP request (default 15)"
    )
    parser.add_argument(
        "--max-ops",
        type=int,
        default=500_000,
        help="hard cap on operations per level (default 500000)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help=f"JSON results (default {DEFAULT_OUTPUT.relative_to(REPO)})",
    )
    parser.add_argument(
        "--keep-data", action="store_true", help="keep the temporary data directory and server logs"
    )
    args = parser.parse_args(argv)
    try:
        args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    except ValueError:
        parser.error("--levels takes integers, e.g. 1,4,16,64")
    if not args.levels or any(c < 1 or c > 1024 for c in args.levels):
        parser.error("--levels must be between 1 and 1024")
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0 or args.warmup > 600:
        parser.error("--duration must be in (0, 3600] and --warmup in [0, 600]")
    args.targets = {t.strip() for t in args.targets.split(",") if t.strip()}
    if not args.targets or not args.targets <= {"otpgate", "bare"}:
        parser.error("--targets takes otpgate, bare or otpgate,bare")
    return args


async def amain(args: argparse.Namespace, loop_name: str) -> int:
    machine = machine_info()
    progress(
        f"{machine['cpu_model']}, {machine['nproc']} cores, Python {machine['python']}; "
        f"levels {args.levels}, warm-up {args.warmup:g} s + {args.duration:g} s each, "
        f"client {args.client} on {loop_name}"
    )
    numbers = itertools.count()
    work = Path(tempfile.mkdtemp(prefix="otpgate-bench-"))
    otp: dict[str, Any] = {"levels": []}
    bare: dict[str, Any] = {"levels": []}
    factories = {"otpgate": (otpgate_target, otp), "bare": (bare_target, bare)}
    try:
        async with contextlib.AsyncExitStack() as stack:
            targets: list[Target] = []
            for name in ("otpgate", "bare"):
                if name not in args.targets:
                    continue
                factory, result = factories[name]
                try:
                    targets.append(
                        await stack.enter_async_context(factory(args, work, numbers, result))
                    )
                except Exception as exc:
                    result["error"] = f"{type(exc).__name__}: {exc}"
                    progress(f"{name} could not start: {result['error']}")
            # Level by level, the targets back to back, so that a slow spell of a shared
            # machine hits both sides of a same-level ratio alike.
            for concurrency in args.levels:
                for target in targets:
                    if "error" in target.result:
                        continue
                    try:
                        await measure(target, args, concurrency)
                    except Exception as exc:
                        target.result["error"] = f"{type(exc).__name__}: {exc}"
                        progress(f"{target.name} error: {target.result['error']}")
    finally:
        if args.keep_data:
            progress(f"data and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    headline = combine(otp, bare)
    print()
    print(render_table(otp, bare, headline))
    problems = report_problems(otp, bare)
    if problems:
        print("\nproblems:")
        print("\n".join(problems))
    document = {
        "benchmark": "otpgate round trips vs bare FastAPI",
        "command": "python -m benchmarks.roundtrip " + " ".join(sys.argv[1:]),
        "machine": machine,
        "settings": {
            "levels": args.levels,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "client": args.client,
            "client_loop": loop_name,
            "sms_timeout_s": args.sms_timeout,
            "request_timeout_s": args.request_timeout,
            "database": (
                "sqlite (embedded default, WAL)"
                if args.database == "sqlite"
                else f"postgresql ({args.postgres_url})"
            ),
            "uvicorn_workers": 1,
            "pinning": args.pinning,
        },
        "headline": headline,
        "otpgate": otp,
        "bare": bare,
        "problems": problems,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.output.with_name(args.output.name + ".tmp")
    scratch.write_text(json.dumps(document, indent=2) + "\n")
    scratch.replace(args.output)
    print(f"\nresults written to {args.output}")
    if "error" in otp or "error" in bare:
        return 2
    failed = any(lvl["failures"]["total"] for t in (otp, bare) for lvl in t.get("levels", []))
    return 1 if failed else 0


def pin(mode: str) -> str:
    """Apply ``--pin``; returns what was done, for the report."""
    global SERVER_CPUS
    cpus = sorted(os.sched_getaffinity(0))
    if mode == "none":
        return "none"
    if len(cpus) < 2 or shutil.which("taskset") is None:
        progress("--pin split needs 2+ CPUs and taskset; running unpinned")
        return "none (split unavailable)"
    SERVER_CPUS = {cpus[-1]}
    os.sched_setaffinity(0, set(cpus[:-1]))
    return f"servers on CPU {cpus[-1]}, client and sink on CPU {','.join(map(str, cpus[:-1]))}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.pinning = pin(args.pin)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    loop_name = "asyncio"
    if args.loop == "uvloop":
        try:
            import uvloop

            loop_factory, loop_name = uvloop.new_event_loop, "uvloop"
        except ImportError:
            pass
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(amain(args, loop_name))
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        kill_leftovers()


if __name__ == "__main__":
    sys.exit(main())
