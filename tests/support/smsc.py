"""Runs the test SMSC (``tests/node/smsc.mjs``, on node-smpp's server side) on a free loopback
port, collects the PDUs it records and passes it control commands.

node-smpp is installed from ``tests/node/package-lock.json`` by ``make install-node`` (which
``make test`` runs) or ``npm ci --prefix tests/node``. :func:`smsc_missing` says why it cannot
run, for a test to skip on (a machine without npm) or fail on (CI, where it must be installed),
as with LabsMobile's Node client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
SCRIPT = NODE_DIR / "smsc.mjs"
LIBRARY = NODE_DIR / "node_modules" / "smpp" / "lib" / "smpp.js"

Record = dict[str, Any]


def smsc_missing() -> str | None:
    """Why the test SMSC cannot run here, or ``None`` when it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not LIBRARY.is_file():
        return "node-smpp is not installed: run `make install-node` (needs npm)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Smsc:
    """The node SMSC as a context manager: ``url`` is an ``smpp://`` URL with its credentials,
    ``records`` every PDU it received (``{"command": "submit_sm", "data_coding": 8, ...}``)."""

    def __init__(
        self,
        *,
        system_id: str = "otpgate",
        password: str = "s3cr3t",  # noqa: S107 - the test SMSC's own
        receipt_delay_ms: int = 20,
        port: int | None = None,
        quiet: bool = False,
    ) -> None:
        self.system_id = system_id
        self.password = password
        self.port = port or free_port()
        self._receipt_delay_ms = receipt_delay_ms
        self._quiet = quiet
        #: submit_sm answered ESME_ROK, as of the last acknowledged command
        self.accepted_count = 0
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Condition()
        self._records: list[Record] = []
        self._acks: set[int] = set()
        self._command_id = 0
        self._ready = False
        self.errors: list[str] = []

    def url(self, query: str = "", *, password: str | None = None) -> str:
        secret = self.password if password is None else password
        suffix = f"?{query}" if query else ""
        return f"smpp://{self.system_id}:{secret}@127.0.0.1:{self.port}{suffix}"

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> Smsc:
        reason = smsc_missing()
        if reason is not None:
            raise RuntimeError(reason)
        self._process = subprocess.Popen(
            [
                "node",
                str(SCRIPT),
                "--port",
                str(self.port),
                "--system-id",
                self.system_id,
                "--password",
                self.password,
                "--receipt-delay-ms",
                str(self._receipt_delay_ms),
                *(["--quiet"] if self._quiet else []),
            ],
            cwd=NODE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        self._reader = threading.Thread(target=self._read, name="smsc-reader", daemon=True)
        self._reader.start()
        with self._lock:
            if not self._lock.wait_for(lambda: self._ready or self._ended(), timeout=15):
                self.stop()
                raise RuntimeError("the node SMSC did not start within 15 s")
            if not self._ready:
                raise RuntimeError(f"the node SMSC ended: {self.errors}")
        return self

    def stop(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if process.stdout is not None:
            process.stdout.close()

    def __enter__(self) -> Smsc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _ended(self) -> bool:
        return self._process is None or self._process.poll() is not None

    def _read(self) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                event = record.get("event")
                if event == "ready":
                    self._ready = True
                elif event == "ack":
                    self._acks.add(int(record["id"]))
                    self.accepted_count = int(record.get("accepted", 0))
                elif event == "error":
                    self.errors.append(str(record.get("message")))
                elif event == "pdu":
                    self._records.append(record)
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    # -- control -----------------------------------------------------------------------------

    def command(self, cmd: str, **arguments: Any) -> None:
        """Send a control command and wait until the SMSC applied it."""
        process = self._process
        assert process is not None and process.stdin is not None
        with self._lock:
            self._command_id += 1
            command_id = self._command_id
        process.stdin.write(json.dumps({"id": command_id, "cmd": cmd, **arguments}) + "\n")
        process.stdin.flush()
        with self._lock:
            if not self._lock.wait_for(lambda: command_id in self._acks, timeout=10):
                raise TimeoutError(f"the node SMSC did not apply {cmd!r}")

    def throttle(self, count: int) -> None:
        """Answer the next ``count`` submit_sm with ESME_RTHROTTLED."""
        self.command("throttle", count=count)

    def refuse(self, count: int, status: int) -> None:
        """Answer the next ``count`` submit_sm with ``status``."""
        self.command("status", count=count, status=status)

    def silence(self, count: int) -> None:
        """Leave the next ``count`` submit_sm unanswered."""
        self.command("silence", count=count)

    def drop(self) -> None:
        """Close every open connection, without an unbind."""
        self.command("drop")

    def receipts(self, **settings: Any) -> None:
        """``enabled``, ``stat``, ``err``, ``tlvs``, ``delay_ms`` of the receipts sent."""
        self.command("receipts", **settings)

    def sync(self) -> None:
        """Return once every record the SMSC wrote before now has been read."""
        self.command("ping")

    def accepted(self) -> list[Record]:
        """The submit_sm answered ESME_ROK, in order (after a :meth:`sync`)."""
        self.sync()
        return [r for r in self.submits() if r["resp_status"] == 0]

    def refuse_binds(self, enabled: bool = True) -> None:
        self.command("refuse_binds", enabled=enabled)

    # -- observation -------------------------------------------------------------------------

    def records(self, command: str | None = None) -> list[Record]:
        with self._lock:
            return [r for r in self._records if command is None or r["command"] == command]

    def submits(self) -> list[Record]:
        return self.records("submit_sm")

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def wait_for(
        self, predicate: Callable[[list[Record]], bool], *, timeout: float = 10.0
    ) -> list[Record]:
        """Block until ``predicate(records)`` holds; the records then."""
        with self._lock:
            if not self._lock.wait_for(lambda: predicate(self._records), timeout=timeout):
                raise TimeoutError(f"the SMSC records never matched: {self._records[-5:]}")
            return list(self._records)

    def wait_for_count(self, command: str, count: int, *, timeout: float = 10.0) -> list[Record]:
        self.wait_for(
            lambda records: sum(r["command"] == command for r in records) >= count,
            timeout=timeout,
        )
        return self.records(command)

    async def wait_for_count_async(
        self, command: str, count: int, *, within: float = 10.0
    ) -> list[Record]:
        deadline = time.monotonic() + within
        while True:
            found = self.records(command)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:  # the SMSC never got them
                raise TimeoutError(f"{len(found)} of {count} {command} PDUs")
            await asyncio.sleep(0.01)
