"""``python -m anvil_nb serve`` as a real subprocess: the ready line, keys, and clean stops."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.gates import Gate

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core.errors import RuntimeUnavailableError, UplinkDisconnectedError, error_from_wire

WAIT = 15.0
READY = re.compile(
    r"^anvil_nb host ready at http://127\.0\.0\.1:(\d+)/ \(uplink ws://127\.0\.0\.1:(\d+)/_/uplink\)$"
)


class Served:
    """A running ``anvil-nb serve`` with its output read line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "anvil_nb", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self._pumps = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, self.stdout.put), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True
            ),
        ]
        for t in self._pumps:
            t.start()
        self.ready_line = self.stdout.get(timeout=WAIT)
        match = READY.match(self.ready_line or "")
        assert match, f"unexpected first line: {self.ready_line!r}; stderr: {self.stderr}"
        self.port = int(match.group(1))
        self.url = f"ws://127.0.0.1:{self.port}/_/uplink"

    @staticmethod
    def _pump(stream: Any, put: Any) -> None:
        for line in stream:
            put(line.rstrip("\n"))
        put(None)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(WAIT)
            for t in self._pumps:
                t.join(WAIT)
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(*args: str, data_dir: Path | None = None) -> Served:
        started.append(Served("--data-dir", str(data_dir or tmp_path / "data"), *args))
        return started[-1]

    yield start
    for s in started:
        s.stop(signal.SIGKILL)


def test_prints_one_ready_line_and_nothing_else_on_stdout(serve):
    s = serve("--server-key", "S1", "--client-key", "C1")
    assert s.stop() == 0
    assert s.stdout.get(timeout=WAIT) is None  # stdout ends after the ready line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stops_cleanly_on_signal(serve, sig):
    assert serve("--server-key", "S1", "--client-key", "C1").stop(sig) == 0


def test_generated_keys_are_printed_kept_and_reused(serve, tmp_path):
    data = tmp_path / "keys-here"
    first = serve(data_dir=data)
    assert first.stop() == 0
    printed = "\n".join(line for line in first.stderr if line)
    server_key = re.search(r"server key: (\S+)", printed).group(1)
    client_key = re.search(r"client key: (\S+)", printed).group(1)
    keys_file = data / "keys.json"
    assert keys_file.stat().st_mode & 0o077 == 0
    second = serve(data_dir=data)
    try:
        c = Client(WebSocketTransport(second.url, server_key), functions=FunctionRegistry()).start()
        assert c.own_type == "uplink"
        c.close()
        u = Client(WebSocketTransport(second.url, client_key), functions=FunctionRegistry()).start()
        assert u.own_type == "client_uplink"
        u.close()
    finally:
        assert second.stop() == 0
    assert not any(
        "server key:" in (line or "") for line in second.stderr
    )  # nothing new was generated


def test_calls_in_flight_fail_when_the_host_stops(serve):
    s = serve("--server-key", "S", "--client-key", "C")
    slow = Gate(timeout=WAIT)
    started, release = slow.started, slow.release
    registry = FunctionRegistry()
    registry.register("slow", slow)
    provider = Client(WebSocketTransport(s.url, "S", reconnect=False), functions=registry).start()
    caller = Client(
        WebSocketTransport(s.url, "C", reconnect=False), functions=FunctionRegistry()
    ).start()
    try:
        pending = caller.send_call("slow", [], {})
        assert started.wait(WAIT)
        assert s.stop() == 0
        outcome = pending.exception(WAIT) or error_from_wire(pending.result(WAIT)[0]["error"])
        assert isinstance(outcome, (RuntimeUnavailableError, UplinkDisconnectedError))
    finally:
        release.set()
        caller.close()
        provider.close()


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("anvil-nb")
    out = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "--server-key" in out.stdout and "--data-dir" in out.stdout
    assert os.access(script, os.X_OK)
