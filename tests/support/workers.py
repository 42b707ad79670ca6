"""``otpgate worker`` as an operator runs it: a process of its own, with its log in a file the
test reads (one JSON object a line).

Usage::

    worker = WorkerProcess.start(env, tmp_path / "w1.log")
    worker.wait_started()
    ...
    assert worker.terminate() == 0       # SIGTERM, then the exit status
    worker.sent_ids()                    # ids of the messages it logged as sent
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.server import OTPGATE, wait_until


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, env: Mapping[str, str], log_path: Path) -> WorkerProcess:
        """Start ``otpgate worker`` with exactly ``env``; stdout and stderr go to ``log_path``."""
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [OTPGATE, "worker"], env=dict(env), stdout=log, stderr=subprocess.STDOUT
            )
        return cls(process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far (other lines, such as the banner, skipped)."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue  # a line being written
        return found

    def logged(self, msg: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("msg") == msg]

    def sent_ids(self) -> list[str]:
        """Ids of the messages this worker logged as accepted by the provider."""
        return [r["message_id"] for r in self.logged("message sent")]

    def wait_started(self, timeout: float = 60) -> dict[str, Any]:
        """Wait for the start line (the dispatcher runs by then) and return it."""

        def started() -> bool:
            assert self.process.poll() is None, f"worker exited early:\n{self.log()}"
            return bool(self.logged("worker started"))

        wait_until(started, timeout=timeout, what="the worker's start line")
        return self.logged("worker started")[0]

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.process.wait(timeout=timeout)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def ensure_stopped(self) -> None:
        """For ``finally`` blocks: stop it however it can be stopped."""
        if self.process.poll() is None:
            self.process.terminate()
            deadline = time.monotonic() + 30
            while self.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        self.kill()
