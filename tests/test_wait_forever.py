"""``server.wait_forever()``: an uplink script's last line, as in ``anvil-uplink``.

It blocks while the process's connection lasts (serving calls meanwhile), returns once
``server.disconnect()`` closed it, and lets Ctrl-C (``KeyboardInterrupt``) through. The network
cases run a real ``anvil-nb serve`` and the provider script as subprocesses of this venv's
Python; every wait is bounded and every process is stopped.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.processes import Lines, ServeProc, close_piped, start_piped, tail
from support.waiting import wait_until

from anvil_nb import server
from anvil_nb.core.errors import AppOfflineError

WAIT = 30.0


# ---------------------------------------------------------------------------------------------
# In this process


def test_without_a_connection_it_says_to_connect_first() -> None:
    with pytest.raises(RuntimeError, match=r"server\.connect"):
        server.wait_forever()


def test_after_a_failed_connect_it_raises_app_offline() -> None:
    with pytest.raises(AppOfflineError):
        server.connect("server_nobody", url="ws://127.0.0.1:1/_/uplink", quiet=True)

    with pytest.raises(AppOfflineError):
        server.wait_forever()


def test_serves_calls_while_waiting_and_returns_when_disconnected() -> None:
    @server.callable
    def ping() -> str:
        return "pong"

    server.call("ping")  # this process's connection (to an embedded host) is up
    answers: list[str] = []
    disconnecting: list[float] = []

    waiter = threading.get_ident()

    def in_wait_forever() -> bool:
        # Without the collector: a collection that starts inside sys._current_frames() (it
        # makes frame objects) and frees a threading.local deadlocks CPython 3.11 (both take
        # the runtime's thread-list lock), which hung this test once.
        gc.disable()
        try:
            frame = sys._current_frames().get(waiter)
        finally:
            gc.enable()
        while frame is not None and frame.f_code.co_name != "wait_forever":
            frame = frame.f_back
        return frame is not None

    def from_another_thread() -> None:
        try:
            if wait_until(in_wait_forever, WAIT):  # the test's thread is blocked in it now
                answers.append(server.call("ping"))  # served while that thread waits
        finally:
            disconnecting.append(time.monotonic())
            server.disconnect()  # always: the test's thread must not wait forever

    helper = threading.Thread(target=from_another_thread, daemon=True)
    helper.start()
    server.wait_forever()
    returned = time.monotonic()
    helper.join(WAIT)

    assert answers == ["pong"]
    assert disconnecting and returned >= disconnecting[0]  # it returned only once disconnected
    assert not server.is_app_online()


# ---------------------------------------------------------------------------------------------
# A provider script over the network


@pytest.fixture
def host(serve_proc: Any) -> ServeProc:
    """A real ``anvil-nb serve`` on a free port with its own keys and data dir."""
    return serve_proc()


PROVIDER = """\
import sys
from anvil_nb import server

server.connect({key!r}, url={url!r}, quiet=True)

@server.callable
def greet(name):
    return f"Hello, {{name}}!"

@server.callable
def stop():
    import threading
    threading.Timer(0.2, server.disconnect).start()  # after this call's answer has gone
    return "stopping"

try:
    print("waiting", flush=True)  # inside the try: a Ctrl-C from now on is caught below
    server.wait_forever()
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    {after_interrupt}
print("returned", flush=True)
"""


@contextlib.contextmanager
def provider(
    tmp_path: Path, host: ServeProc, after_interrupt: str = "raise"
) -> Iterator[tuple[subprocess.Popen[str], Lines]]:
    """The provider script, running and inside ``wait_forever``; stopped at the end."""
    script = tmp_path / "provider.py"
    script.write_text(
        PROVIDER.format(key=host.server_key, url=host.url, after_interrupt=after_interrupt)
    )
    proc, lines, log = start_piped([sys.executable, str(script)], tmp_path / "provider.err")
    try:
        assert lines.next(time.monotonic() + WAIT) == "waiting", tail(tmp_path / "provider.err")
        yield proc, lines
    finally:
        close_piped(proc, lines, log)


def test_provider_serves_until_it_disconnects(tmp_path: Path, host: ServeProc) -> None:
    with provider(tmp_path, host) as (proc, lines):
        try:
            server.connect(host.client_key, url=host.url, quiet=True)
            assert server.call("greet", "Ann") == "Hello, Ann!"
            assert server.call("greet", "Bob") == "Hello, Bob!"  # still serving

            assert server.call("stop") == "stopping"

            assert lines.next(time.monotonic() + WAIT) == "returned", tail(
                tmp_path / "provider.err"
            )
            assert proc.wait(WAIT) == 0
        finally:
            server.disconnect()


def test_ctrl_c_raises_keyboard_interrupt_out_of_it(tmp_path: Path, host: ServeProc) -> None:
    with provider(tmp_path, host, after_interrupt="pass") as (proc, lines):
        proc.send_signal(signal.SIGINT)

        assert lines.next(time.monotonic() + 5) == "KeyboardInterrupt"
        assert lines.next(time.monotonic() + 5) == "returned"
        assert proc.wait(10) == 0


def test_uncaught_ctrl_c_ends_the_script(tmp_path: Path, host: ServeProc) -> None:
    with provider(tmp_path, host, after_interrupt="raise") as (proc, lines):
        proc.send_signal(signal.SIGINT)

        assert lines.next(time.monotonic() + 5) == "KeyboardInterrupt"
        code = proc.wait(10)  # the process does not hang on its connection's threads
        assert code in (-signal.SIGINT, 1, 130), code
        assert "KeyboardInterrupt" in (tmp_path / "provider.err").read_text()
