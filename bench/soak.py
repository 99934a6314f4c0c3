"""Soak: the long version of the reliability suite, against real ``anvil-nb serve`` processes.

Run: ``.venv/bin/python bench/soak.py [--minutes 4] [--only fuzz,restart] [--seed 1]``.

Each scenario gets a fresh ``python -m anvil_nb serve`` (fresh keys, a temporary data dir, its
log in a file, everything on 127.0.0.1), an anvil_nb provider in a subprocess of its own (a
small script written to the temp dir and run with this Python, so that SIGKILL and SIGSTOP hit
it alone), and callers in this process (anvil_nb ``Client`` over ``WebSocketTransport``, client
key, one thread and one connection each). Every loop is bounded in count and in time, and
every subprocess is stopped at the end of its scenario, also on Ctrl-C or an error (and
children get SIGTERM if this process dies). The scenarios, in order:

``fuzz``
    Hostile frames for most of the time (random JSON with the protocol's keys and values,
    random bytes and text, bad types, deep nesting, invalid UTF-8, bad WebSocket framing,
    hand-written attacks), each batch over a fresh raw connection as a server-key uplink, a
    client-key uplink, a ``_/ws`` browser, or an uplink that never says hello; meanwhile 16
    legit callers call the provider's ``echo`` back to back. The fuzzer never registers a name
    that matches a legit function (a server key may take over any name: that would be the
    fuzzer's doing, not the host's). Figures: frames and connections, legit calls made and
    lost / duplicated / mismatched (must be 0: *lost* is an error or no answer within 30 s,
    *duplicated* a call the provider ran twice, *mismatched* an answer that is not the call's
    own), host alive and serving at the end, ``Traceback`` lines in the host log.
``load``
    16 callers back to back: calls, lost / duplicated / mismatched, the host's RSS at the
    start, after 10,000 calls and at the end (it should stay flat), host CPU per call.
``slow``
    N = 1, 4 slow consumers: raw sockets with a small SO_RCVBUF that do the WebSocket upgrade
    by hand, say hello with the client key, pipeline many CALLs to a provider function that
    returns 1 MiB, and never read. Figures: the host's peak RSS (VmRSS sampled every 20 ms;
    pass mark: at most 2 x ``--max-queued-bytes`` per consumer + 64 MiB above the baseline),
    RSS held at the end of the window and once they are gone, and a bystander's latency
    meanwhile (``echo`` through the provider and ``anvil.private.echo`` answered by the host;
    pass mark: every call under 1 s).
``provider-death``
    16 callers wait in a slow call; the provider gets SIGKILL. Figure: ms until every pending
    caller got ``UplinkDisconnectedError`` (max and median).
``provider-freeze``
    The same with SIGSTOP (then SIGKILL): s until the pending callers fail, with the host's
    default pings and with ``--ping-interval 1 --ping-timeout 2``.
``restart``
    A provider and 16 callers running; the host gets SIGKILL and is started again on the same
    port and data dir (3 times). Figures: s from the new host's ready line to the first
    successful call and to every caller's first one; calls that failed because they were in
    flight at the kill, errors during the outage (by type) and calls lost otherwise (must be 0).
``fds``
    The host under ``prlimit --nofile=128:128`` with 200 idle TCP sockets opened at it.
    Figures: host CPU seconds over 5 s (no spin), host log bytes grown, whether a legit
    client can connect and call during the flood, once the handshake timeout has closed the
    idle sockets (``--handshake-timeout 10``), and after they are closed.

Every scenario ends by stopping its host with SIGTERM: exit status 0 and no ``Traceback`` in
its log are a figure too.

``--minutes`` (default 4) is the whole run's target; the fixed scenarios take about 100 s and
the rest is shared by ``fuzz``, ``load`` and ``slow`` (the default run took 3.5 minutes on 2
CPUs). Flags of ``anvil-nb serve`` that this
version does not have are left out (and the figures that need them say so). Each figure is
printed as it is measured (``scenario: figure: value  ok|BAD``) and all of them again in a
markdown table at the end. ``ok``/``BAD`` marks figures with a pass mark; the others are for
reading. The exit status is 1 if any figure is ``BAD`` (130 after Ctrl-C or SIGTERM, once
every child is stopped). Nothing here imports from ``tests/``: the raw WebSocket client
(:class:`RawWS`, RFC 6455 by hand over a plain socket) and the frame generator
(:class:`Fuzzer`, a seeded ``random.Random``) are this file's own.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import contextlib
import ctypes
import json
import os
import queue
import random
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport

PYTHON = sys.executable
MIB = 1024 * 1024
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_READY = re.compile(
    r"anvil_nb host ready at (http://127\.0\.0\.1:(\d+)/) \(uplink (ws://127\.0\.0\.1:\d+/_/uplink)\)"
)
#: Seconds to wait for any one thing to start or answer.
WAIT = 30.0
#: Seconds a legit call may take before it counts as hung (lost).
CALL_WAIT = 30.0
CALLERS = 16
SCENARIOS = ("fuzz", "load", "slow", "provider-death", "provider-freeze", "restart", "fds")


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass
class Figure:
    scenario: str
    name: str
    value: str
    ok: bool | None  # None: no pass mark


class Report:
    """Figures as they come (one line each), and a markdown table at the end."""

    def __init__(self) -> None:
        self.rows: list[Figure] = []

    def add(self, scenario: str, name: str, value: str, ok: bool | None = None) -> None:
        self.rows.append(Figure(scenario, name, value, ok))
        mark = "" if ok is None else ("  ok" if ok else "  BAD")
        print(f"{scenario}: {name}: {value}{mark}", flush=True)

    def table(self) -> str:
        lines = ["| scenario | figure | value | check |", "| --- | --- | --- | --- |"]
        for f in self.rows:
            check = "" if f.ok is None else ("ok" if f.ok else "**BAD**")
            lines.append(f"| {f.scenario} | {f.name} | {f.value.replace('|', '/')} | {check} |")
        return "\n".join(lines)

    @property
    def bad(self) -> list[Figure]:
        return [f for f in self.rows if f.ok is False]


def mib(n: float) -> str:
    return f"{n / MIB:,.1f} MiB"


def counts(c: collections.Counter[str] | dict[str, int]) -> str:
    """``"3 UplinkDisconnectedError, 1 hung"`` (or ``"none"``)."""
    items = sorted(c.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{n} {k}" for k, n in items if n) or "none"


def spread(xs: Sequence[float], unit: str, scale: float = 1.0, digits: int = 0) -> str:
    """``"max 12 ms, median 9 ms"`` of *xs* times *scale*."""
    if not xs:
        return "n/a"
    return f"max {max(xs) * scale:,.{digits}f} {unit}, median {statistics.median(xs) * scale:,.{digits}f} {unit}"


# ---------------------------------------------------------------------------------------------
# Subprocesses


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: one C call, no lock taken, nothing imported."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when this process dies


def _spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``Popen`` of a child that gets SIGTERM if this process dies."""
    return subprocess.Popen(list(cmd), preexec_fn=_die_with_parent, **kwargs)  # noqa: PLW1509 - one C call, safe with threads


