"""Processes for tests with the real ``anvil-uplink`` client: a host and uplink *agents*.

* :class:`HostProc` is a running ``python -m anvil_nb serve`` (temp data dir, random keys,
  stopped with SIGTERM), which can be restarted on the same port, keys and data.
* An :class:`Agent` is one uplink process, ``real`` (the unmodified ``anvil-uplink`` 0.7.0, on
  ``PYTHONPATH`` from :func:`~support.uplink.install_anvil_uplink`) or ``nb`` (anvil_nb's own
  client, in the project's venv, where ``anvil`` is not importable). It reads snippets of Python
  from stdin (one JSON line each), runs them with ``S`` as its ``anvil.server``, and answers
  ``RESULT <json>`` or ``ERROR <json>`` on its stdout; server functions may report
  ``EVENT <json>`` lines. Tests synchronise only on those lines, with bounded timeouts.
"""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.processes import close_piped, start_piped, stop_process, tail

__all__ = ["AGENT_SCRIPT", "MODES", "WAIT", "Agent", "HostProc", "RemoteError", "Spawn", "spawner"]

#: Seconds to wait for any one answer from a subprocess.
WAIT = 20.0
MODES = ("real", "nb")


class HostProc:
    """A running ``python -m anvil_nb serve``."""

    def __init__(self, data_dir: Path, log_path: Path):
        self._start(
            data_dir,
            log_path,
            0,
            "server_" + secrets.token_urlsafe(12),
            "client_" + secrets.token_urlsafe(12),
        )

    def _start(
        self, data_dir: Path, log_path: Path, port: int, server_key: str, client_key: str
    ) -> None:
        self.server_key, self.client_key = server_key, client_key
        self.data_dir, self.log_path = data_dir, log_path
        cmd = [
            sys.executable, "-m", "anvil_nb", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--server-key", self.server_key, "--client-key", self.client_key,
            "--data-dir", str(data_dir), "--log-level", "DEBUG",
        ]  # fmt: skip
        self.proc, self._lines, self._log = start_piped(cmd, log_path, stdin=subprocess.DEVNULL)
        try:
            line = self._lines.next(time.monotonic() + WAIT)
        except queue.Empty:
            line = "(nothing within the timeout)"
        m = re.fullmatch(
            r"anvil_nb host ready at (http://127\.0\.0\.1:\d+/) \(uplink (ws://127\.0\.0\.1:\d+/_/uplink)\)",
            line or "",
        )
        if m is None:
            self.stop()
            pytest.fail(f"host did not start; stdout: {line!r}\n{tail(log_path)}")
        self.http_url, self.url = m.group(1), m.group(2)

    @classmethod
    def restart(cls, old: HostProc, port: int) -> HostProc:
        """A new host on *old*'s port, keys and data dir."""
        new = cls.__new__(cls)
        new._start(
            old.data_dir, old.log_path.with_name("host2.log"), port, old.server_key, old.client_key
        )
        return new

    def log(self) -> str:
        return tail(self.log_path, 60)

    def stop(self) -> tuple[int | None, float]:
        started = time.monotonic()
        code = stop_process(self.proc, signal.SIGTERM, wait=5.0)
        took = time.monotonic() - started
        self._lines.thread.join(timeout=5)
        self.proc.stdout.close()  # type: ignore[union-attr]
        self._log.close()
        return code, took


AGENT_SCRIPT = r'''
"""Test agent: runs snippets from stdin (JSON lines), answers RESULT/ERROR lines on stdout."""
import json, os, sys, threading, traceback

_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
sys.stdout = sys.stderr  # what the clients print goes to the log, not into our protocol
_lock = threading.Lock()


def _emit(kind, payload):
    line = kind + " " + json.dumps(payload, default=repr) + "\n"
    with _lock:
        _out.write(line)
        _out.flush()


def event(name, **data):
    """Report something from any thread (e.g. from inside a server function)."""
    _emit("EVENT", dict(data, name=name))


MODE = sys.argv[1]
if MODE == "real":
    import anvil
    import anvil._threaded_server as _ts
    import anvil.server as S

    BlobMedia = anvil.BlobMedia

    def session():
        # anvil-uplink 0.7.0 has no anvil.server.session: this is where the data lives.
        return _ts.call_info.session

    #: Every text frame the real client receives, decoded (for checks on the wire form).
    FRAMES = []
    _received = anvil.server._Connection.received_message

    def _recording(self, message):
        if not message.is_binary:
            try:
                FRAMES.append(json.loads(message.data.decode()))
            except Exception as exc:
                FRAMES.append({"undecodable": repr(exc)})
        return _received(self, message)

    anvil.server._Connection.received_message = _recording

else:
    import importlib.util

    if importlib.util.find_spec("anvil") is not None:
        raise SystemExit("the real anvil package must not be importable in the project venv")
    from anvil_nb import server as S
    from anvil_nb.media import BlobMedia

    def session():
        return S.session


def describe(exc):
    """An exception as JSON: its class, message and every S.* exception class it is."""
    kinds = []
    for name in sorted(vars(S)):
        cls = vars(S)[name]
        # type(cls), not isinstance(): anvil.server.request raises on any attribute access
        if issubclass(type(cls), type) and issubclass(cls, BaseException) and isinstance(exc, cls):
            kinds.append(name)
    return {"name": type(exc).__name__, "module": type(exc).__module__,
            "message": str(exc), "is": kinds}


def catch(fn, *args, **kwargs):
    """fn(*args, **kwargs) -> {"raised": False, "value": v} or {"raised": True, **describe(exc)}."""
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:
        return dict(describe(exc), raised=True)
    return {"raised": False, "value": value}


for _line in sys.stdin:
    _code = json.loads(_line)["code"]
    globals().pop("result", None)
    try:
        exec(compile(_code, "<test snippet>", "exec"), globals())
    except BaseException as _exc:
        _emit("ERROR", dict(describe(_exc), trace=traceback.format_exc()))
    else:
        _emit("RESULT", globals().get("result"))
_out.flush()
os._exit(0)  # the real client's threads are not daemons: do not wait for them
'''


