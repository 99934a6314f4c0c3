"""anvil_nb's client converges after a host restart, and stops only when its key is refused.

Real parts: a real ``anvil-nb serve`` subprocess (restarted on the same port and data dir with
SIGKILL, as a crash), anvil_nb clients over the network, and a subprocess that uses
``server.connect`` exactly as a user script would.

* F2: a provider busy in a call while the host crashes reconnects, registers again and serves
  new callers; its late answer is dropped on its side (the new host never sees it). A fatal
  frame that is not a key refusal ends one connection, not the client.
* F4: a process that called ``server.connect`` rides out a host restart and never starts an
  embedded host; during an outage its calls wait a bounded time, then raise
  ``AppOfflineError`` naming the host.
* A refused key stops the client for good: every call says so at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.gates import Gate
from support.peers import WAIT
from support.processes import close_piped, start_piped, tail
from support.waiting import wait_until

from anvil_nb import runtime, server
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core.errors import (
    AppOfflineError,
    NoServerFunctionError,
    UplinkDisconnectedError,
)

#: Seconds within which a client must be back after the host is: the reconnection delay
#: (1 s, then 2 s if the host was not up yet, ...) plus the host's start-up, with slack.
RECOVERY = 25.0


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    """``clients(url, key, registry=None, **client_kw) -> Client``, all closed at the end."""
    made: list[Client] = []

    def make(url: str, key: str, registry: FunctionRegistry | None = None, **kw: Any) -> Client:
        client = Client(
            WebSocketTransport(url, key), functions=registry or FunctionRegistry(), **kw
        )
        made.append(client)
        return client.start()

    yield make
    for client in made:
        client.close()


def ping_from(client: Client, expected: Any) -> bool:
    return client.call("ping") == expected


# ---------------------------------------------------------------------------------------------
# F2: providers come back


def test_a_provider_busy_while_the_host_crashes_serves_again_after_the_restart(
    serve_proc, clients, caplog
):
    caplog.set_level(logging.INFO, logger="anvil_nb.client.client")
    host = serve_proc()
    slow = Gate("late", timeout=WAIT)
    started, release = slow.started, slow.release
    registry = FunctionRegistry()
    registry.register("slow", slow)
    registry.register("ping", lambda: "pong")
    provider = clients(host.url, host.server_key, registry)
    caller = clients(host.url, host.client_key)
    pending = caller.send_call("slow", [], {})
    assert started.wait(WAIT)

    host.restart()  # SIGKILL while the provider is inside "slow"

    with pytest.raises(UplinkDisconnectedError):  # the caller's call in flight fails
        pending.result(WAIT)
    wait_until(lambda: provider.connected, RECOVERY, "the provider reconnects")
    release.set()  # "slow" answers now, when a new connection is up
    wait_until(
        lambda: any("was dropped" in r.getMessage() and "slow" in r.getMessage() for r in caplog.records),
        WAIT,
        "the provider drops the answer to a call of the lost connection",
    )  # fmt: skip
    # A new caller, and the old one (reconnected by itself), reach the provider again.
    fresh = clients(host.url, host.client_key)
    wait_until(
        lambda: ping_from(fresh, "pong"), RECOVERY, "a new caller", retry=(NoServerFunctionError,)
    )
    wait_until(
        lambda: ping_from(caller, "pong"),
        RECOVERY,
        "the old caller",
        retry=(NoServerFunctionError,),
    )
    assert provider.fatal is None and provider.transport.reconnects
    provider.sync()  # the host has handled everything the provider sent
    assert "unknown call id" not in host.log()


def test_a_fatal_frame_that_is_not_a_key_refusal_ends_one_connection_not_the_client(
    serve_proc, clients
):
    host = serve_proc()
    registry = FunctionRegistry()
    registry.register("ping", lambda: "pong")
    provider = clients(host.url, host.server_key, registry)
    caller = clients(host.url, host.client_key)
    assert caller.call("ping") == "pong"

    # A frame the host refuses with a fatal error (not about the key), then closes.
    provider.transport.send({"type": "LAUNCH_BACKGROUND"})
    with pytest.raises(UplinkDisconnectedError):
        provider.sync()  # sent after the bad frame: the connection ends before its answer
    assert "unexpected message" in host.log()

    wait_until(
        lambda: ping_from(caller, "pong"),
        RECOVERY,
        "the provider is back",
        retry=(NoServerFunctionError,),
    )
    assert provider.connected and provider.fatal is None
    assert provider.transport.reconnects and provider.transport.reading


# ---------------------------------------------------------------------------------------------
# F4: a process that called server.connect stays with its host

SCRIPT = """
import sys
from anvil_nb import runtime
from anvil_nb import server