def _lines_of(popen: subprocess.Popen[Any]) -> queue.Queue[str | None]:
    """A queue of *popen*'s stdout lines (``None`` at EOF), filled by a daemon thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:
        assert popen.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in popen.stdout:
                lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=drain, name=f"stdout-{popen.pid}", daemon=True).start()
    return lines


def _wait_line(lines: queue.Queue[str | None], want: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"not ready within {timeout:g} s") from None
        if line is None:
            raise RuntimeError("exited before it was ready")
        if want(line):
            return line


def _stop(popen: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int | None:
    """Stop *popen* with *sig* (SIGKILL after 10 s); its exit status."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(sig)
            popen.send_signal(signal.SIGCONT)  # in case it was stopped
        try:
            popen.wait(10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)
    for stream in (popen.stdin, popen.stdout):
        with contextlib.suppress(OSError):
            if stream is not None:
                stream.close()
    return popen.returncode


def proc_rss(pid: int) -> int:
    """Resident memory of *pid* in bytes (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds *pid* has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS every *interval* seconds on a thread; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02):
        self.pid, self.interval = pid, interval
        self.peak = proc_rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, proc_rss(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


class Host:
    """``python -m anvil_nb serve`` on 127.0.0.1 (port 0 the first time, the same one after)."""

    def __init__(self, run: Run, name: str, flags: Sequence[str] = (), prefix: Sequence[str] = ()):
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=run.tmp))
        self.data_dir = self.dir / "data"
        self.server_key, self.client_key = run.server_key, run.client_key
        self.flags, self.prefix = list(flags), list(prefix)
        self.port = 0
        self.logs: list[Path] = []
        self.popen: subprocess.Popen[Any] | None = None
        self.start()

    def start(self) -> float:
        """Start (again, on the same port and data dir); the monotonic time of the ready line."""
        log_path = self.dir / f"host-{len(self.logs) + 1}.log"
        self.logs.append(log_path)
        cmd = [
            *self.prefix, PYTHON, "-m", "anvil_nb", "serve", "--host", "127.0.0.1",
            "--port", str(self.port), "--server-key", self.server_key,
            "--client-key", self.client_key, "--data-dir", str(self.data_dir), *self.flags,
        ]  # fmt: skip
        with open(log_path, "wb") as log:
            self.popen = _spawn(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True
            )
        lines = _lines_of(self.popen)
        try:
            line = _wait_line(lines, lambda s: _READY.fullmatch(s) is not None, WAIT)
        except (TimeoutError, RuntimeError) as exc:
            _stop(self.popen, signal.SIGKILL)
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"anvil-nb serve did not start ({exc}):\n{tail}") from None
        self.ready_at = time.monotonic()
        m = _READY.fullmatch(line)
        assert m is not None
        self.port, self.url = int(m.group(2)), m.group(3)
        return self.ready_at

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL (a crash) and wait for it."""
        if self.popen is not None:
            _stop(self.popen, signal.SIGKILL)

    def stop(self) -> int | None:
        """SIGTERM; the exit status (None if it was never started)."""
        return _stop(self.popen) if self.popen is not None else None

    def rss(self) -> int:
        return proc_rss(self.pid)

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def log_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.logs if p.exists())

    def traceback_lines(self) -> int:
        return sum(
            line.count("Traceback")
            for p in self.logs
            if p.exists()
            for line in p.read_text(errors="replace").splitlines()
        )

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


PROVIDER = textwrap.dedent(
    '''
    """The soak's provider: serves echo/slow/blob/stats with the server key until stdin closes."""
    import os, signal, sys, threading, time
    from anvil_nb.client.client import Client, FunctionRegistry
    from anvil_nb.client.websocket import WebSocketTransport

    url, key, marker, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(",")
    lock = threading.Lock()
    last = {}
    counts = {"echoes": 0, "dups": 0, "slow_in": 0}

    def echo(x):
        # legit calls are [marker, caller, seq] with seq rising per caller: a repeat is a dup
        if isinstance(x, list) and len(x) == 3 and x[0] == marker:
            with lock:
                counts["echoes"] += 1
                if x[2] <= last.get(x[1], 0):
                    counts["dups"] += 1
                else:
                    last[x[1]] = x[2]
        return x

    def slow(seconds):
        with lock:
            counts["slow_in"] += 1
        time.sleep(min(float(seconds), 120.0))  # the work of the call
        return "slept"

    def blob(n):
        return "x" * min(int(n), 8 * 1024 * 1024)

    def stats():
        with lock:
            return dict(counts)

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def watch_stdin():
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    registry = FunctionRegistry()
    for name, fn in {"echo": echo, "slow": slow, "blob": blob, "stats": stats}.items():
        if name in names or name == "stats":
            registry.register(name, fn)
    client = Client(WebSocketTransport(url, key), functions=registry, workers=64).start()
    print("READY", flush=True)
    done.wait(6 * 3600)
    client.close()
    '''
)


class Provider:
    """The provider script in a subprocess of its own, connected with the server key."""

    def __init__(self, run: Run, host: Host, names: Sequence[str] = ("echo",)):
        script = run.tmp / "provider.py"
        if not script.exists():
            script.write_text(PROVIDER)
        self.log_path = Path(tempfile.mkstemp(prefix="provider-", suffix=".log", dir=run.tmp)[1])
        cmd = [PYTHON, str(script), host.url, host.server_key, run.marker, ",".join(names)]
        with open(self.log_path, "wb") as log:
            self.popen = _spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)  # fmt: skip
        try:
            _wait_line(_lines_of(self.popen), lambda s: s == "READY", WAIT)
        except (TimeoutError, RuntimeError) as exc:
            _stop(self.popen, signal.SIGKILL)
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the provider did not start ({exc}):\n{tail}") from None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> int | None:
        with contextlib.suppress(OSError):
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        return _stop(self.popen)

    def __enter__(self) -> Provider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Raw WebSocket over a plain socket (RFC 6455 by hand)


