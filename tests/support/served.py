"""``otpgate serve`` in a process of its own on loopback, on a fresh SQLite database, with the
admin key it prints on its first start: the server as a user runs it, for tests that need a
real socket."""

from __future__ import annotations

import os
import re
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
class Served:
    url: str
    port: int
    key: str
    stderr_path: Path
    pid: int

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[Served]:
    """Start the server, wait for ``/healthz``, yield it, and stop it with SIGTERM."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "OTPGATE_DATA_DIR": str(tmp_path / "var"),
        "OTPGATE_PUBLIC_URL": url,
        **env,
    }
    stderr_path = tmp_path / "stderr.log"
    with (tmp_path / "stdout.log").open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [OTPGATE, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=environment,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, "server did not answer /healthz"
            time.sleep(0.1)
        key = re.search(r"otpgate_[A-Za-z0-9_-]{43}", stderr_path.read_text())
        assert key, stderr_path.read_text()
        yield Served(url, port, key.group(0), stderr_path, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