url, key = sys.argv[1], sys.argv[2]
server.connect(key, url=url, quiet=True)
print("connected", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "call":
        try:
            print("ok", server.call("where"), flush=True)
        except Exception as exc:
            print("err", type(exc).__name__, str(exc)[:300].replace("\\n", " "), flush=True)
    elif cmd == "online":
        print("online", server.is_app_online(), flush=True)
    elif cmd == "end":
        print("embedded-host-started", runtime._embedded is not None, flush=True)
        server.disconnect()
        break
"""


class Script:
    """The user script above, driven line by line (every read bounded)."""

    def __init__(self, tmp: Path, url: str, key: str):
        path = tmp / "user_script.py"
        path.write_text(SCRIPT)
        self.log_path = tmp / "user_script.log"
        self.proc, self.lines, self._log = start_piped(
            [sys.executable, str(path), url, key], self.log_path, cwd=tmp, stdin=subprocess.PIPE
        )
        assert self.read() == "connected"

    def read(self, timeout: float = WAIT) -> str:
        try:
            line = self.lines.next(time.monotonic() + timeout)
        except queue.Empty:
            pytest.fail(f"the script said nothing within {timeout} s")
        assert line is not None, f"the script exited:\n{tail(self.log_path)}"
        return line

    def ask(self, cmd: str, timeout: float = WAIT) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def stop(self) -> None:
        close_piped(self.proc, self.lines, self._log)
        self.proc.stdin.close()  # type: ignore[union-attr]


def test_a_connected_script_rides_out_a_host_restart_without_an_embedded_host(
    serve_proc, clients, tmp_path
):
    host = serve_proc()
    marker = f"provider-{os.getpid()}-{secrets.token_hex(4)}"
    registry = FunctionRegistry()
    registry.register("where", lambda: marker)
    clients(host.url, host.server_key, registry)  # serves "where" through the real host only
    script = Script(tmp_path, host.url, host.server_key)
    try:
        assert script.ask("call") == f"ok {marker}"
        host.restart()
        answers: list[str] = []

        def served() -> bool:
            # A call waits for the reconnection (up to 10 s): read with room for that.
            answers.append(script.ask("call", timeout=WAIT + 15))
            return answers[-1] == f"ok {marker}"

        wait_until(served, RECOVERY + 15, "calls succeed again after the restart")
        assert all(a.startswith(("ok", "err NoServerFunctionError")) for a in answers), answers
        assert script.ask("online") == "online True"
        assert script.ask("end") == "embedded-host-started False"
    finally:
        script.stop()


def test_calls_during_an_outage_wait_then_raise_app_offline_naming_the_host(serve_proc):
    host = serve_proc()
    server.connect(host.server_key, url=host.url, quiet=True)
    assert server.is_app_online()
    client = runtime.current_client(start=False)
    assert client is not None
    client.offline_wait = 1.5
    host.stop()
    wait_until(lambda: not server.is_app_online(), WAIT, "is_app_online turns False")

    t0 = time.monotonic()
    with pytest.raises(AppOfflineError, match="unreachable") as info:
        server.call("anvil.private.echo", 1)
    waited = time.monotonic() - t0
    assert host.url in str(info.value)
    assert 1.4 <= waited <= 1.5 + 3.0, waited

    t0 = time.monotonic()
    with pytest.raises(AppOfflineError, match="unreachable"):
        asyncio.run(server.call_async("anvil.private.echo", 1))
    assert 1.4 <= time.monotonic() - t0 <= 1.5 + 3.0

    assert runtime._embedded is None  # never fell back to a host of its own
    assert not server.is_app_online()


def test_a_failed_connect_leaves_no_connection_and_no_embedded_host():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/_/uplink"
    with pytest.raises(AppOfflineError, match="Could not connect"):
        server.connect("any-key", url=url, quiet=True)
    with pytest.raises(AppOfflineError, match=url):
        server.call("anvil.private.echo", 1)
    assert runtime._embedded is None and not server.is_app_online()


# ---------------------------------------------------------------------------------------------
# A refused key stops the client


def test_a_wrong_key_is_refused_at_once_and_for_good(serve_proc):
    host = serve_proc()
    with pytest.raises(AppOfflineError, match="^Anvil fatal error: Incorrect uplink key$"):
        server.connect("not-the-key", url=host.url, quiet=True)
    t0 = time.monotonic()
    with pytest.raises(AppOfflineError, match="^Anvil fatal error: Incorrect uplink key$"):
        server.call("anvil.private.echo", 1)
    assert time.monotonic() - t0 < 1.0
    assert runtime._embedded is None and not server.is_app_online()
    client = runtime.current_client(start=False)
    assert client is not None
    assert not client.transport.reconnects and not client.transport.reading


def test_a_key_refused_on_reconnection_stops_the_client_and_every_call_says_so(serve_proc, clients):
    host = serve_proc()
    client = clients(host.url, host.server_key)
    assert client.call("anvil.private.echo", "hi") == "hi"
    host.server_key = "server_" + secrets.token_urlsafe(12)  # the host comes back with another key
    host.restart()
    wait_until(
        lambda: client.fatal is not None, RECOVERY, "the client hears that its key is refused"
    )
    wait_until(lambda: not client.transport.reading, WAIT, "the transport stops reconnecting")
    t0 = time.monotonic()
    with pytest.raises(AppOfflineError, match="^Anvil fatal error: Incorrect uplink key$"):
        client.call("anvil.private.echo", "hi")
    assert time.monotonic() - t0 < 1.0
    assert not client.connected and not client.transport.reconnects
    assert host.log().count("Incorrect uplink key") == 1
