"""Restart under load: the host is killed and started again while callers keep calling.

Eight anvil_nb callers (client key) call ``echo`` back to back through a real ``anvil-nb
serve`` to a provider (anvil_nb's client or the unmodified ``anvil-uplink``). The host is
SIGKILLed mid-stream and started again on the same port and data dir. During the outage calls
fail (``UplinkDisconnectedError`` for those in flight, ``AppOfflineError`` or a wait for the
rest, ``NoServerFunctionError`` while a caller is back before the provider has registered); after it every caller and the provider are back by themselves, every answer is the
caller's own (none mismatched or duplicated), and no caller is left failing.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import WAIT, ProviderProc, ServeProc

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core.errors import AppOfflineError, NoServerFunctionError, UplinkDisconnectedError

CALLERS = 8


class Caller:
    """A thread calling ``echo`` back to back, recording what came back and when."""

    def __init__(self, n: int, host: ServeProc):
        self.n = n
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
                got = self.client.call("echo", [self.n, i])
            except (UplinkDisconnectedError, AppOfflineError, NoServerFunctionError) as exc:
                # the outage: in flight at the kill, host down, or the provider not back yet
                self.failed.append((time.monotonic(), type(exc).__name__))
                time.sleep(0.05)  # a retry loop's pause, as a script would have
                continue
            except Exception as exc:
                self.wrong.append(repr(exc))
                continue
            if got == [self.n, i]:
                self.ok.append(time.monotonic())
            else:
                self.wrong.append(got)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        self.client.close()


@pytest.fixture(params=["nb", "real"])
def loaded(
    request: pytest.FixtureRequest, serve_proc: Any, tmp_path: Path
) -> Iterator[tuple[ServeProc, list[Caller]]]:
    uplink_dir = request.getfixturevalue("anvil_uplink_dir") if request.param == "real" else None
    host = serve_proc()
    provider = ProviderProc(request.param, host, tmp_path, uplink_dir)
    callers: list[Caller] = []
    try:
        callers = [Caller(n, host) for n in range(CALLERS)]
        yield host, callers
    finally:
        for caller in callers:
            caller.close()
        provider.stop()


def test_callers_and_providers_come_back_after_a_host_restart_under_load(loaded):
    host, callers = loaded
    deadline = time.monotonic() + WAIT
    while min(len(c.ok) for c in callers) < 20:
        assert time.monotonic() < deadline, "the load never got going"
        time.sleep(0.05)
    host.restart(signal.SIGKILL)
    restarted = time.monotonic()
    for caller in callers:
        mark = len(caller.ok)
        deadline = time.monotonic() + 30
        while len(caller.ok) < mark + 20:  # twenty more answers after the restart
            assert time.monotonic() < deadline, (
                f"caller {caller.n} did not recover within 30 s; "
                f"failures: {caller.failed[-3:]}\n{host.log()[-2000:]}"
            )
            time.sleep(0.05)
    recovered = max(next(t for t in c.ok if t > restarted) for c in callers) - restarted
    for caller in callers:
        assert caller.wrong == [], caller.wrong[:5]
        late = [f for f in caller.failed if f[0] > restarted + recovered]
        assert late == [], f"caller {caller.n} failed after it had recovered: {late[:3]}"
    print(f"all {CALLERS} callers answered again {recovered:.2f} s after the restart")