def _xor(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def ws_frame(payload: bytes, opcode: int = 1, *, rsv: int = 0, masked: bool = True) -> bytes:
    """One complete WebSocket frame as a client sends it (masked unless told)."""
    n = len(payload)
    head = bytearray([0x80 | (rsv & 7) << 4 | (opcode & 0x0F)])
    bit = 0x80 if masked else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not masked:
        return bytes(head) + payload
    mask = os.urandom(4)
    return bytes(head) + mask + _xor(payload, mask)


class RawWS:
    """A WebSocket client on a plain blocking socket: the upgrade and every frame by hand.

    Nothing is read unless :meth:`poll` or :meth:`recv` is called, so a slow consumer is one
    that never calls them (with a small *rcvbuf*, the host's writes back up at once).
    """

    def __init__(
        self, port: int, path: str = "/_/uplink", rcvbuf: int | None = None, timeout: float = 5.0
    ):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.buf = bytearray()
        self._poller = select.poll()
        try:
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            self.sock.connect(("127.0.0.1", port))
            key = base64.b64encode(os.urandom(16)).decode()
            self.sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            deadline = time.monotonic() + timeout
            while b"\r\n\r\n" not in self.buf:
                if time.monotonic() > deadline or len(self.buf) > 65536:
                    raise ConnectionError("no complete upgrade response")
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed during the upgrade")
                self.buf += chunk
            head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
            status = head.split(b"\r\n", 1)[0].split()
            if len(status) < 2 or status[1] != b"101":
                raise ConnectionError(f"upgrade refused: {head[:80]!r}")
            self.buf = bytearray(rest)
        except BaseException:
            self.sock.close()
            raise
        self._poller.register(self.sock, select.POLLIN)

    def send(self, data: bytes) -> bool:
        """Write raw bytes (whole frames, or anything); False if the connection is gone."""
        try:
            self.sock.sendall(data)
        except OSError:  # includes timeouts: the host stopped reading
            return False
        return True

    def send_json(self, msg: Any) -> bool:
        return self.send(ws_frame(json.dumps(msg).encode()))

    def _take(self) -> tuple[int, bytes] | None:
        b = self.buf
        if len(b) < 2:
            return None
        opcode, n, i = b[0] & 0x0F, b[1] & 0x7F, 2
        if n == 126:
            if len(b) < 4:
                return None
            n, i = int.from_bytes(b[2:4], "big"), 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, i = int.from_bytes(b[2:10], "big"), 10
        mask = b""
        if b[1] & 0x80:
            mask, i = bytes(b[i : i + 4]), i + 4
        if len(b) < i + n:
            return None
        payload = bytes(b[i : i + n])
        del b[: i + n]
        return opcode, (_xor(payload, mask) if mask else payload)

    def _read(self, timeout: float) -> bool:
        """Read what arrives within *timeout* s into the buffer; False once closed."""
        try:
            if not self._poller.poll(max(0, int(timeout * 1000))):
                return True
            chunk = self.sock.recv(65536)
        except OSError:
            return False
        if not chunk:
            return False
        self.buf += chunk
        return True

    def poll(self) -> bool:
        """Take in what has arrived, without waiting; False once the host has closed."""
        for _ in range(64):  # bounded: a chatty host cannot keep us here
            if not self._poller.poll(0):
                break
            if not self._read(0):
                return False
        while (frame := self._take()) is not None:
            opcode, payload = frame
            if opcode == 8:
                return False
            if opcode == 9:
                self.send(ws_frame(payload[:125], 10))
        return True

    def recv(self, timeout: float = 5.0) -> Any:
        """The next text frame, decoded (``None`` if closed or nothing came in time)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._take()
            if frame is not None:
                opcode, payload = frame
                if opcode == 8:
                    return None
                if opcode == 9:
                    self.send(ws_frame(payload[:125], 10))
                if opcode == 1:
                    return json.loads(payload)
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return None

    def hello(self, key: str) -> Any:
        self.send_json({"key": key, "v": 8})
        return self.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(False)
            self.sock.send(ws_frame(b"\x03\xe8", 8))
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# Legit traffic


def connect(url: str, key: str, stack: contextlib.ExitStack | None = None) -> Client:
    """An anvil_nb client with no functions of its own, closed by *stack* if given."""
    client = Client(
        WebSocketTransport(url, key, connect_timeout=WAIT), functions=FunctionRegistry()
    ).start(WAIT)
    if stack is not None:
        stack.callback(client.close)
    return client


def outcome(fut: concurrent.futures.Future[Any]) -> tuple[str, Any]:
    """``("ok", response)`` or the error's type name for a finished ``send_call`` future."""
    exc = fut.exception(0)
    if exc is not None:
        return type(exc).__name__, None
    msg, _media = fut.result(0)
    if "error" in msg:
        err = msg["error"]
        kind = err.get("type") if isinstance(err, dict) else None
        return str(kind or "error").rsplit(".", 1)[-1], None
    return "ok", msg.get("response")


def legit_call(client: Client, command: str, args: list[Any], timeout: float = CALL_WAIT) -> tuple[str, Any]:  # fmt: skip
    """Call and classify: ``("ok", response)``, ``("hung", None)`` or ``(error type, None)``."""
    try:
        pending = client.send_call(command, args, {})
    except Exception as exc:  # not sent (the connection is down): its kind is the figure
        return type(exc).__name__, None
    done, _ = concurrent.futures.wait([pending], timeout)
    return outcome(pending) if done else ("hung", None)


@dataclass
class Tally:
    """One caller's outcomes (merged over callers by :meth:`Callers.merged`)."""

    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    #: (started, finished, kind) of every call, when kept.
    events: list[tuple[float, float, str]] | None = None
    last_ok: float = 0.0

    def add(self, kind: str, t0: float, t1: float) -> None:
        self.kinds[kind] += 1
        if kind == "ok":
            self.last_ok = t1
        if self.events is not None:
            self.events.append((t0, t1, kind))

    @property
    def ok(self) -> int:
        return self.kinds["ok"]

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def failed(self) -> collections.Counter[str]:
        return collections.Counter({k: n for k, n in self.kinds.items() if k not in ("ok", "mismatched")})  # fmt: skip


class Callers:
    """*n* clients (client key), each calling ``echo([marker, id, seq])`` back to back on a thread."""

    def __init__(
        self, run: Run, host: Host, n: int, tag: str, stack: contextlib.ExitStack,
        keep_events: bool = False, max_calls: int = 5_000_000,
    ):  # fmt: skip
        self.marker, self.tag, self.max_calls = run.marker, tag, max_calls
        self.clients = [connect(host.url, host.client_key, stack) for _ in range(n)]
        self.tallies = [Tally(events=[] if keep_events else None) for _ in range(n)]
        self._stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"caller-{tag}{i}", daemon=True)
            for i in range(n)
        ]
        stack.callback(self.stop)  # runs before the clients close (the stack is LIFO)
        for t in self.threads:
            t.start()

    def _loop(self, i: int) -> None:
        client, tally, cid = self.clients[i], self.tallies[i], f"{self.tag}{i}"
        clock = time.monotonic
        for seq in range(1, self.max_calls + 1):
            if self._stop.is_set():
                return
            expected = [self.marker, cid, seq]
            t0 = clock()
            kind, got = legit_call(client, "echo", [expected])
            if kind == "ok" and got != expected:
                kind = "mismatched"
            tally.add(kind, t0, clock())

    def total(self) -> int:
        return sum(t.total for t in self.tallies)

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(CALL_WAIT + 10)

    def merged(self) -> Tally:
        out = Tally()
        for t in self.tallies:
            out.kinds.update(t.kinds)
        return out


def provider_stats(host: Host) -> dict[str, int]:
    """The provider's counters, asked over a new connection (which must work)."""
    client = connect(host.url, host.client_key)
    try:
        kind, stats = legit_call(client, "stats", [], timeout=WAIT)
    finally:
        client.close()
    if kind != "ok" or not isinstance(stats, dict):
        raise RuntimeError(f"stats call failed: {kind}")
    return stats


