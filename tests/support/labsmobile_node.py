"""Runs LabsMobile's own Node client (npm ``labsmobile-sms``) through ``tests/node/drive.mjs``
against any LabsMobile-compatible base URL, and returns what it printed.

The client is installed from ``tests/node/package-lock.json`` by ``make install-node`` (which
``make test`` runs first) or ``npm ci --prefix tests/node``. :func:`node_client_missing` says
why it cannot run, for a test to skip on (a developer's machine) or fail on (CI).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

NODE_DIR = Path(__file__).resolve().parent.parent / "node"
DRIVER = NODE_DIR / "drive.mjs"
CLIENT_SOURCE = NODE_DIR / "node_modules" / "labsmobile-sms" / "src" / "LabsMobileClient.js"
DEFAULT_NUMBERS = ("34600000001", "34600000002")


def node_client_missing() -> str | None:
    """Why the Node client cannot run here, or ``None`` when it can."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not CLIENT_SOURCE.is_file():
        return "LabsMobile's Node client is not installed: run `make install-node`"
    return None


@dataclass(frozen=True, slots=True)
class NodeRun:
    """What one run of the driver printed: one result per call, by call name."""

    results: dict[str, dict[str, Any]]
    returncode: int
    stderr: str

    def answer(self, call: str) -> Any:
        """The answer of a call that succeeded (the assertion shows the error otherwise)."""
        result = self.results[call]
        assert result["ok"], f"{call} failed: {result['error']}\n{self.stderr}"
        return result["answer"]


def run_node_client(
    base_url: str,
    *,
    username: str,
    token: str,
    numbers: Sequence[str] = DEFAULT_NUMBERS,
    timeout_seconds: float = 60.0,
) -> NodeRun:
    """Run the driver against ``base_url`` (the client's ``_urlBase``): send to two numbers,
    read the balance, read the prices of ES and FR, send in test mode."""
    reason = node_client_missing()
    if reason is not None:
        raise RuntimeError(reason)
    host = urlsplit(base_url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"tests only reach loopback servers, not {host!r}")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LABSMOBILE_URL": base_url,
        "LABSMOBILE_USERNAME": username,
        "LABSMOBILE_TOKEN": token,
        "LABSMOBILE_NUMBERS": ",".join(numbers),
        # axios would send loopback requests through a proxy named in the environment.
        "NO_PROXY": "127.0.0.1,localhost,::1",
    }
    completed = subprocess.run(
        ["node", str(DRIVER)],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_seconds,
        check=False,
    )
    results: dict[str, dict[str, Any]] = {}
    for line in completed.stdout.splitlines():
        result = json.loads(line)
        results[result["call"]] = result
    if completed.returncode == 2 or not results:
        raise RuntimeError(f"drive.mjs did not run: {completed.stderr.strip()}")
    return NodeRun(results=results, returncode=completed.returncode, stderr=completed.stderr)
