"""Real ipykernel processes driven over ZMQ, as a notebook front end drives them.

Which Python the kernels run
    :func:`write_kernelspec` writes a kernelspec of its own (``anvil-nb-test``) into a
    temporary folder, with ``argv = [sys.executable, "-m", "ipykernel_launcher", "-f",
    "{connection_file}"]``, and returns a KernelSpecManager that looks in that folder only. That
    is the robust way: the ``python3`` spec that happens to be found first may be a user-level
    one pointing at another interpreter (jupyter_client only rewrites the bare word ``python``
    to ``sys.executable``), and ``KernelManager(kernel_cmd=...)`` no longer exists in
    jupyter_client 8. The kernels get an empty ``IPYTHONDIR`` (no profile or startup files) and
    an environment without ``ANVIL_NB_URL``/``ANVIL_NB_SERVER_KEY`` unless a test sets them
    (:func:`base_env`). What a kernel process writes on its own stdout/stderr (logging) goes to
    a log file that failure messages show.

Cells
    :meth:`Kernel.run` sends an ``execute_request`` and collects that request's iopub output
    until the kernel is idle again (``stdout``, ``stderr``, ``error``, ``displays``), with a
    deadline. Like JupyterLab, it sends a ``cellId`` in the request's metadata: a fresh one per
    run unless a test passes one (a re-run of "the same cell" passes the same id), or none with
    ``cell_id=None``, as nbclient, nbval and plain IPython do.

:class:`Kernels` starts kernels and shuts every one down at the end (the ``kernels`` fixture
for one test, ``kernelspecs`` for the spec of a module).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

from support.processes import tail

__all__ = [
    "PRELUDE",
    "WAIT",
    "Kernel",
    "Kernels",
    "Result",
    "base_env",
    "kernels_in",
    "write_kernelspec",
]

#: Seconds to wait for any one answer (a cell, a kernel to be ready).
WAIT = 20.0
SPEC_NAME = "anvil-nb-test"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
ENV_VARS = ("ANVIL_NB_URL", "ANVIL_NB_SERVER_KEY")


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in (*ENV_VARS, "PYTHONPATH"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------------------------------
# Kernels


@dataclass
class Result:
    """What one execute request produced."""

    stdout: str = ""
    stderr: str = ""
    #: ``{"ename", "evalue", "traceback"}`` (traceback: one str, ANSI codes removed) or None.
    error: dict[str, Any] | None = None
    #: ``data`` dicts of ``display_data``/``execute_result`` messages, in order.
    displays: list[dict[str, Any]] = field(default_factory=list)
    status: str = ""
    #: The ``In[n]`` number of the cell (from the execute_reply).
    execution_count: int | None = None

    @property
    def text(self) -> str:
        """Everything the cell showed, as one text (streams, displays and the error)."""
        parts = [self.stdout, self.stderr]
        parts += [str(d.get("text/plain", "")) for d in self.displays]
        if self.error:
            parts += [self.error["ename"], self.error["evalue"], self.error["traceback"]]
        return "\n".join(parts)


class Kernel:
    """One real ipykernel process and a blocking client for it."""

    def __init__(self, name: str, ksm: KernelSpecManager, env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"kernel-{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in shutdown()
        self.km = KernelManager(kernel_name=SPEC_NAME, kernel_spec_manager=ksm)
        self.km.start_kernel(env=env, stdout=self._log, stderr=self._log)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=WAIT)
        self._iopub: dict[str, list[dict[str, Any]]] = {}
        self._idle: set[str] = set()
        self._replies: dict[str, dict[str, Any]] = {}
        self.alive = True
        self.load_result: Result | None = None

    # -- messages ------------------------------------------------------------------------------
    def send(self, code: str, cell_id: str | None = "") -> str:
        """Start executing *code*; returns the request's msg_id (see :meth:`result`).

        *cell_id* ``""`` (default) sends a fresh ``cellId``; ``None`` sends none.
        """
        metadata = {}
        if cell_id is not None:
            metadata["cellId"] = cell_id or f"cell-{uuid.uuid4()}"
        content = {
            "code": code,
            "silent": False,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": False,
        }
        msg = self.kc.session.msg("execute_request", content, metadata=metadata)
        self.kc.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        self._iopub[msg_id] = []
        return msg_id

    def _read_iopub(self, deadline: float) -> bool:
        try:
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            return False
        parent = msg.get("parent_header", {}).get("msg_id", "")
        self._iopub.setdefault(parent, []).append(msg)
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            self._idle.add(parent)
        return True

    def _fail(self, what: str) -> None:
        pytest.fail(f"kernel {self.name}: {what}\n--- kernel log:\n{tail(self.log_path)}")

    def wait_output(self, msg_id: str, text: str, timeout: float = WAIT) -> None:
        """Wait until the request's stdout contains *text*."""
        deadline = time.monotonic() + timeout
        while text not in self._collect(msg_id).stdout:
            if msg_id in self._idle:
                self._fail(f"the cell finished without printing {text!r}: {self._collect(msg_id)}")
            if time.monotonic() > deadline:
                self._fail(f"no {text!r} within {timeout} s: {self._collect(msg_id)}")
            self._read_iopub(deadline)

    def result(self, msg_id: str, timeout: float = WAIT) -> Result:
        """Wait until the request is done; everything it produced."""
        deadline = time.monotonic() + timeout
        while msg_id not in self._idle:
            if time.monotonic() > deadline:
                self._fail(f"the cell did not finish within {timeout} s: {self._collect(msg_id)}")
            self._read_iopub(deadline)
        while msg_id not in self._replies:
            try:
                reply = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self._fail("no execute_reply")
            self._replies[reply["parent_header"].get("msg_id", "")] = reply
        res = self._collect(msg_id)
        res.status = self._replies[msg_id]["content"].get("status", "")
        res.execution_count = self._replies[msg_id]["content"].get("execution_count")
        return res

    def _collect(self, msg_id: str) -> Result:
        res = Result()
        for msg in self._iopub.get(msg_id, []):
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    res.stdout += content["text"]
                else:
                    res.stderr += content["text"]
            elif kind in ("display_data", "execute_result"):
                res.displays.append(content.get("data", {}))
            elif kind == "error":
                res.error = {
                    "ename": content.get("ename"),
                    "evalue": content.get("evalue"),
                    "traceback": ANSI.sub("", "\n".join(content.get("traceback", []))),
                }
        return res

    def all_streams(self) -> str:
        """Every stream text the kernel has sent so far, whatever its parent."""
        return "".join(
            m["content"]["text"]
            for msgs in self._iopub.values()
            for m in msgs
            if m["msg_type"] == "stream"
        )

    def drain(self) -> None:
        """Run an empty cell that flushes the kernel's streams, and wait for it."""
        self.run_ok("import sys; sys.stdout.flush(); sys.stderr.flush()")

    # -- running cells -------------------------------------------------------------------------
    def run(self, code: str, timeout: float = WAIT, cell_id: str | None = "") -> Result:
        """Execute *code* and return what it produced (the ``run(kc, code)`` helper)."""
        return self.result(self.send(code, cell_id), timeout)

    def run_ok(self, code: str, timeout: float = WAIT, cell_id: str | None = "") -> Result:
        """:meth:`run`, and fail the test if the cell raised."""
        res = self.run(code, timeout, cell_id)
        if res.error is not None:
            self._fail(f"cell raised:\n{code}\n--- output:\n{res.text}")
        return res

    def value(self, code: str, timeout: float = WAIT) -> Any:
        """Run *code* (plain Python that sets ``result``) and return ``result`` via JSON."""
        code = (
            textwrap.dedent(code)
            + "\nprint('@@RESULT ' + __import__('json').dumps(result, default=repr))"
        )
        res = self.run_ok(code, timeout)
        for line in res.stdout.splitlines():
            if line.startswith("@@RESULT "):
                return json.loads(line[9:])
        return self._fail(f"no result line in {res.stdout!r}")

    def call(self, name: str, *args: Any) -> dict[str, Any]:
        """``server.call(name, *args)`` in the kernel: ``{"ok", "value"}`` or ``{"ok", "type", "is"}``."""
        return self.value(f"result = _probe({name!r}, *{args!r})")

    def status(self) -> dict[str, Any]:
        return self.value(
            "import anvil_nb.jupyter.kernel\nresult = anvil_nb.jupyter.kernel.status()"
        )

    def load(self) -> Result:
        """``%load_ext anvil_nb`` plus the probe helper; returns the load cell's result."""
        res = self.run_ok("%load_ext anvil_nb")
        self.run_ok(PRELUDE)
        return res

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self, now: bool = False) -> None:
        if not self.alive:
            return
        self.alive = False
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=now)
        finally:
            with contextlib.suppress(Exception):
                self.km.cleanup_resources()
            self._log.close()