def report_integrity(run: Run, s: str, tally: Tally, stats: dict[str, int], lost_kinds: collections.Counter[str] | None = None) -> None:  # fmt: skip
    """lost / duplicated / mismatched (must all be 0)."""
    lost = tally.failed() if lost_kinds is None else lost_kinds
    n_lost, n_dup, n_bad = sum(lost.values()), stats.get("dups", -1), tally.kinds["mismatched"]
    detail = f" ({counts(lost)})" if n_lost else ""
    run.report.add(
        s, "legit calls lost / duplicated / mismatched", f"{n_lost} / {n_dup} / {n_bad}{detail}",
        n_lost == 0 and n_dup == 0 and n_bad == 0,
    )  # fmt: skip


def finish_host(run: Run, s: str, host: Host) -> None:
    """Stop the host (SIGTERM) and report its exit status and the Tracebacks in its log."""
    code = host.stop()
    tracebacks = host.traceback_lines()
    run.report.add(
        s, "host exit status on SIGTERM, Traceback lines in its log",
        f"{code}, {tracebacks} (log {host.log_bytes():,} bytes)", code == 0 and tracebacks == 0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Hostile frames

KINDS = ["CALL", "REGISTER", "UNREGISTER", "CHUNK_HEADER", "MEDIA_ERROR", "EVENT",
         "LAUNCH_BACKGROUND", "REGISTER_LIVE_OBJECT_BACKEND", "LOG", "GET_TASK_STATE"]  # fmt: skip
KEYS = ["type", "id", "command", "args", "kwargs", "objects", "response", "error",
        "sessionData", "call-stack-id", "capUpdates", "vt_global", "liveObjectCall", "name",
        "requestId", "mediaId", "chunkIndex", "lastChunk", "key", "v", "output", "auth",
        "call-stack", "client", "originating-call", "backend", "mime-type", "cause"]  # fmt: skip
COMMANDS = ["echo", "anvil.private.echo", "anvil.private.reset_session", "task:x", "http:/a",
            "anvil.private.capability_is_valid", "anvil.private.watch_events", ".*", "(a+)+$",
            "anvil.private.host_state", "anvil.private.get_session_id", "(unclosed", "e.*"]  # fmt: skip
ENTRY_TYPES = ["Capability", "DataMedia", "ValueType", "Primitive", "Date", "LiveObject", "Long", "x"]  # fmt: skip
PATH_PARTS = ["args", "kwargs", "response", "sessionData", "session", "call-stack", "client",
              "id", "vt_global", "objects"]  # fmt: skip
WORDS = [*KINDS, *KEYS, *COMMANDS, "server-1", "outbound-x", "OK", "uplink", "client", ""]
DEEP = "[" * 300 + "1" + "]" * 300
HAND_WRITTEN: list[Any] = [
    {"type": "CALL", "id": "i1", "command": "echo", "args": [1], "kwargs": {},
     "objects": [{"type": ["Primitive"], "path": ["sessionData", "session"], "value": {"a": 1}}]},
    {"type": "CALL", "id": "i2", "command": "echo", "args": [1], "kwargs": {},
     "objects": [{"type": ["Primitive"], "path": ["call-stack", 0, "type"], "value": "uplink"}]},
    {"id": "server-1", "response": 1, "objects": [{"type": ["Primitive"], "path": ["id"], "value": "x"}]},
    {"type": "CALL", "id": ["list"], "command": "echo", "args": [], "kwargs": {}},
    {"type": "CALL", "id": {"a": 1}, "command": "echo", "args": [], "kwargs": {}},
    {"id": ["x"], "response": 1}, {"id": {"x": 1}, "error": "e"}, {"id": "nope", "error": 5},
    '{"type": "CALL", "id": "deep", "command": "echo", "args": [' + DEEP + '], "kwargs": {}}',
    {"type": "CALL", "id": "lo", "liveObjectCall": {"backend": "x"}, "args": [], "kwargs": {}},
    {"type": "CALL", "id": "k", "command": "echo", "args": [], "kwargs": None, "objects": None},
    {"type": "CALL", "id": "c", "command": "echo", "args": [], "kwargs": {},
     "objects": [{"type": ["Capability"], "path": ["args", 0], "scope": [["x"] * 50] * 10, "mac": 5}]},
    {"type": "CALL", "id": "cs", "command": "echo", "args": [], "kwargs": {},
     "call-stack-id": "server-1", "sessionData": {"session": {"admin": True}}},
    {"type": "REGISTER", "name": "(unclosed"}, {"type": "REGISTER", "name": 5},
    {"type": "UNREGISTER", "name": "echo"},
    {"type": "CHUNK_HEADER", "requestId": "r", "mediaId": "m", "chunkIndex": 0},
    {"type": "MEDIA_ERROR", "requestId": "r", "cause": "x" * 1000},
    {"type": "CALL", "id": "m1", "command": "echo", "args": [None], "kwargs": {},
     "objects": [{"type": ["DataMedia"], "path": ["args", 0], "id": "m", "mime-type": "x"}]},
    {"type": "CHUNK_HEADER", "requestId": "m1", "mediaId": "m", "chunkIndex": 0, "lastChunk": False},
    {"key": "again", "v": 8}, {"auth": "OK"}, {"output": "hello"}, {"error": "fatal?"},
    "", "null", "[]", '"string"', "{", "NaN", '{"type": "CALL", "id": 1e999}',
]  # fmt: skip
ROLES = ["server", "client", "browser", "nohello"]
# The fuzzer compiles random names as regexes (to keep clear of the legit ones): quiet the
# FutureWarnings about "possible nested set" and the like that such names bring.
warnings.filterwarnings("ignore", message="Possible (nested set|set )", category=FutureWarning)


class Fuzzer:
    """Hostile frames from a seeded RNG, already encoded for the wire.

    *protect*: names the fuzzer must never REGISTER a pattern for (the legit functions).
    """

    WEIGHTS: dict[str, int] = {
        "json": 45, "keys": 12, "hand": 8, "text": 8, "binary": 8, "deep": 3, "badutf8": 3,
        "nan": 2, "control": 4, "rsv": 2, "raw": 2, "claim": 1, "unmasked": 1, "split": 1,
    }  # fmt: skip

    def __init__(self, seed: int, protect: Sequence[str]):
        self.rng = random.Random(seed)
        self.protect = list(protect)
        self._kinds, self._weights = list(self.WEIGHTS), list(self.WEIGHTS.values())

    def text(self, n: int = 20) -> str:
        r = self.rng
        pick = r.random()
        if pick < 0.3:
            return r.choice(WORDS)
        if pick < 0.7:
            return "".join(r.choice("abcxyz-_.:/*()[]{}\\\"'0129 ") for _ in range(r.randint(0, n)))
        # any code point but surrogates (text frames must be valid UTF-8; see "badutf8")
        cps = [r.choice([r.randint(0, 0x7F), r.randint(0x80, 0xD7FF), r.randint(0xE000, 0x10FFFF)])
               for _ in range(r.randint(0, n))]  # fmt: skip
        return "".join(map(chr, cps))

    def scalar(self) -> Any:
        r = self.rng
        return r.choice([
            None, True, False, r.randint(-5, 5), r.randint(-(2**70), 2**70), 2**63, -(2**63) - 1,
            r.uniform(-1e308, 1e308), 0.5, -0.0, self.text(), self.text(), self.text(),
        ])  # fmt: skip

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        k = r.random()
        if depth >= 3 or k < 0.6:
            return self.scalar()
        if k < 0.8:
            return [self.value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.text(8): self.value(depth + 1) for _ in range(r.randint(0, 4))}

    def path(self) -> list[Any]:
        r = self.rng
        return [r.choice([r.choice(PATH_PARTS), r.randint(-2, 3), self.text(4), None])
                for _ in range(r.randint(0, 5))]  # fmt: skip

    def entry(self) -> dict[str, Any]:
        r = self.rng
        e: dict[str, Any] = {}
        if r.random() < 0.8:
            e["type"] = [r.choice(ENTRY_TYPES) for _ in range(r.randint(0, 3))]
        if r.random() < 0.8:
            e["path"] = self.path() if r.random() < 0.8 else self.value()
        for key in r.sample(["scope", "mac", "narrow", "id", "value", "mime-type", "name"], r.randint(0, 3)):  # fmt: skip
            e[key] = self.value()
        return e

    def field(self, key: str) -> Any:
        r = self.rng
        if r.random() < 0.3:
            return self.value()
        if key == "type":
            return r.choice(KINDS)
        if key in ("command", "name"):
            return r.choice(COMMANDS)
        if key == "args":
            return [self.value() for _ in range(r.randint(0, 3))]
        if key in ("kwargs", "sessionData", "capUpdates", "client"):
            return {self.text(5): self.value() for _ in range(r.randint(0, 3))}
        if key == "objects":
            return [self.entry() for _ in range(r.randint(0, 4))]
        if key in ("id", "call-stack-id", "requestId", "mediaId", "originating-call"):
            return r.choice([f"server-{r.randint(1, 50)}", self.text(10), r.randint(0, 9)])
        if key == "call-stack":
            return [{"type": r.choice(["browser", "uplink", "client", "x"])} for _ in range(r.randint(0, 2))]  # fmt: skip
        if key == "v":
            return r.choice([8, 5, 4, -1, "8"])
        return self.value()

    def message(self) -> dict[str, Any]:
        r = self.rng
        keys = r.sample(KEYS, r.randint(0, 9))
        if "type" not in keys and r.random() < 0.8:
            keys.insert(0, "type")
        return {k: self.field(k) for k in keys}

    def _safe(self, msg: Any, role: str) -> Any:
        """No server-key REGISTER of a pattern that matches a legit function's name."""
        if role != "server" or not isinstance(msg, dict) or not isinstance(msg.get("name"), str):
            return msg
        try:
            steals = any(re.fullmatch(msg["name"], name) for name in self.protect)
        except (re.error, RecursionError, OverflowError):
            steals = False
        return {**msg, "name": "fuzz-" + msg["name"]} if steals else msg

    def frame(self, role: str) -> tuple[str, bytes]:
        """``(kind, bytes for the wire)``."""
        r = self.rng
        kind = r.choices(self._kinds, self._weights)[0]
        if kind == "json":
            return kind, ws_frame(json.dumps(self._safe(self.message(), role)).encode())
        if kind == "keys":
            msg = {k: self.value() for k in r.sample(KEYS, r.randint(0, 6))}
            return kind, ws_frame(json.dumps(self._safe(msg, role)).encode())
        if kind == "hand":
            msg = r.choice(HAND_WRITTEN)
            text = msg if isinstance(msg, str) else json.dumps(msg)
            return kind, ws_frame(text.encode())
        if kind == "text":
            return kind, ws_frame(self.text(64).encode())
        if kind == "binary":
            return kind, ws_frame(r.randbytes(r.randint(0, 64)), 2)
        if kind == "deep":
            d = r.choice([64, 500, 5000, 50_000])
            body = r.choice(["[" * d + "]" * d, '{"a":' * d + "1" + "}" * d, "[" * d])
            return kind, ws_frame(('{"type":"CALL","id":"d","command":"echo","kwargs":{},"args":[' + body + "]}").encode())  # fmt: skip
        if kind == "badutf8":
            return kind, ws_frame(b'{"type": "CALL", "id": "\xff\xfe\xed\xa0\x80", "command": "echo"}')  # fmt: skip
        if kind == "nan":
            msg = {"type": "CALL", "id": "n", "command": "echo", "kwargs": {},
                   "args": [r.choice([float("nan"), float("inf"), -float("inf")])]}  # fmt: skip
            return kind, ws_frame(json.dumps(msg).encode())
        if kind == "control":
            opcode = r.choice([9, 10, 8, 0, 3, 11, 15])
            return kind, ws_frame(r.randbytes(r.randint(0, 125)), opcode)
        if kind == "rsv":
            return kind, ws_frame(json.dumps(self.message()).encode(), rsv=r.randint(1, 7))
        if kind == "raw":
            return kind, r.randbytes(r.randint(1, 64))
        if kind == "claim":  # a header announcing far more than the frame limit, then little
            return kind, bytes([0x81, 0xFF]) + (2**40).to_bytes(8, "big") + os.urandom(4) + b"x" * 32  # fmt: skip
        if kind == "unmasked":
            return kind, ws_frame(b'{"type": "CALL"}', masked=False)
        # "split": a frame's first half now, the rest never
        whole = ws_frame(json.dumps(self.message()).encode())
        return kind, whole[: max(1, len(whole) // 2)]


@dataclass
class FuzzStats:
    frames: int = 0
    connections: int = 0
    closed_by_host: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)


def fuzz_connections(host: Host, fuzzer: Fuzzer, until: float, stats: FuzzStats, max_connections: int) -> None:  # fmt: skip
    """Fresh raw connections, each with a batch of 1 to 16 hostile frames, until *until*."""
    r = fuzzer.rng
    while time.monotonic() < until and stats.connections < max_connections:
        role = r.choice(ROLES)
        try:
            ws = RawWS(host.port, "/_/ws" if role == "browser" else "/_/uplink")
        except (OSError, ConnectionError) as exc:
            stats.refused[type(exc).__name__] += 1
            time.sleep(0.05)
            continue
        stats.connections += 1
        try:
            if role in ("server", "client"):
                reply = ws.hello(host.server_key if role == "server" else host.client_key)
                if not (isinstance(reply, dict) and "auth" in reply):
                    stats.refused[f"hello as {role}: {str(reply)[:60]}"] += 1
                    continue
            for _ in range(r.randint(1, 16)):
                kind, data = fuzzer.frame(role)
                if not ws.send(data):
                    stats.closed_by_host += 1
                    break
                stats.frames += 1
                stats.kinds[kind] += 1
                if not ws.poll():
                    stats.closed_by_host += 1
                    break
        finally:
            ws.close()


# ---------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Run:
    tmp: Path
    report: Report
    minutes: float
    seed: int
    serve_flags: frozenset[str]
    server_key: str = field(default_factory=lambda: "server_" + secrets.token_urlsafe(12))
    client_key: str = field(default_factory=lambda: "client_" + secrets.token_urlsafe(12))
    marker: str = field(default_factory=lambda: "legit-" + secrets.token_hex(4))

    def long(self, share: float, minimum: float) -> float:
        """Seconds for a long part: *share* of what the fixed scenarios leave of ``--minutes``."""
        return max(minimum, (self.minutes * 60 - 100) * share)

    def has(self, flag: str) -> bool:
        return flag in self.serve_flags


def until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def scenario_fuzz(run: Run) -> None:
    s, report = "fuzz", run.report
    duration = run.long(0.4, 20)
    with hosting(run, s) as (host, _, stack):
        callers = Callers(run, host, CALLERS, "f", stack)
        t0 = time.monotonic()
        fuzz_from, fuzz_to = t0 + 0.1 * duration, t0 + 0.9 * duration
        time.sleep(max(0.0, fuzz_from - time.monotonic()))
        stats = [FuzzStats() for _ in range(4)]
        threads = [
            threading.Thread(
                target=fuzz_connections,
                args=(host, Fuzzer(run.seed * 1000 + k, ["echo", "stats"]), fuzz_to, stats[k], 200_000),
                name=f"fuzz-{k}", daemon=True,
            )
            for k in range(len(stats))
        ]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, fuzz_to - time.monotonic()) + 30)
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        callers.stop()
        tally = callers.merged()
        alive = host.alive()
        kinds: collections.Counter[str] = collections.Counter()
        refused: collections.Counter[str] = collections.Counter()
        for st in stats:
            kinds.update(st.kinds)
            refused.update(st.refused)
        frames = sum(st.frames for st in stats)
        conns = sum(st.connections for st in stats)
        closed = sum(st.closed_by_host for st in stats)
        report.add(s, "frames fuzzed", f"{frames:,} in {fuzz_to - fuzz_from:.0f} s ({counts(kinds)})")  # fmt: skip
        report.add(s, "connections", f"{conns:,} ({closed:,} closed by the host mid-batch; failed to open or say hello: {counts(refused)})")  # fmt: skip
        report.add(s, "legit calls made", f"{tally.total:,} by {CALLERS} callers in {duration:.0f} s")  # fmt: skip
        try:
            provider = provider_stats(host)
            serving = True
        except Exception as exc:  # the figure is whether this works
            provider, serving = {}, False
            report.add(s, "new connection after fuzzing", f"failed: {exc}", False)
        report_integrity(run, s, tally, provider)
        report.add(s, "host alive at the end and serving a new connection", f"{alive} / {serving}", alive and serving)  # fmt: skip
        tracebacks = host.traceback_lines()
        report.add(s, "host log lines with 'Traceback'", f"{tracebacks} (log {host.log_bytes():,} bytes)", tracebacks == 0)  # fmt: skip


