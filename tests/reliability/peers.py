"""Peers for the reliability suite: a real ``anvil-nb serve`` subprocess and raw WebSocket clients.

``ServeProc`` starts ``python -m anvil_nb serve`` on 127.0.0.1 and an ephemeral port (fresh keys,
a temp data dir, its log in a temp file); ``restart()`` starts it again on the same port, keys
and data dir. ``RawWS`` speaks exactly the frames a test wants, on a loop thread of its own,
with bounded waits everywhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support import Lines, RawWS, ServeProc, stop_process, tail

__all__ = ["WAIT", "ProviderProc", "RawWS", "ServeProc"]

#: Seconds to wait for any one thing.
WAIT = 20.0


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