#: Defined in every kernel after %load_ext: call a server function, describe the outcome.
PRELUDE = """
from anvil_nb import server

_KINDS = ("NoServerFunctionError", "PermissionDenied", "UplinkDisconnectedError")

def _probe(name, *args, **kwargs):
    try:
        return {"ok": True, "value": server.call(name, *args, **kwargs)}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc),
                "is": [k for k in _KINDS if isinstance(exc, getattr(server, k))]}
"""


class Kernels:
    """Starts kernels; every one is shut down by the fixture that made it."""

    def __init__(self, ksm: KernelSpecManager, ipython_dir: Path, log_dir: Path):
        self.ksm, self.ipython_dir, self.log_dir = ksm, ipython_dir, log_dir
        self.started: list[Kernel] = []

    def start(self, name: str, **env: str) -> Kernel:
        full = base_env()
        full["IPYTHONDIR"] = str(self.ipython_dir)
        full.update(env)
        k = Kernel(f"{name}-{len(self.started)}", self.ksm, full, self.log_dir)
        self.started.append(k)
        return k

    def shutdown_all(self) -> None:
        for k in self.started:
            with contextlib.suppress(Exception):
                k.shutdown()


def write_kernelspec(base: Path) -> KernelSpecManager:
    """The ``anvil-nb-test`` spec (this venv's Python) in *base*, and a manager that finds only it."""
    spec_dir = base / SPEC_NAME
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "anvil_nb tests (this venv)",
        "language": "python",
        "interrupt_mode": "signal",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(base)], ensure_native_kernel=False)


def kernels_in(ksm: KernelSpecManager, tmp: Path) -> Kernels:
    """:class:`Kernels` with their logs in *tmp* and an empty ``IPYTHONDIR`` below it."""
    (tmp / "ipython").mkdir(exist_ok=True)
    return Kernels(ksm, tmp / "ipython", tmp)