def scenario_load(run: Run) -> None:
    s, report = "load", run.report
    duration = run.long(0.4, 20)
    with hosting(run, s) as (host, _, stack):
        callers = Callers(run, host, CALLERS, "l", stack)
        rss_start, cpu0 = host.rss(), host.cpu()
        t0 = time.monotonic()
        rss_10k: int | None = None
        while time.monotonic() < t0 + duration:
            time.sleep(0.05)
            if rss_10k is None and callers.total() >= 10_000:
                rss_10k = host.rss()
        callers.stop()
        elapsed = time.monotonic() - t0
        rss_end, cpu = host.rss(), host.cpu() - cpu0
        tally = callers.merged()
        report.add(s, "calls total", f"{tally.total:,} in {elapsed:.0f} s ({tally.total / elapsed:,.0f} calls/s, host CPU {cpu / max(1, tally.total) * 1e6:,.0f} µs/call)")  # fmt: skip
        report_integrity(run, s, tally, provider_stats(host))
        if rss_10k is None:
            report.add(s, "host RSS start / after 10k calls / end", f"{mib(rss_start)} / (10k calls not reached) / {mib(rss_end)}")  # fmt: skip
        else:
            flat = rss_end <= rss_10k * 1.10 + 4 * MIB
            report.add(s, "host RSS start / after 10k calls / end", f"{mib(rss_start)} / {mib(rss_10k)} / {mib(rss_end)} ({'flat' if flat else 'growing'} after 10k)", flat)  # fmt: skip


