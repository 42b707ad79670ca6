"""Real Kannel (Debian's ``kannel`` and ``kannel-extras``) for the tests, in a network namespace
of its own that has only a loopback interface.

Kannel's fake SMSC and its boxes listen on every interface, so nothing of Kannel may run in the
machine's own network namespace. :class:`NetNamespace` makes a fresh one (``unshare --net``,
loopback up, nothing else) and offers two ways in, neither of which listens on or sends to any
address but loopback:

* processes started with :meth:`NetNamespace.popen` (``nsenter --net``) live inside it: that is
  bearerbox, smsbox and fakesmsc;
* :meth:`NetNamespace.socket` makes a socket *inside* the namespace from this process (a socket
  stays in the namespace it was created in, whichever thread uses it later). A client socket
  made so talks to Kannel's loopback directly (the contract tests give the sender an aiohttp
  session whose connector makes its sockets here); a listening socket made so receives what
  Kannel sends to its own ``127.0.0.1`` (the delivery reports).

:class:`Bridge` joins the two loopbacks for a process that cannot use those sockets, such as a
real ``otpgate serve`` (which must stay in the machine's namespace to reach PostgreSQL): it
listens on ``127.0.0.1`` of one namespace and relays each connection to ``127.0.0.1`` of the
other, in both directions as needed.

Kannel's configuration (:meth:`Kannel.write_config`): bearerbox with its admin port, internal DLR
storage and one ``smsc = fake`` connection (which refuses messages routed to the smsc-id
``nowhere``, so that a message no SMSC takes can be tested); smsbox with a ``sendsms-port``; one
``sendsms-user``. fakesmsc is started with ``-m 0``: it sends nothing and prints every message
it receives (``Got message N: <from to type data>``), which :meth:`Kannel.received` reads.
Since the namespace is new, the fixed ports below collide with nothing.

Kannel's fake SMSC answers a message whose ``dlr-mask`` asks for final reports with a type 1
("delivered") report of its own making, and bearerbox adds the type 8 SMSC acknowledgement;
it never makes a type 2 or 16 report.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp

BEARERBOX = shutil.which("bearerbox") or "/usr/sbin/bearerbox"
SMSBOX = shutil.which("smsbox") or "/usr/sbin/smsbox"
FAKESMSC = "/usr/lib/kannel/test/fakesmsc"

#: Why the Kannel tests cannot run here, or None when they can.
UNAVAILABLE: str | None = None
if not all(os.access(p, os.X_OK) for p in (BEARERBOX, SMSBOX, FAKESMSC)):
    UNAVAILABLE = (
        "Kannel is not installed (apt-get install kannel kannel-extras: bearerbox, smsbox, "
        "fakesmsc); .ci/run installs it"
    )
elif not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
    UNAVAILABLE = "unshare, nsenter and ip (util-linux, iproute2) are needed for Kannel's namespace"

ADMIN_PORT = 13000
BOX_PORT = 13001
SENDSMS_PORT = 13013
FAKE_SMSC_PORT = 10000
ADMIN_PASSWORD = "kannel-admin-pw"
USERNAME = "otpgate"
PASSWORD = "Kannel-s3cret-pw"

_CLONE_NEWNET = 0x40000000
_GOT = re.compile(r"Got message \d+: <(?P<line>.*)>$")
# bearerbox's status.txt: "SMS: received R (Q queued), sent S (Q queued), store size N".
_SMS_SENT_QUEUED = re.compile(r"SMS: received \d+ \(\d+ queued\), sent \d+ \((\d+) queued\)")
# ... and for each SMSC connection: "..., failed F, queued Q msgs)".
_SMSC_QUEUED = re.compile(r"queued (\d+) msgs")


# --------------------------------------------------------------------------------------------
# The namespace


class NetNamespace:
    """A network namespace with only loopback, held by a ``sleep`` process of its own."""

    def __init__(self) -> None:
        self._holder = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        self.path = f"/proc/{self._holder.pid}/ns/net"
        deadline = time.monotonic() + 10
        # unshare has forked sleep once /proc shows a namespace other than ours.
        while not os.path.exists(self.path) or os.readlink(self.path) == os.readlink(
            "/proc/self/ns/net"
        ):
            assert self._holder.poll() is None, "unshare --net failed (root is needed)"
            assert time.monotonic() < deadline, "the namespace did not appear"
            time.sleep(0.01)
        self._fd = os.open(self.path, os.O_RDONLY)
        subprocess.run(
            ["nsenter", f"--net={self.path}", "ip", "link", "set", "lo", "up"], check=True
        )
        libc = ctypes.CDLL(None, use_errno=True)

        def enter() -> None:
            if libc.setns(self._fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")

        # One thread lives in the namespace and makes its sockets.
        self._maker = ThreadPoolExecutor(1, thread_name_prefix="netns", initializer=enter)

    def popen(self, argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the namespace."""
        return subprocess.Popen(["nsenter", f"--net={self.path}", "--", *argv], **kwargs)  # type: ignore[call-overload, no-any-return]

    def socket(
        self,
        family: int = socket.AF_INET,
        type_: int = socket.SOCK_STREAM,
        proto: int = 0,
    ) -> socket.socket:
        """A new socket in the namespace."""
        return self._maker.submit(socket.socket, family, type_, proto).result()

    def listen(self, port: int) -> socket.socket:
        """A socket listening on ``127.0.0.1:port`` of the namespace."""
        sock = self.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(64)
        return sock

    def connect(self, port: int, timeout: float = 5) -> socket.socket:
        """A connection to ``127.0.0.1:port`` of the namespace."""
        sock = self.socket()
        sock.settimeout(timeout)
        try:
            sock.connect(("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        return sock

    def session(self) -> aiohttp.ClientSession:
        """An aiohttp session whose connections are made inside the namespace."""
        connector = aiohttp.TCPConnector(
            socket_factory=lambda info: self.socket(info[0], info[1], info[2])
        )
        return aiohttp.ClientSession(connector=connector, trust_env=False)

    def get(self, port: int, target: str, timeout: float = 5) -> tuple[int, str]:
        """``GET target`` from ``127.0.0.1:port`` of the namespace: status and body."""
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.sock = self.connect(port, timeout)
        try:
            connection.request("GET", target)
            response = connection.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        finally:
            connection.close()

    def close(self) -> None:
        self._maker.shutdown(wait=True)
        os.close(self._fd)
        self._holder.kill()
        self._holder.wait()


# --------------------------------------------------------------------------------------------
# Bridges between the namespace's loopback and the machine's


class Bridge:
    """Relays every connection accepted on ``listener`` to a connection ``connect()`` makes,
    byte for byte, both ways, until either side closes. When ``connect`` fails the accepted
    connection is reset, so the client sees its peer vanish."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self._listener = listener
        self._connect = connect
        self.port: int = listener.getsockname()[1]
        self._closed = False
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="bridge")
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self._connect()
        except OSError:
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._open.update((client, upstream))
        pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        pump.start()
        self._pump(client, upstream)
        pump.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        client.close()
        upstream.close()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


def into_namespace(ns: NetNamespace, port: int) -> Bridge:
    """``127.0.0.1:<ephemeral>`` here relays to ``127.0.0.1:port`` in the namespace."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return Bridge(listener, lambda: ns.connect(port))


def out_of_namespace(ns: NetNamespace, port: int) -> Bridge:
    """``127.0.0.1:port`` in the namespace relays to ``127.0.0.1:port`` here (so a URL naming
    ``127.0.0.1:port`` means the same service on both sides)."""
    return Bridge(ns.listen(port), lambda: socket.create_connection(("127.0.0.1", port), 5))


# --------------------------------------------------------------------------------------------
# Kannel


@dataclass(frozen=True)
class Received:
    """One message fakesmsc received: sender, receiver, Kannel's coding word and the text."""

    sender: str
    receiver: str
    kind: str
    text: str


class Kannel:
    """bearerbox + smsbox + fakesmsc in ``ns``, configured in ``directory``."""

    def __init__(
        self,
        ns: NetNamespace,
        directory: Path,
        *,
        default_sender: str | None = None,
        quiet: bool = False,
    ) -> None:
        self.ns = ns
        #: Kannel's log level: 0 (debug, what the tests read) or 2 (warnings, for benchmarks).
        self.log_level = 2 if quiet else 0
        #: The sendsms-user's ``default-sender``, used when a request has no ``from``.
        self.default_sender = default_sender
        self.directory = directory
        self.config = directory / "kannel.conf"
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._seen = 0

    # --- configuration and processes ----------------------------------------------------------

    def write_config(self) -> None:
        d = self.directory
        self.config.write_text(
            f"""
group = core
admin-port = {ADMIN_PORT}
admin-password = "{ADMIN_PASSWORD}"
status-password = "{ADMIN_PASSWORD}"
admin-allow-ip = "127.0.0.1"
smsbox-port = {BOX_PORT}
box-allow-ip = "127.0.0.1"
log-file = "{d}/bearerbox.log"
log-level = {self.log_level}
access-log = "{d}/access.log"
dlr-storage = internal

group = smsc
smsc = fake
smsc-id = fake
port = {FAKE_SMSC_PORT}
connect-allow-ip = "127.0.0.1"
denied-smsc-id = "nowhere"

group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {BOX_PORT}
sendsms-port = {SENDSMS_PORT}
log-file = "{d}/smsbox.log"
log-level = {self.log_level}

group = sendsms-user
username = "{USERNAME}"
password = "{PASSWORD}"
max-messages = 10
concatenation = true
""".lstrip()
            + (f'default-sender = "{self.default_sender}"\n' if self.default_sender else "")
        )

    def _start(self, name: str, argv: list[str]) -> None:
        out = (self.directory / f"{name}.out").open("ab")
        err = (self.directory / f"{name}.err").open("ab")
        with out, err:
            self._processes[name] = self.ns.popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )

    def _stop(self, name: str) -> None:
        process = self._processes.pop(name, None)
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def start(self) -> None:
        self.write_config()
        self._start("bearerbox", [BEARERBOX, "-v", str(max(1, self.log_level)), str(self.config)])
        self._wait(lambda: self._admin_status() is not None, "bearerbox's admin port")
        self.start_smsbox()
        self.start_smsc()

    def start_smsbox(self) -> None:
        self._start("smsbox", [SMSBOX, "-v", str(max(1, self.log_level)), str(self.config)])
        self._wait(self._smsbox_answers, "smsbox's sendsms port")
        self._wait(lambda: "smsbox:" in (self._admin_status() or ""), "smsbox to join bearerbox")

    def stop_smsbox(self) -> None:
        self._stop("smsbox")

    def stop_smsc(self) -> None:
        """Disconnect fakesmsc: bearerbox keeps what it is given until the SMSC is back."""
        self._stop("fakesmsc")

    def start_smsc(self) -> None:
        self._start(
            "fakesmsc",
            [FAKESMSC, "-H", "127.0.0.1", "-r", str(FAKE_SMSC_PORT), "-m", "0", "0 0 text none"],
        )
        self._wait(self.smsc_online, "fakesmsc to connect")

    def smsc_online(self) -> bool:
        return "(online" in (self._admin_status() or "").split("SMSC connections:")[-1]

    def stop(self) -> None:
        for name in ("fakesmsc", "smsbox", "bearerbox"):
            self._stop(name)

    def _wait(self, condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, process in self._processes.items():
                assert process.poll() is None, f"{name} exited: {self.log(name)[-2000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def _admin_status(self) -> str | None:
        try:
            status, body = self.ns.get(ADMIN_PORT, f"/status.txt?password={ADMIN_PASSWORD}", 2)
        except OSError:
            return None
        return body if status == 200 else None

    def _smsbox_answers(self) -> bool:
        try:
            status, _ = self.ns.get(SENDSMS_PORT, "/cgi-bin/sendsms", 2)
        except OSError:
            return False
        return status in (400, 403)

    def log(self, name: str) -> str:
        parts = [self.directory / f"{name}.{ext}" for ext in ("out", "err", "log")]
        return "".join(p.read_text(errors="replace") for p in parts if p.exists())

    # --- what happened ------------------------------------------------------------------------

    @property
    def sendsms_path(self) -> str:
        query = urllib.parse.urlencode({"username": USERNAME, "password": PASSWORD})
        return f"/cgi-bin/sendsms?{query}"

    def url(self, port: int = SENDSMS_PORT) -> str:
        """The sendsms URL with credentials, as seen on ``127.0.0.1:port``."""
        return f"http://127.0.0.1:{port}{self.sendsms_path}"

    def received(self) -> list[Received]:
        """Every message fakesmsc printed, in order, decoded."""
        found = []
        for line in (
            (self.directory / "fakesmsc.err").read_bytes().decode("utf-8", "replace").splitlines()
        ):
            match = _GOT.search(line)
            if match is None:
                continue
            sender, receiver, kind, data = match.group("line").split(" ", 3)
            # Kannel's URL encoding writes a space (byte 0x20) as "+" and "+" as "%2B".
            raw = urllib.parse.unquote_to_bytes(data.replace("+", " "))
            if kind == "ucs-2":
                text = raw.decode("utf-16-be")
            elif kind in ("data", "udh"):
                text = raw.decode("latin-1")
            else:
                text = data
            found.append(Received(sender, receiver, kind, text))
        return found

    def new_messages(self, count: int, timeout: float = 10) -> list[Received]:
        """The next ``count`` messages fakesmsc receives after the ones seen so far."""
        self._wait(
            lambda: len(self.received()) >= self._seen + count,
            f"{count} message(s) at fakesmsc",
            timeout,
        )
        found = self.received()[self._seen : self._seen + count]
        self._seen += count
        return found

    @property
    def seen(self) -> int:
        """How many received messages ``new_messages`` has handed out (or skipped)."""
        return self._seen

    def smsbox_running(self) -> bool:
        return "smsbox" in self._processes

    def smsc_running(self) -> bool:
        return "fakesmsc" in self._processes

    def mark_seen(self) -> None:
        """Forget the messages received so far (``new_messages`` starts after them).

        Kannel answers ``sendsms`` once bearerbox holds a message, before fakesmsc has it, so
        an earlier test's message may still be on its way. This first waits until bearerbox
        has nothing queued for an SMSC and fakesmsc's count has not moved for
        0.3 s; only then are the messages so far "seen"."""
        if self.smsc_running():
            self._wait(self._nothing_in_flight, "bearerbox to empty its queues")
        count = -1
        deadline = time.monotonic() + 10
        while (now := len(self.received())) != count and time.monotonic() < deadline:
            count = now
            time.sleep(0.3)
        self._seen = len(self.received())

    def _nothing_in_flight(self) -> bool:
        status = self._admin_status() or ""
        outgoing = _SMS_SENT_QUEUED.search(status)
        smscs = _SMSC_QUEUED.findall(status)
        return bool(outgoing and outgoing.group(1) == "0" and smscs and set(smscs) == {"0"})


@contextlib.contextmanager
def running_kannel(
    directory: Path, *, default_sender: str | None = None, quiet: bool = False
) -> Iterator[Kannel]:
    """A namespace with Kannel running in it, stopped and removed at the end."""
    directory.mkdir(parents=True, exist_ok=True)
    ns = NetNamespace()
    kannel = Kannel(ns, directory, default_sender=default_sender, quiet=quiet)
    try:
        kannel.start()
        yield kannel
    finally:
        kannel.stop()
        ns.close()
