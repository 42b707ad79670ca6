"""``otpgate serve`` in its own process on a loopback port, as a user runs it.

The server prints the admin key of a fresh database once, on standard error; :func:`serve`
reads it from there. Stopping sends SIGTERM and reports how the process ended, so a test can
assert a clean shutdown.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

OTPGATE = str(Path(sys.executable).with_name("otpgate"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class RunningServer:
    url: str
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    stderr_path: Path
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, *, grace_seconds: float = 15.0) -> int | None:
        """SIGTERM and wait; the exit code, or None when it had to be killed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def wait_until(condition: object, *, timeout: float, what: str, every: float = 0.05) -> None:
    """Poll ``condition()`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@contextmanager
def serve(tmp_path: Path, settings: dict[str, str]) -> Iterator[RunningServer]:
    """Start ``otpgate serve`` with ``settings`` (``OTPGATE_*`` variables) and a fresh data
    directory unless the settings name one; stop it (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "OTPGATE_DATA_DIR": str(tmp_path / "var"),
        "OTPGATE_PUBLIC_URL": url,
        **settings,
    }
    stderr_path = tmp_path / f"server-{port}.log"
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [OTPGATE, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=err,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    server = RunningServer(url, env, process, stderr_path, key="")
    try:

        def healthy() -> bool:
            assert process.poll() is None, server.log()
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=60, what="/healthz")
        found = re.search(r"otpgate_[A-Za-z0-9_-]{43}", server.log())
        assert found, "no admin key in the first-start banner"
        server.key = found.group(0)
        yield server
    finally:
        server.stop()
