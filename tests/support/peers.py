"""Peers of a real ``anvil-nb serve`` for the reliability suite: providers and callers.

``ProviderProc`` is a provider in a process of its own, with the server key: anvil_nb's client
or the unmodified ``anvil-uplink``, serving the same few functions. ``CallLoop`` is a
client-key caller in this process that calls a provider's function back to back on a thread of
its own and records every answer. (The host itself is ``support.processes.ServeProc``; raw
WebSocket peers are ``support.ws.RawWS``.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from support.processes import ServeProc, close_piped, start_piped, tail

__all__ = ["WAIT", "CallLoop", "ProviderProc"]

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
        self.proc, self._lines, self._log = start_piped(
            [sys.executable, str(script), mode, host.server_key, host.url],
            self.log_path,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + WAIT
        while True:
            line = self._lines.next(deadline)
            if line is None:
                self.stop()
                pytest.fail(f"{mode} provider exited:\n{tail(self.log_path)}")
            if line == "READY":
                break

    def stop(self) -> None:
        close_piped(self.proc, self._lines, self._log)


class CallLoop:
    """A client-key caller calling ``command([tag, i])`` back to back, on a thread of its own.

    ``ok`` holds the time of every answer that is the call's own (``[tag, i]`` back, as an echo
    gives it), ``wrong`` every other answer and every exception but those of the types in
    *outage*; ``failed`` holds ``(time, type name)`` of each of those (after which the loop
    pauses, as a script's retry loop would). :meth:`close` stops the thread and the client.
    """

    def __init__(
        self,
        host: ServeProc,
        command: str,
        tag: Any,
        outage: tuple[type[BaseException], ...] = (),
    ):
        self.command, self.tag, self.outage = command, tag, outage
        self.client = Client(
            WebSocketTransport(host.url, host.client_key), functions=FunctionRegistry()
        ).start()
        self.ok: list[float] = []
        self.failed: list[tuple[float, str]] = []
        self.wrong: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                got = self.client.call(self.command, [self.tag, i])
            except self.outage as exc:
                self.failed.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.05)  # a retry loop's pause, as a script would have
                continue
            except Exception as exc:  # a lost call is a failure of the test
                self.wrong.append(repr(exc))
                continue
            if got == [self.tag, i]:
                self.ok.append(time.monotonic())
            else:
                self.wrong.append(got)

    def close(self, timeout: float = WAIT) -> None:
        self.stop.set()
        self.thread.join(timeout)
        self.client.close()