def scenario_slow(run: Run) -> None:
    s, report = "slow", run.report
    window = run.long(0.1, 8)
    bound = 32 * MIB  # anvil_nb.core.limits.Limits.max_queued_bytes default
    flags = ["--max-queued-bytes", str(bound)] if run.has("--max-queued-bytes") else []
    pipelined = 300
    for n in (1, 4):
        with Host(run, s, flags) as host:
            with contextlib.ExitStack() as stack:
                stack.enter_context(Provider(run, host, ("echo", "blob")))
                bystander = connect(host.url, host.client_key, stack)
                for _ in range(20):  # warm: every path used once before the baseline
                    legit_call(bystander, "echo", ["warm"])
                    legit_call(bystander, "anvil.private.echo", ["warm"])
                base = host.rss()
                latencies: dict[str, list[float]] = {"echo": [], "anvil.private.echo": []}
                errors: collections.Counter[str] = collections.Counter()
                with RssSampler(host.pid) as sampler:
                    for i in range(n):
                        ws = RawWS(host.port, rcvbuf=4096, timeout=10)
                        stack.callback(ws.close)
                        reply = ws.hello(host.client_key)
                        if not (isinstance(reply, dict) and reply.get("auth") == "OK"):
                            raise RuntimeError(f"slow consumer {i}: hello refused: {reply!r}")
                        batch = b"".join(
                            ws_frame(json.dumps({"type": "CALL", "id": f"s{i}-{k}", "command": "blob", "args": [MIB], "kwargs": {}}).encode())
                            for k in range(pipelined)
                        )  # fmt: skip
                        if not ws.send(batch):
                            raise RuntimeError(f"slow consumer {i}: could not send its calls")
                    end = time.monotonic() + window
                    k = 0
                    while time.monotonic() < end and k < 1_000_000:
                        command = "echo" if k % 2 == 0 else "anvil.private.echo"
                        k += 1
                        t0 = time.perf_counter()
                        kind, _ = legit_call(bystander, command, [k], timeout=window + 5)
                        if kind == "ok":
                            latencies[command].append(time.perf_counter() - t0)
                        else:
                            errors[f"{command}: {kind}"] += 1
                        time.sleep(0.01)
                    peak = sampler.peak
                held = host.rss()
                in_flight = sorted(
                    (p["calls_in_flight"] for p in admin_state(host)["peers"] if p.get("kind") == "client_uplink"),
                    reverse=True,
                )[:n]  # fmt: skip
                grown = peak - base
                limit = n * 2 * bound + 64 * MIB
                report.add(s, f"host RSS peak, {n} slow consumer(s)", f"{mib(base)} -> {mib(peak)} (+{mib(grown)}; each pipelined {pipelined} calls returning 1 MiB; queue bound {mib(bound)}/connection)", grown <= limit)  # fmt: skip
                report.add(s, f"host RSS held at the end of the {window:.0f} s window, {n} slow consumer(s)", f"{mib(held)} (+{mib(held - base)}); their calls still in flight on the host: {in_flight}")  # fmt: skip
                for command, xs in latencies.items():
                    xs.sort()
                    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else float("nan")
                    report.add(
                        s, f"bystander {command} latency, {n} slow consumer(s)",
                        f"{spread(xs, 'ms', 1e3, 1)}, p99 {p99 * 1e3:,.1f} ms over {len(xs)} calls",
                        bool(xs) and max(xs) < 1.0,
                    )  # fmt: skip
                report.add(s, f"bystander errors, {n} slow consumer(s)", counts(errors), not errors)
            time.sleep(3)  # consumers, bystander and provider gone; the host stays
            report.add(s, f"host RSS 3 s after the {n} consumer(s) left", mib(host.rss()))
            finish_host(run, s, host)