class RemoteError(AssertionError):
    """A snippet raised in an agent."""

    def __init__(self, info: dict[str, Any]):
        super().__init__(f"{info['module']}.{info['name']}: {info['message']}\n{info.get('trace')}")
        self.info = info


class Agent:
    """One uplink process (``real`` or ``nb``) driven through stdin/stdout."""

    def __init__(self, mode: str, name: str, script: Path, log_dir: Path, uplink_dir: Path):
        self.mode, self.name = mode, name
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        if mode == "real":
            env["PYTHONPATH"] = str(uplink_dir)
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = log_dir / f"{name}.log"
        self.proc, self._lines, self._log = start_piped(
            [sys.executable, str(script), mode],
            self.log_path,
            stdin=subprocess.PIPE,
            env=env,
            cwd=log_dir,
        )
        self.events: list[dict[str, Any]] = []
        self.transcript: list[str] = []

    # -- driving -------------------------------------------------------------------------------
    def send(self, code: str) -> None:
        """Start running *code* (a snippet that may set ``result``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"code": textwrap.dedent(code)}) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = WAIT) -> Any:
        """The outcome of the snippet sent last: its ``result``, or raise :class:`RemoteError`."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(deadline, "the snippet's result")
            if line.startswith("RESULT "):
                return json.loads(line[7:])
            if line.startswith("ERROR "):
                raise RemoteError(json.loads(line[6:]))

    def run(self, code: str, timeout: float = WAIT) -> Any:
        """Run *code* and return its ``result``."""
        self.send(code)
        return self.result(timeout)

    def wait_event(self, name: str, timeout: float = WAIT, **match: Any) -> dict[str, Any]:
        """Wait for ``event(name, **match)`` from this process (earlier ones count)."""
        deadline = time.monotonic() + timeout
        while True:
            for ev in self.events:
                if ev.get("name") == name and all(ev.get(k) == v for k, v in match.items()):
                    self.events.remove(ev)
                    return ev
            self._next(deadline, f"event {name!r}")

    def _next(self, deadline: float, what: str) -> str:
        """The next line of the protocol (EVENT lines are also kept in ``events``)."""
        while True:
            try:
                line = self._lines.next(deadline)
            except queue.Empty:
                pytest.fail(f"{self.name}: no {what} within the timeout\n{self.diagnostics()}")
            if line is None:
                self._lines.queue.put(None)  # stay at EOF
                pytest.fail(
                    f"{self.name}: exited ({self.proc.poll()}) before {what}\n{self.diagnostics()}"
                )
            self.transcript.append(line)
            if line.startswith("EVENT "):
                self.events.append(json.loads(line[6:]))
            return line

    def log(self) -> str:
        return tail(self.log_path)

    def diagnostics(self) -> str:
        return (
            f"--- {self.name} stdout:\n"
            + "\n".join(self.transcript[-10:])
            + (f"\n--- {self.name} log:\n{self.log()}")
        )

    # -- connecting ----------------------------------------------------------------------------
    def connect(self, key: str, url: str) -> Any:
        """Connect; then one round trip (there is no registration acknowledgement)."""
        return self.run(
            f"S.connect({key!r}, url={url!r})\nresult = S.call('anvil.private.echo', 'READY')"
        )

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        close_piped(self.proc, self._lines, self._log, wait=0.5, close_stdin=True)


#: ``spawn(mode, name=None, setup="")``: start an agent (and run *setup* in it).
Spawn = Callable[..., Agent]


def spawner(script: Path, log_dir: Path, uplink_dir: Path, agents: list[Agent]) -> Spawn:
    def spawn(mode: str, name: str | None = None, setup: str = "") -> Agent:
        assert mode in MODES
        a = Agent(mode, name or f"{mode}-{len(agents)}", script, log_dir, uplink_dir)
        agents.append(a)
        if setup:
            a.run(setup)
        return a

    return spawn
