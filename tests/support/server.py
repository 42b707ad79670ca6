"""``otpgate serve`` as a user runs it: its own process on SQLite, on a free loopback port,
sending through the LabsMobile provider to a loopback stub, with the CLI at hand.

Usage::

    with LabsMobileStub(...) as stub, running_server(stub, tmp_path) as server:
        server.cli("services", "list", "--json")      # stdout; fails unless the exit status is 0
        done = server.run("verify", "check", ...)     # the whole CompletedProcess
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.labsmobile_stub import LabsMobileStub

#: The ``otpgate`` command installed next to the interpreter running the tests.
OTPGATE = str(Path(sys.executable).with_name("otpgate"))
KEY_PATTERN = re.compile(r"otpgate_[A-Za-z0-9_-]{43}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_otpgate(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ``otpgate`` command with exactly ``env`` and capture its output as text."""
    return subprocess.run(
        [OTPGATE, *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class Server:
    url: str
    env: dict[str, str]
    data_dir: Path
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    key: str
    username: str
    service_id: str

    def output(self) -> bytes:
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def log(self) -> str:
        return self.output().decode(errors="replace")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_bytes(self) -> int:
        """The server process's resident memory (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self, *, grace_seconds: float = 15.0) -> int | None:
        """SIGTERM and wait: the exit status, or None when it had to be killed after
        ``grace_seconds``."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None

    @property
    def client_env(self) -> dict[str, str]:
        """The server's environment plus what the client commands read."""
        return {**self.env, "OTPGATE_URL": self.url, "OTPGATE_API_KEY": self.key}

    def run(
        self, *args: str, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``otpgate`` with the server's settings (and the admin key for the client
        commands) plus ``extra_env``, whatever its exit status."""
        return run_otpgate(*args, env={**self.client_env, **(extra_env or {})})

    def cli(self, *args: str, extra_env: Mapping[str, str] | None = None) -> str:
        """Standard output of a command that must succeed."""
        done = self.run(*args, extra_env=extra_env)
        assert done.returncode == 0, done.stderr
        return done.stdout


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, stderr_path.read_text()
        assert time.monotonic() < deadline, "server did not answer /healthz"
        time.sleep(0.05)  # between connection attempts to a port not listening yet


@contextmanager
def running_server(
    stub: LabsMobileStub | None,
    directory: Path,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Start ``otpgate serve`` with its data in ``directory/var``, sending through the
    LabsMobile provider to ``stub`` (or the console sender without one), wait until it answers,
    create a service ``Acme`` with the admin key from the first-start banner, and stop it at
    the end."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = directory / "var"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(directory),
        "OTPGATE_DATA_DIR": str(data_dir),
        **(
            {}
            if stub is None
            else {
                "OTPGATE_SMS_PROVIDER": "labsmobile",
                "OTPGATE_LABSMOBILE_URL": stub.url,
                "OTPGATE_LABSMOBILE_USERNAME": stub.username,
                "OTPGATE_LABSMOBILE_TOKEN": stub.token,
            }
        ),
        "OTPGATE_PUBLIC_URL": url,
        "OTPGATE_LOG_LEVEL": "DEBUG",
        **(extra_env or {}),
    }
    stdout_path, stderr_path = directory / "stdout.log", directory / "stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(
            [OTPGATE, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        _wait_until_healthy(url, process, stderr_path)
        banner = stderr_path.read_text()
        key = KEY_PATTERN.search(banner)
        assert key, banner
        auth = {"Authorization": f"Bearer {key.group(0)}"}
        account = httpx.get(f"{url}/v1/account", headers=auth).json()
        service = httpx.post(f"{url}/v1/services", json={"name": "Acme"}, headers=auth).json()
        yield Server(
            url,
            env,
            data_dir,
            process,
            stdout_path,
            stderr_path,
            key.group(0),
            account["username"],
            service["id"],
        )
    finally:
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