def admin_state(host: Host) -> dict[str, Any]:
    """The host's ``_/admin/state`` (registrations and peers), with the server key."""
    request = urllib.request.Request(
        host.url.replace("ws://", "http://").replace("/_/uplink", "/_/admin/state"),
        headers={"Authorization": f"Bearer {host.server_key}"},
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.loads(response.read())


def provider_count(client: Client) -> int:
    kind, stats = legit_call(client, "stats", [], timeout=5)
    return int(stats["slow_in"]) if kind == "ok" and isinstance(stats, dict) else -1


def pending_failures(host: Host, provider: Provider, sig: int, wait: float, stack: contextlib.ExitStack) -> tuple[list[float], collections.Counter[str]]:  # fmt: skip
    """16 callers in ``slow(60)``; *sig* to the provider; the seconds each took to fail."""
    clients = [connect(host.url, host.client_key, stack) for _ in range(CALLERS)]
    watcher = connect(host.url, host.client_key, stack)
    before = provider_count(watcher)
    done: list[float | None] = [None] * CALLERS
    futures = [c.send_call("slow", [60], {}, wait=False) for c in clients]
    for i, fut in enumerate(futures):
        fut.add_done_callback(lambda _f, i=i: done.__setitem__(i, time.perf_counter()))
    if not until(lambda: provider_count(watcher) >= before + CALLERS, WAIT, 0.1):
        raise RuntimeError("the provider never had all the slow calls running")
    t0 = time.perf_counter()
    os.kill(provider.pid, sig)
    until(lambda: all(d is not None for d in done), wait, 0.01)
    kinds = collections.Counter(outcome(f)[0] if f.done() else "still pending" for f in futures)
    return [d - t0 for d in done if d is not None], kinds


@contextlib.contextmanager
def hosting(run: Run, s: str, names: Sequence[str] = ("echo",), flags: Sequence[str] = ()) -> Iterator[tuple[Host, Provider, contextlib.ExitStack]]:  # fmt: skip
    """A host (with *flags*) and a provider of *names*, and a stack for what the scenario opens.

    At the end of the ``with`` block the stack is closed, the provider stopped, and the host
    finished (:func:`finish_host`: its exit status and log are figures too).
    """
    with Host(run, s, flags) as host:
        with contextlib.ExitStack() as stack:
            provider = stack.enter_context(Provider(run, host, names))
            yield host, provider, stack
        finish_host(run, s, host)


@contextlib.contextmanager
def provider_lost(run: Run, s: str, sig: int, wait: float, flags: Sequence[str] = ()) -> Iterator[tuple[list[float], collections.Counter[str]]]:  # fmt: skip
    """A host (with *flags*) and a provider of ``echo`` and ``slow``; the provider gets *sig*
    while 16 callers wait in ``slow``: yields how long each caller took to fail, and how.

    The provider is gone by then (a stopped one is killed: it would not see SIGTERM); the host
    is finished (:func:`finish_host`) after the ``with`` block.
    """
    with hosting(run, s, ("echo", "slow"), flags) as (host, provider, stack):
        failures = pending_failures(host, provider, sig, wait, stack)
        if sig == signal.SIGSTOP:
            os.kill(provider.pid, signal.SIGKILL)
        yield failures


def scenario_provider_death(run: Run) -> None:
    s = "provider-death"
    with provider_lost(run, s, signal.SIGKILL, 20) as (times, kinds):
        good = kinds["UplinkDisconnectedError"] == CALLERS and max(times, default=99) < 2.0
        run.report.add(
            s, f"ms until all {CALLERS} pending callers failed after SIGKILL",
            f"{spread(times, 'ms', 1e3)} ({counts(kinds)})", good,
        )  # fmt: skip


def scenario_provider_freeze(run: Run) -> None:
    s = "provider-freeze"
    cases: list[tuple[str, list[str], float]] = [("default pings (10 s + 15 s)", [], 25.0)]
    if run.has("--ping-interval") and run.has("--ping-timeout"):
        cases.append(("--ping-interval 1 --ping-timeout 2", ["--ping-interval", "1", "--ping-timeout", "2"], 3.0))  # fmt: skip
    else:
        run.report.add(s, "--ping-interval/--ping-timeout", "not supported by this anvil-nb serve")
    for label, flags, expected in cases:
        with provider_lost(run, s, signal.SIGSTOP, expected + 20, flags) as (times, kinds):
            good = (
                kinds["UplinkDisconnectedError"] == CALLERS
                and max(times, default=99) <= expected + 1.5
            )
            run.report.add(
                s, f"s until {CALLERS} pending callers failed after SIGSTOP, {label}",
                f"{spread(times, 's', 1, 1)} ({counts(kinds)}; expected <= {expected:g} s)", good,
            )  # fmt: skip


def scenario_restart(run: Run) -> None:
    s, report = "restart", run.report
    kills = 3
    with hosting(run, s) as (host, _, stack):
        callers = Callers(run, host, CALLERS, "r", stack, keep_events=True)
        time.sleep(3)
        windows: list[tuple[float, float, float]] = []  # (kill, ready, every caller back)
        for _ in range(kills):
            t_kill = time.monotonic()
            host.kill()
            ready = host.start()
            until(lambda ready=ready: all(t.last_ok > ready for t in callers.tallies), 40, 0.02)
            windows.append((t_kill, ready, time.monotonic()))
            time.sleep(3)
        callers.stop()
        first: list[float] = []
        every: list[float] = []
        for k, (_, ready, _) in enumerate(windows):
            nxt = windows[k + 1][0] if k + 1 < len(windows) else float("inf")
            per_caller = []
            for tally in callers.tallies:
                assert tally.events is not None
                oks = [t1 for (_, t1, kind) in tally.events if kind == "ok" and ready < t1 < nxt]
                per_caller.append(min(oks) - ready if oks else float("inf"))
            first.append(min(per_caller))
            every.append(max(per_caller))
        in_flight: collections.Counter[str] = collections.Counter()
        outage: collections.Counter[str] = collections.Counter()
        lost: collections.Counter[str] = collections.Counter()
        for tally in callers.tallies:
            assert tally.events is not None
            for t0, t1, kind in tally.events:
                if kind == "ok":
                    continue
                w = next((w for w in reversed(windows) if t1 >= w[0]), None)
                if kind in ("hung", "mismatched") or w is None:
                    lost[kind] += 1  # hung, wrong, or failed while no host was killed
                elif kind == "UplinkDisconnectedError" and t0 < w[1]:
                    in_flight[kind] += 1  # sent before the new host was up
                elif t0 < w[2]:
                    outage[kind] += 1  # made before every caller was back
                else:
                    lost[kind] += 1
        tally = callers.merged()
        stats = provider_stats(host)
        n_in = sum(in_flight.values())
        n_lost = sum(lost.values())
        report.add(s, "s from the new host's ready line to the first successful call", ", ".join(f"{x:.2f}" for x in first), max(first) < 15)  # fmt: skip
        report.add(s, "s from the ready line until every caller had a successful call", ", ".join(f"{x:.2f}" for x in every), max(every) < 25)  # fmt: skip
        report.add(s, "calls total", f"{tally.total:,} over {kills} kills")
        report.add(s, "calls in flight at a kill that failed", f"{n_in} ({counts(in_flight)}; at most {CALLERS} per kill)", n_in <= CALLERS * kills)  # fmt: skip
        report.add(s, "errors of calls made before every caller was back", counts(outage))
        report.add(s, "calls lost otherwise / duplicated / mismatched", f"{n_lost} ({counts(lost)}) / {stats.get('dups')} / {tally.kinds['mismatched']}", n_lost == 0 and stats.get("dups") == 0)  # fmt: skip


def connect_and_call(host: Host, timeout: float) -> str:
    """``"ok in 0.12 s"`` or what went wrong, for a fresh client-key connection calling echo."""
    t0 = time.monotonic()
    client = None
    try:
        client = Client(
            WebSocketTransport(host.url, host.client_key, connect_timeout=timeout, reconnect=False),
            functions=FunctionRegistry(),
        ).start(timeout)
        kind, got = legit_call(client, "echo", ["fds"], timeout=timeout)
        if kind != "ok" or got != "fds":
            return f"call failed: {kind} after {time.monotonic() - t0:.1f} s"
        return f"ok in {time.monotonic() - t0:.2f} s"
    except Exception as exc:  # the figure is whether this works
        return f"failed after {time.monotonic() - t0:.1f} s: {type(exc).__name__}: {str(exc)[:100]}"
    finally:
        if client is not None:
            client.close()


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()
    socks.clear()


def scenario_fds(run: Run) -> None:
    s, report = "fds", run.report
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        report.add(s, "prlimit", "not installed: skipped")
        return
    handshake = 10.0 if run.has("--handshake-timeout") else None
    flags = ["--handshake-timeout", f"{handshake:g}"] if handshake else []
    idle: list[socket.socket] = []
    with Host(run, s, flags, [prlimit, "--nofile=128:128"]) as host:
        with contextlib.ExitStack() as stack:
            stack.enter_context(Provider(run, host, ("echo",)))
            stack.callback(close_all, idle)
            base_fds, log0 = host.fds(), host.log_bytes()
            for _ in range(200):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                idle.append(sock)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", host.port))
            time.sleep(0.5)
            cpu0, logged0 = host.cpu(), host.log_bytes()
            time.sleep(2.5)
            fds = host.fds()
            time.sleep(2.5)
            cpu, grown = host.cpu() - cpu0, host.log_bytes() - logged0
            report.add(s, "host fds: before / with 200 idle sockets (limit 128)", f"{base_fds} / {fds}", fds >= 120)  # fmt: skip
            report.add(s, "host CPU seconds over 5 s with 200 idle sockets", f"{cpu:.2f}", cpu < 0.5)  # fmt: skip
            report.add(s, "host log bytes grown over those 5 s", f"{grown:,}", grown < 10_000)
            report.add(s, "legit client connects and calls during the flood", connect_and_call(host, 20))  # fmt: skip
            if handshake:
                t0 = time.monotonic()
                freed = until(lambda: host.fds() <= base_fds + 4, 3 * handshake + 15, 0.2)
                report.add(s, f"host closed the idle sockets (--handshake-timeout {handshake:g})", f"{'yes' if freed else 'no'}: {host.fds()} fds, {time.monotonic() - t0:.1f} s later", freed)  # fmt: skip
                result = connect_and_call(host, 20)
                report.add(s, "legit client connects and calls after the handshake timeout", result, result.startswith("ok"))  # fmt: skip
            else:
                report.add(s, "--handshake-timeout", "not supported by this anvil-nb serve")
            close_all(idle)
            until(lambda: host.fds() <= base_fds + 4, 10, 0.2)
            result = connect_and_call(host, 20)
            report.add(s, "legit client connects and calls after the idle sockets closed", result, result.startswith("ok"))  # fmt: skip
            report.add(s, "host alive; log bytes grown in the whole scenario", f"{host.alive()}; {host.log_bytes() - log0:,}", host.alive())  # fmt: skip
        finish_host(run, s, host)


RUNNERS: dict[str, Callable[[Run], None]] = {
    "fuzz": scenario_fuzz,
    "load": scenario_load,
    "slow": scenario_slow,
    "provider-death": scenario_provider_death,
    "provider-freeze": scenario_provider_freeze,
    "restart": scenario_restart,
    "fds": scenario_fds,
}


def serve_flags() -> frozenset[str]:
    """The ``--flags`` this version of ``anvil-nb serve`` has."""
    out = subprocess.run(
        [PYTHON, "-m", "anvil_nb", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    return frozenset(re.findall(r"(--[a-z][a-z-]+)", out))


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to this process unwinds like Ctrl-C, so every child is stopped."""

    def handler(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="target run time (default 4; scales fuzz, load and slow)")  # fmt: skip
    parser.add_argument("--only", default="", help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="fuzzer seed (default 1)")
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()] or list(SCENARIOS)
    unknown = [x for x in only if x not in RUNNERS]
    if unknown or args.minutes <= 0:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}" if unknown else "--minutes must be positive")  # fmt: skip
    report = Report()
    started = time.monotonic()
    flags = serve_flags()
    wanted = ["--max-queued-bytes", "--max-calls-in-flight", "--handshake-timeout", "--ping-interval", "--ping-timeout"]  # fmt: skip
    missing = [f for f in wanted if f not in flags]
    print(f"soak: {', '.join(only)}; --minutes {args.minutes:g}, seed {args.seed}; {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")  # fmt: skip
    if missing:
        print(f"anvil-nb serve has no {', '.join(missing)}: figures that need them are skipped")
    interrupted = False
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="anvil_nb-soak-") as tmp:
        run = Run(Path(tmp), report, args.minutes, args.seed, flags)
        try:
            for name in only:
                t0 = time.monotonic()
                print(f"\n== {name}", flush=True)
                try:
                    RUNNERS[name](run)
                except Exception as exc:  # one scenario's failure is a figure; the rest still run
                    report.add(name, "scenario failed", f"{type(exc).__name__}: {str(exc)[:300]}", False)  # fmt: skip
                print(f"({name}: {time.monotonic() - t0:.0f} s)", flush=True)
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: children stopped; figures so far:", flush=True)
    print(f"\n{report.table()}\n")
    print(f"total run time {time.monotonic() - started:.0f} s; {len(report.bad)} BAD figure(s)")
    return 130 if interrupted else (1 if report.bad else 0)


if __name__ == "__main__":
    sys.exit(main())
