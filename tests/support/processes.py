"""Subprocesses of a test: line reading with deadlines, stopping and reaping, log tails, ports.

``Lines`` reads a stream on a daemon thread so that every read has a deadline; ``stop_process``
stops and reaps a child (SIGKILL after a bounded wait); ``start_piped`` starts a child with its
stdout read by ``Lines`` and its stderr in a log file, and ``close_piped`` stops it and closes
those; ``tail`` gives the end of a log for failure messages; ``free_port`` a port on 127.0.0.1
that nothing listens on. ``ServeProc`` is a real ``python -m anvil_nb serve`` on an ephemeral
port (fresh keys, a data dir and log under the test's temp dir), which the ``serve_proc``
fixture starts and stops.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

__all__ = [
    "WAIT",
    "Lines",
    "ServeProc",
    "close_piped",
    "free_port",
    "start_piped",
    "stop_process",
    "tail",
]

#: Seconds to wait for a subprocess to start.
WAIT = 20.0


def tail(path: Path, n: int = 60) -> str:
    """The last *n* lines of a log file (for failure messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Lines:
    """Lines of a stream, read by a daemon thread into a queue so that reads can time out."""

    def __init__(self, stream: Any):
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed under us during teardown
            for line in stream:
                self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def next(self, deadline: float) -> str | None:
        """The next line; ``None`` at EOF (and after); raises ``queue.Empty`` at the deadline."""
        line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            self.queue.put(None)  # stay at EOF
        return line


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGKILL, wait: float = 5.0
) -> int | None:
    """Stop *proc* (if still running) and reap it; its exit status, or None if it would not die."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return None


def start_piped(
    args: list[str], log_path: Path, **popen_kw: Any
) -> tuple[subprocess.Popen[str], Lines, IO[str]]:
    """Start *args* in text mode, its stdout read by :class:`Lines` and its stderr into *log_path*.

    Returns the process, its lines and the open log file, for :func:`close_piped`; *popen_kw*
    (``stdin``, ``env``, ``cwd``) go to :class:`subprocess.Popen`.
    """
    log = open(log_path, "w")  # noqa: SIM115 - closed by close_piped
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, **popen_kw)
    return proc, Lines(proc.stdout), log


def close_piped(
    proc: subprocess.Popen[Any],
    lines: Lines,
    log: IO[Any] | None = None,
    sig: int = signal.SIGKILL,
    wait: float = 5.0,
    close_stdin: bool = False,
) -> int | None:
    """Stop and reap *proc*, then close its stdout (read by *lines*) and its *log* file.

    ``close_stdin`` closes its stdin first (a child that reads its orders from stdin exits at
    end of file, if it is quick about it). Returns the exit status, as :func:`stop_process`.
    """
    if close_stdin:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.close()  # type: ignore[union-attr]
    code = stop_process(proc, sig, wait=wait)
    lines.thread.join(timeout=5)
    with contextlib.suppress(OSError):
        proc.stdout.close()  # type: ignore[union-attr]
    if log is not None:
        log.close()
    return code


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_READY = re.compile(
    r"anvil_nb host ready at (http://127\.0\.0\.1:(\d+)/) \(uplink (ws://127\.0\.0\.1:\d+/_/uplink)\)"
)


class ServeProc:
    """A running ``python -m anvil_nb serve`` (stdout read for the ready line, stderr to a log)."""

    def __init__(self, base: Path, flags: tuple[str, ...] = (), port: int = 0, **env: str):
        self.base = base
        self.data_dir = base / "data"
        self.flags = flags
        self.env = env
        self.server_key = "server_" + secrets.token_urlsafe(12)
        self.client_key = "client_" + secrets.token_urlsafe(12)
        self.starts = 0
        self.base.mkdir(parents=True, exist_ok=True)
        self._start(port)

    def _start(self, port: int, prefix: list[str] | None = None) -> None:
        self.starts += 1
        self.log_path = self.base / f"host-{self.starts}.log"
        cmd = [
            *(prefix or []),
            sys.executable, "-m", "anvil_nb", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--server-key", self.server_key, "--client-key", self.client_key,
            "--data-dir", str(self.data_dir), *self.flags,
        ]  # fmt: skip
        self.proc, self._lines, self._log = start_piped(
            cmd, self.log_path, stdin=subprocess.DEVNULL, env={**os.environ, **self.env}
        )
        try:
            line = self._lines.next(time.monotonic() + WAIT)
        except queue.Empty:
            line = "(nothing within the timeout)"
        m = _READY.fullmatch(line or "")
        if m is None:
            self.stop()
            pytest.fail(f"anvil-nb serve did not start: {line!r}\n{tail(self.log_path)}")
        self.http_url, self.port, self.url = m.group(1), int(m.group(2)), m.group(3)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Stop (SIGKILL by default: a crash) and start again on the same port and data dir."""
        self.stop(sig)
        self._start(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return close_piped(self.proc, self._lines, self._log, sig, wait=10.0)

    def log(self) -> str:
        """The current log (whole); see :func:`tail` for failure messages."""
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The host's resident memory now (from /proc)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        """User + system CPU time the host has used (from /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))
