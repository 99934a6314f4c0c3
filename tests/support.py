"""Helpers for tests that run subprocesses: line reading with deadlines, stopping, log tails."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["Lines", "stop_process", "tail"]


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
