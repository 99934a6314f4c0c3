"""Peers for the reliability suite: a real ``anvil-nb serve`` subprocess and raw WebSocket clients.

``ServeProc`` starts ``python -m anvil_nb serve`` on 127.0.0.1 and an ephemeral port (fresh keys,
a temp data dir, its log in a temp file); ``restart()`` starts it again on the same port, keys
and data dir. ``RawWS`` speaks exactly the frames a test wants, on a loop thread of its own,
with bounded waits everywhere.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import Lines, RawWS, stop_process, tail

__all__ = ["WAIT", "ProviderProc", "RawWS", "ServeProc"]

#: Seconds to wait for any one thing.
WAIT = 20.0
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
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        cmd = [
            *(prefix or []),
            sys.executable, "-m", "anvil_nb", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--server-key", self.server_key, "--client-key", self.client_key,
            "--data-dir", str(self.data_dir), *self.flags,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **self.env},
        )
        self._lines = Lines(self.proc.stdout)
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
        code = stop_process(self.proc, sig, wait=10.0)
        self._lines.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()  # type: ignore[union-attr]
        self._log.close()
        return code

    def log(self) -> str:
        """The current log (whole); see :func:`support.tail` for failure messages."""
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


PROVIDER = textwrap.dedent(
    """
    import sys, threading, time
    if sys.argv[1] == "real":
        import anvil.server as server
        import anvil._threaded_server as _ts

        def session():  # anvil-uplink 0.7.0 has no anvil.server.session
            return _ts.call_info.session
    else:
        from anvil_nb import server

        def session():
            return server.session

    @server.callable
    def whoami():
        ctx = server.context
        return {
            "trusted": ctx.remote_caller.is_trusted,
            "caller": ctx.remote_caller.type,
            "client": ctx.client.type,
            "session": dict(session()),
        }

    @server.callable
    def echo(x):
        return x

    @server.callable
    def text(n):
        return "x" * n

    @server.callable
    def slow(seconds):
        time.sleep(seconds)  # the work of the call, not a synchronisation
        return "slept"

    @server.callable
    def remember(key, value):
        session()[key] = value

    server.connect(sys.argv[2], url=sys.argv[3], quiet=True)
    print("READY", flush=True)
    threading.Event().wait()
    """
)


class ProviderProc:
    """A provider process with the server key: anvil_nb's client (``"nb"``) or the real
    ``anvil-uplink`` (``"real"``), serving ``whoami``, ``echo``, ``text``, ``slow``, ``remember``.
    """

    def __init__(self, mode: str, host: ServeProc, base: Path, uplink_dir: Path | None):
        script = base / "provider.py"
        script.write_text(PROVIDER)
        env = dict(os.environ)
        if mode == "real":
            env["PYTHONPATH"] = str(uplink_dir)
        self.log_path = base / f"provider-{mode}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(script), mode, host.server_key, host.url],
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self._lines = lines = Lines(self.proc.stdout)
        deadline = time.monotonic() + WAIT
        while True:
            line = lines.next(deadline)
            if line is None:
                self.stop()
                pytest.fail(f"{mode} provider exited:\n{tail(self.log_path)}")
            if line == "READY":
                break

    def stop(self) -> None:
        stop_process(self.proc)
        self._lines.thread.join(timeout=5)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._log.close()
