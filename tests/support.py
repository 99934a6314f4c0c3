"""Helpers for tests that run subprocesses: line reading with deadlines, stopping, log tails."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import platformdirs
import pytest
import tornado.websocket

__all__ = [
    "ANVIL_UPLINK_VERSION",
    "Lines",
    "install_anvil_uplink",
    "RawWS",
    "ServeProc",
    "stop_process",
    "tail",
    "wait_until",
]

ANVIL_UPLINK_VERSION = "0.7.0"
#: Outside the checkout (tests write nothing into it): the user's cache folder, shared with
#: tutorial 05, which installs the same client the same way.
UPLINK_DIR = Path(platformdirs.user_cache_dir("anvil_nb")) / f"anvil-uplink-{ANVIL_UPLINK_VERSION}"


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


# ---------------------------------------------------------------------------------------------
# Installing anvil-uplink out of the venv


def install_anvil_uplink() -> Path:
    """The folder holding the real anvil-uplink (installed there once with ``pip --target``)."""
    marker = UPLINK_DIR / f"anvil_uplink-{ANVIL_UPLINK_VERSION}.dist-info"
    if marker.is_dir():
        return UPLINK_DIR
    UPLINK_DIR.parent.mkdir(parents=True, exist_ok=True)
    lock_path = UPLINK_DIR.with_name(UPLINK_DIR.name + ".lock")
    with open(lock_path, "w") as lock:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{lock_path} stayed locked for 300 s (another install hung?)")
                threading.Event().wait(0.2)  # poll the lock; no other process to wait on
        try:
            if marker.is_dir():  # another process installed it while we waited
                return UPLINK_DIR
            staging = UPLINK_DIR.with_name(f"{UPLINK_DIR.name}.tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            cmd = [
                sys.executable, "-m", "pip", "install", "--disable-pip-version-check",
                "--no-input", "--quiet", "--target", str(staging),
                f"anvil-uplink=={ANVIL_UPLINK_VERSION}",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
            if proc.returncode != 0:
                shutil.rmtree(staging, ignore_errors=True)
                pytest.fail(f"installing anvil-uplink failed:\n{proc.stdout}\n{proc.stderr}")
            shutil.rmtree(UPLINK_DIR, ignore_errors=True)
            staging.rename(UPLINK_DIR)  # atomic: the marker appears only for a full install
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return UPLINK_DIR


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll *predicate* until it is true (True) or *timeout* seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


#: Seconds a raw WebSocket peer waits for anything.
WAIT = 20.0


class RawWS:
    """A bare WebSocket client on a loop thread of its own: sends exactly what a test wants.

    ``recv()`` returns decoded JSON frames (bytes for binary frames, ``None`` once closed);
    every wait is bounded by ``WAIT`` unless given.
    """

    def __init__(self, url: str, max_message_size: int = 64 * 1024 * 1024):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.frames: queue.Queue[Any] = queue.Queue()
        self._stashed: dict[Any, Any] = {}
        self.ws = self._run(self._connect(url, max_message_size))
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), self.loop)

    @staticmethod
    async def _connect(url: str, max_message_size: int) -> Any:
        return await tornado.websocket.websocket_connect(url, max_message_size=max_message_size)

    def _run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _read(self) -> None:
        while True:
            frame = await self.ws.read_message()
            self.frames.put(frame)
            if frame is None:
                return

    def send(self, frame: Any, binary: bool = False) -> None:
        data = frame if isinstance(frame, (str, bytes)) else orjson.dumps(frame)
        self._run(self._write(data, binary))

    def send_nowait(self, frame: Any) -> None:
        """Queue a frame without waiting for it to be written (for pipelining many)."""
        data = frame if isinstance(frame, (str, bytes)) else orjson.dumps(frame)
        self.loop.call_soon_threadsafe(self._write_quietly, data)

    def _write_quietly(self, data: Any) -> None:
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.ws.write_message(data)

    async def _write(self, data: Any, binary: bool) -> None:
        await self.ws.write_message(data, binary=binary)

    def hello(self, key: str) -> dict[str, Any]:
        self.send({"key": key, "v": 8})
        return self.recv()

    def recv(self, timeout: float = WAIT) -> Any:
        frame = self.frames.get(timeout=timeout)
        if frame is None:
            self.frames.put(None)
            return None
        return orjson.loads(frame) if isinstance(frame, str) else frame

    def response(self, call_id: Any, timeout: float = WAIT) -> dict[str, Any]:
        """The response to *call_id*; other frames read meanwhile are kept for later calls."""
        if call_id in self._stashed:
            return self._stashed.pop(call_id)
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg is None:
                raise AssertionError(f"connection closed before the response to {call_id!r}")
            if isinstance(msg, dict) and msg.get("id") == call_id:
                return msg
            if isinstance(msg, dict) and "id" in msg and len(self._stashed) < 100_000:
                self._stashed[msg["id"]] = msg

    def closed(self, timeout: float = WAIT) -> bool:
        """True once the server has closed the connection (waiting at most *timeout*)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                frame = self.frames.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if frame is None:
                self.frames.put(None)
                return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.call_soon_threadsafe(self.ws.close)
        self._reader.cancel()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


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
