"""Integration tests: the kernel side (``%load_ext anvil_nb``, ``%%callable``, ``%anvil``) in REAL kernels.

Nothing here is simulated. Every kernel is a real ``ipykernel`` process started by
``jupyter_client``'s :class:`KernelManager` and driven over ZMQ like a notebook front end drives
it; every caller from outside is a separate Python process; the shared host is a real
``python -m anvil_nb serve`` subprocess.

Kernels
    ``Kernel`` and ``Kernels`` (``support/kernels.py``, the ``kernels`` and ``kernelspecs``
    fixtures in ``conftest.py``) run this venv's Python through a kernelspec of their own in a
    temporary folder, with an empty ``IPYTHONDIR`` and no ``ANVIL_NB_URL``/
    ``ANVIL_NB_SERVER_KEY`` unless a test sets them; a cell runs with a deadline and sends a
    ``cellId`` as JupyterLab does (a fresh one per run unless a test passes one; one test runs
    cells without ``cellId``, as nbclient, nbval and plain IPython do).

Callers from outside
    ``nb`` agents run anvil_nb's own client (``from anvil_nb import server``) in this venv;
    ``real`` agents run the unmodified ``anvil-uplink`` 0.7.0 from the user cache folder
    (installed once by the locked ``pip install --target`` of ``support/uplink.py``, the
    ``anvil_uplink_dir`` fixture) with ``PYTHONPATH`` set to it. An agent reads snippets of
    Python as JSON lines on stdin and answers one JSON line per snippet. Both connect with the
    *client* key, so they are untrusted ``client_uplink`` callers.

Nothing sleeps to synchronise: tests wait for a cell's output, an agent's answer, or poll a
condition with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import secrets
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from jupyter_client.kernelspec import KernelSpecManager
from support.kernels import WAIT, Kernel, Kernels, base_env, kernels_in
from support.processes import ServeProc, close_piped, start_piped, tail

URL_RE = re.compile(r"ws://127\.0\.0\.1:(\d+)/_/uplink")


# ---------------------------------------------------------------------------------------------
# Kernels (``Kernel``, ``Kernels``: support/kernels.py; the ``kernels`` fixture: conftest.py)


@pytest.fixture(scope="module")
def module_kernels(
    kernelspecs: KernelSpecManager, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kernels]:
    ks = kernels_in(kernelspecs, tmp_path_factory.mktemp("module_kernels"))
    yield ks
    ks.shutdown_all()


@pytest.fixture(scope="module")
def kernel(module_kernels: Kernels) -> Kernel:
    """The shared kernel: no ANVIL_NB_* in its environment, so ``%load_ext`` embeds a host."""
    k = module_kernels.start("main")
    k.load_result = k.load()
    return k


@pytest.fixture(scope="module")
def status(kernel: Kernel) -> dict[str, Any]:
    """``anvil_nb.jupyter.kernel.status()`` of the shared kernel right after ``%load_ext``."""
    return kernel.status()


# ---------------------------------------------------------------------------------------------
# Callers in other processes

AGENT = r"""
import json, os, sys, traceback
_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
sys.stdout = sys.stderr  # what the clients print goes to the log, not into our protocol
MODE = sys.argv[1]
if MODE == "real":
    import anvil.server as S
else:
    import importlib.util
    if importlib.util.find_spec("anvil") is not None:
        raise SystemExit("the real anvil package must not be importable in the project venv")
    from anvil_nb import server as S

_KINDS = ("NoServerFunctionError", "PermissionDenied", "UplinkDisconnectedError")


def catch(name, *args, **kwargs):
    try:
        return {"ok": True, "value": S.call(name, *args, **kwargs)}
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc),
                "is": [k for k in _KINDS if isinstance(exc, getattr(S, k))]}


for _line in sys.stdin:
    globals().pop("result", None)
    try:
        exec(compile(json.loads(_line), "<snippet>", "exec"), globals())
        _answer = {"ok": True, "result": globals().get("result")}
    except BaseException as _exc:
        _answer = {"ok": False, "error": f"{type(_exc).__name__}: {_exc}",
                   "trace": traceback.format_exc()}
    _out.write(json.dumps(_answer, default=repr) + "\n")
    _out.flush()
os._exit(0)  # the real client's threads are not daemons
"""


class Agent:
    """A Python process (``nb``: anvil_nb's client; ``real``: anvil-uplink 0.7.0) run by snippets."""

    def __init__(self, mode: str, log_dir: Path, uplink_dir: Path | None = None):
        self.mode = mode
        env = base_env()
        if mode == "real":
            assert uplink_dir is not None
            env["PYTHONPATH"] = str(uplink_dir)
        self.log_path = log_dir / f"agent-{mode}-{secrets.token_hex(3)}.log"
        self.proc, self._lines, self._log = start_piped(
            [sys.executable, "-c", AGENT, mode],
            self.log_path,
            stdin=subprocess.PIPE,
            env=env,
            cwd=log_dir,
        )

    def run(self, code: str, timeout: float = WAIT) -> Any:
        """Run *code* (which may set ``result``) and return ``result``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._lines.next(time.monotonic() + timeout)
        except queue.Empty:
            pytest.fail(f"{self.mode} agent: no answer within {timeout} s\n{tail(self.log_path)}")
        if line is None:
            pytest.fail(f"{self.mode} agent exited ({self.proc.poll()})\n{tail(self.log_path)}")
        answer = json.loads(line)
        if not answer["ok"]:
            pytest.fail(f"{self.mode} agent: {answer['error']}\n{answer['trace']}")
        return answer["result"]

    def connect(self, key: str, url: str) -> None:
        self.run(f"S.connect({key!r}, url={url!r}, quiet=True)")

    def call(self, name: str, *args: Any) -> dict[str, Any]:
        """``S.call(name, *args)``: ``{"ok", "value"}`` or ``{"ok": False, "type", "is"}``."""
        return self.run(f"result = catch({name!r}, *{args!r})")

    def stop(self) -> None:
        close_piped(self.proc, self._lines, self._log, wait=2.0, close_stdin=True)


Spawn = Callable[..., Agent]


@contextlib.contextmanager
def _spawner(log_dir: Path, uplink_dir: Path) -> Iterator[Spawn]:
    agents: list[Agent] = []

    def spawn(mode: str, key: str, url: str) -> Agent:
        a = Agent(mode, log_dir, uplink_dir)
        agents.append(a)
        a.connect(key, url)
        return a

    try:
        yield spawn
    finally:
        for a in agents:
            a.stop()


@pytest.fixture(scope="module")
def module_spawn(
    tmp_path_factory: pytest.TempPathFactory, anvil_uplink_dir: Path
) -> Iterator[Spawn]:
    with _spawner(tmp_path_factory.mktemp("agents"), anvil_uplink_dir) as spawn:
        yield spawn


@pytest.fixture
def spawn(tmp_path: Path, anvil_uplink_dir: Path) -> Iterator[Spawn]:
    with _spawner(tmp_path, anvil_uplink_dir) as spawn:
        yield spawn


@pytest.fixture(scope="module")
def nb_caller(module_spawn: Spawn, status: dict[str, Any]) -> Agent:
    """anvil_nb's client in another process, connected to the shared kernel's host (client key)."""
    return module_spawn("nb", status["client_key"], status["url"])


@pytest.fixture(scope="module")
def real_caller(module_spawn: Spawn, status: dict[str, Any]) -> Agent:
    """The real anvil-uplink client, connected to the shared kernel's host with the client key."""
    return module_spawn("real", status["client_key"], status["url"])


# ---------------------------------------------------------------------------------------------
# A standalone host


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProc]:
    """``python -m anvil_nb serve --port 0`` with its own keys and data dir."""
    h = ServeProc(tmp_path_factory.mktemp("serve"))
    yield h
    h.stop()


# ---------------------------------------------------------------------------------------------
# Helpers for cells


def callable_cell(body: str, options: str = "") -> str:
    """A ``%%callable`` cell with *body* (dedented)."""
    return f"%%callable {options}".rstrip() + "\n" + textwrap.dedent(body).strip("\n") + "\n"


def _no_function(outcome: dict[str, Any]) -> bool:
    return not outcome["ok"] and "NoServerFunctionError" in outcome["is"]


def _ok(value: Any) -> dict[str, Any]:
    return {"ok": True, "value": value}


CTX_FN = """
def {name}():
    from anvil_nb import server as _s
    c = _s.context
    return {{
        "type": c.type,
        "remote_type": c.remote_caller.type,
        "trusted": c.remote_caller.is_trusted,
        "client_type": c.client.type,
        "stack": [f.type for f in c.call_stack],
    }}
"""


# ---------------------------------------------------------------------------------------------
# 1. %load_ext and status


def test_load_ext_without_env_starts_an_embedded_host(kernel, status, nb_caller):
    assert kernel.load_result is not None and kernel.load_result.error is None
    m = URL_RE.fullmatch(status["url"])
    assert m is not None, status
    assert status["embedded"] is True, status
    assert isinstance(status["client_key"], str) and len(status["client_key"]) >= 16, status
    assert isinstance(status["server_key"], str) and len(status["server_key"]) >= 16, status
    assert status["client_key"] != status["server_key"], status
    assert isinstance(status["functions"], list), status
    assert isinstance(status["classes"], list), status
    # Nothing of anvil_nb's own is shown as registered by the notebook.
    assert "anvil.server._LoadAppResponse" not in status["classes"], status
    # The embedded host listens in the kernel process: its port belongs to the kernel.
    assert kernel.value(
        f"import socket\ns = socket.create_connection(('127.0.0.1', {int(m.group(1))}), 5)\n"
        "s.close()\nresult = True"
    )
    # ... and an uplink from another process got in with the client key (the nb_caller fixture).
    assert nb_caller.run("result = S.is_app_online()") is True


def test_status_magic_hides_the_server_key_unless_asked(kernel, status, nb_caller):
    kernel.run_ok(callable_cell("def st_listed():\n    return 1"))
    out = kernel.run_ok("%anvil status").stdout
    assert status["url"] in out, out
    assert status["client_key"] in out, out
    assert status["server_key"] not in out, out
    assert "st_listed" in out, out
    # the connected client (nb_caller) is shown
    assert "client_uplink" in out, out
    out = kernel.run_ok("%anvil status --server-key").stdout
    assert status["server_key"] in out, out


# ---------------------------------------------------------------------------------------------
# 2. %%callable: from the kernel, another anvil_nb process, and the real anvil-uplink client


def test_callable_cell_runs_in_the_user_namespace(kernel, nb_caller):
    res = kernel.run_ok(
        callable_cell("""
        ns_base = 41
        def ns_add_one(v):
            def ns_inner():
                return 1
            return v + ns_inner()
        print("cell ran", ns_add_one(ns_base))
        """)
    )
    assert res.stdout == "cell ran 42\n", res.text
    assert res.stderr == "", res.text
    assert kernel.value("result = [ns_base, ns_add_one(1)]") == [41, 2]
    assert nb_caller.call("ns_add_one", 9) == _ok(10)
    assert _no_function(nb_caller.call("ns_inner")), "a nested function is not top-level"
    st = kernel.status()
    assert "ns_add_one" in st["functions"], st
    assert "ns_inner" not in st["functions"], st


def test_callable_cell_shows_its_last_expression_like_a_normal_cell(kernel):
    res = kernel.run_ok(callable_cell("def ns_seven():\n    return 7\nns_seven() * 6"))
    plain = [d.get("text/plain") for d in res.displays]
    assert plain == ["42"], f"expected the Out[] value '42' like a normal cell, got {res!r}"


def test_imported_names_are_not_registered(kernel, nb_caller):
    kernel.run_ok(
        callable_cell("""
        from os.path import join as imp_join
        import json as imp_json
        def imp_mine():
            return imp_join("a", "b")
        """)
    )
    assert nb_caller.call("imp_mine") == _ok("a/b")
    assert _no_function(nb_caller.call("imp_join"))
    assert "imp_join" not in kernel.status()["functions"]


def test_callable_from_the_same_kernel_is_trusted_server_module(kernel):
    kernel.run_ok(callable_cell(CTX_FN.format(name="ctx_same")))
    out = kernel.call("ctx_same")
    assert out["ok"], out
    ctx = out["value"]
    assert ctx["remote_type"] == "server_module", ctx
    assert ctx["trusted"] is True, ctx
    assert ctx["type"] == "server_module", ctx
    assert ctx["stack"] == ["server_module"], ctx


def test_callable_from_another_anvil_nb_process(kernel, nb_caller):
    kernel.run_ok(
        callable_cell(CTX_FN.format(name="ctx_nb") + "\ndef nb_add(a, b):\n    return a + b")
    )
    assert nb_caller.call("nb_add", 40, 2) == _ok(42)
    ctx = nb_caller.call("ctx_nb")["value"]
    assert {k: ctx[k] for k in ("remote_type", "trusted", "client_type")} == {
        "remote_type": "client_uplink",
        "trusted": False,
        "client_type": "client_uplink",
    }, ctx
    assert ctx["type"] == "server_module", ctx


def test_callable_from_the_real_anvil_uplink_client_is_untrusted(kernel, real_caller):
    kernel.run_ok(
        callable_cell(CTX_FN.format(name="ctx_real") + "\ndef real_add(a, b):\n    return a + b")
    )
    assert real_caller.call("real_add", 2, 3) == _ok(5)
    ctx = real_caller.call("ctx_real")["value"]
    assert ctx["remote_type"] == "client_uplink", ctx
    assert ctx["trusted"] is False, ctx
    assert ctx["client_type"] == "client_uplink", ctx
    assert ctx["stack"] == ["client_uplink"], ctx
    assert ctx["type"] == "server_module", ctx


def test_portable_class_round_trips_with_the_real_uplink_client(kernel, real_caller):
    kernel.run_ok(
        callable_cell("""
        class Point:
            def __init__(self, x, y):
                self.x = x
                self.y = y

        def make_point(x, y):
            return Point(x, y)

        def move_point(p, dx):
            if type(p) is not Point:
                raise TypeError(f"move_point() got a {type(p).__module__}.{type(p).__name__}")
            return Point(p.x + dx, p.y)
        """)
    )
    assert "__main__.Point" in kernel.status()["classes"]
    out = real_caller.run("""
        @S.portable_class("__main__.Point")
        class Point:
            def __init__(self, x, y):
                self.x = x
                self.y = y

        made = S.call("make_point", 1, 2)
        moved = S.call("move_point", Point(3, 4), 10)
        result = [type(made) is Point, made.x, made.y, type(moved) is Point, moved.x, moved.y]
    """)
    assert out == [True, 1, 2, True, 13, 4], out
    # In the kernel too, the object comes back as a copy of the cell's class.
    assert kernel.value("""
        _p = Point(1, 1)
        _q = server.call("move_point", _p, 1)
        result = [type(_q) is Point, _q is not _p, _q.x, _p.x]
    """) == [True, True, 2, 1]


def test_plain_decorators_work_in_any_cell(kernel, nb_caller):
    kernel.run_ok(
        textwrap.dedent("""
        from anvil_nb import server

        @server.portable_class
        class DecoBox:
            def __init__(self, v):
                self.v = v

        @server.callable
        def deco_double(x):
            return 2 * x

        @server.callable("deco_named")
        def deco_box(v):
            return DecoBox(v)
        """)
    )
    assert nb_caller.call("deco_double", 21) == _ok(42)  # callable as soon as the cell returned
    assert kernel.value(
        "_b = server.call('deco_named', 5)\nresult = [type(_b) is DecoBox, _b.v]"
    ) == [
        True,
        5,
    ]
    assert "deco_double" in kernel.status()["functions"]


def test_http_endpoints_in_a_callable_cell_are_served_at_the_api_origin(kernel):
    cell = """
    @server.http_endpoint("/k-hello/:name")
    def k_hello(name, greeting="hello"):
        return f"{greeting} {name}"
    """
    kernel.run_ok(callable_cell(cell), cell_id="endpoint-cell")
    app_origin, api_origin = kernel.value(
        "result = [server.get_app_origin(), server.get_api_origin()]"
    )
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", app_origin), app_origin
    assert api_origin == app_origin + "/_/api"
    got = requests.get(api_origin + "/k-hello/ann?greeting=hi", timeout=WAIT)
    assert (got.status_code, got.text) == (200, "hi ann")
    functions = kernel.status()["functions"]
    assert "k_hello" not in functions  # served as an endpoint only, not also as a callable
    assert "http:/k-hello/([^/]*)" in functions
    # re-running the cell with another path withdraws the old one
    kernel.run_ok(callable_cell(cell.replace("/k-hello/", "/k-greet/")), cell_id="endpoint-cell")
    assert requests.get(api_origin + "/k-hello/ann", timeout=WAIT).status_code == 404
    assert requests.get(api_origin + "/k-greet/bo", timeout=WAIT).text == "hello bo"


def test_a_kernel_s_endpoints_with_basic_auth_against_its_users_and_cors(kernel):
    kernel.run_ok(
        callable_cell("""
        from anvil_nb import users
        @server.http_endpoint("/k-me", authenticate_users=True, enable_cors=True)
        def k_me():
            return {"email": server.request.user["email"]}
        """)
    )
    kernel.run_ok("users.signup_with_email('kim@example.com', 'kernel password')\nusers.logout()")
    url = kernel.value("result = server.get_api_origin()") + "/k-me"
    assert requests.get(url, timeout=WAIT).status_code == 401
    assert requests.get(url, auth=("kim@example.com", "wrong"), timeout=WAIT).status_code == 401
    ok = requests.get(url, auth=("kim@example.com", "kernel password"), timeout=WAIT)
    assert ok.json() == {"email": "kim@example.com"}
    assert ok.headers["Access-Control-Allow-Origin"] == "*"
    pre = requests.options(url, headers={"Origin": "https://a.example"}, timeout=WAIT)
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == "*"


def test_a_kernel_s_background_task_runs_reports_state_and_is_killed_within_a_second(
    kernel, nb_caller
):
    kernel.run_ok(
        callable_cell("""
        import time
        @server.background_task
        def k_spin():
            started, i = time.monotonic(), 0
            while time.monotonic() - started < 60:  # a busy Python loop
                i += 1
                if i % 1000 == 0:
                    server.task_state["progress"] = i
            return "ran out"

        def k_ping():
            return "pong"
        """)
    )
    functions = kernel.status()["functions"]
    assert "task:k_spin" in functions and "k_spin" not in functions
    kernel.run_ok("k_task = server.launch_background_task('k_spin')")
    assert (
        kernel.value(
            "deadline = time.monotonic() + 10\n"
            "while not k_task.get_state().get('progress'):\n"
            "    assert time.monotonic() < deadline\n"
            "    time.sleep(0.02)\n"
            "result = k_task.get_termination_status()"
        )
        is None
    )
    elapsed = kernel.value(
        "import threading\n"
        "t0 = time.monotonic()\n"
        "k_task.kill()\n"
        "while any(x.name.startswith('anvil_nb-task-') for x in threading.enumerate()):\n"
        "    assert time.monotonic() - t0 < 1.0, 'the task still runs 1 s after kill()'\n"
        "    time.sleep(0.005)\n"
        "result = time.monotonic() - t0"
    )
    assert elapsed < 1.0
    assert kernel.value("result = k_task.get_termination_status()") == "killed"
    assert nb_caller.call("k_ping") == _ok("pong")  # the kernel keeps serving


# ---------------------------------------------------------------------------------------------
# 3. Re-running, options, errors, async


def test_rerun_replaces_registrations_and_drops_deleted_functions(kernel, nb_caller):
    cell = f"rerun-{uuid.uuid4()}"
    v1 = callable_cell("""
        class RrThing:
            pass
        def rr_keep():
            return 1
        def rr_drop():
            return "drop"
        """)
    res = kernel.run_ok(v1, cell_id=cell)
    assert nb_caller.call("rr_keep") == _ok(1)
    assert nb_caller.call("rr_drop") == _ok("drop")

    v2 = callable_cell("""
        class RrThing:
            pass
        def rr_keep():
            return 2
        """)
    for run in (v2, v2):  # re-run the new version, then once more unchanged
        res = kernel.run_ok(run, cell_id=cell)
        assert res.stdout == "" and res.stderr == "" and res.displays == [], res.text
        assert "warn" not in res.text.lower(), res.text
        assert nb_caller.call("rr_keep") == _ok(2)
        assert kernel.call("rr_keep") == _ok(2)
        assert _no_function(nb_caller.call("rr_drop")), nb_caller.call("rr_drop")
        assert _no_function(kernel.call("rr_drop"))
        st = kernel.status()
        assert st["functions"].count("rr_keep") == 1, st
        assert "rr_drop" not in st["functions"], st
        assert st["classes"].count("__main__.RrThing") == 1, st


def test_a_function_moved_to_another_cell_stays_registered(kernel, nb_caller):
    # Cell X defines mv_f; cell Y defines a new mv_f; X is re-run without it: Y's mv_f stays.
    x, y = f"mv-x-{uuid.uuid4()}", f"mv-y-{uuid.uuid4()}"
    kernel.run_ok(callable_cell("def mv_f():\n    return 'x'"), cell_id=x)
    kernel.run_ok(callable_cell("def mv_f():\n    return 'y'"), cell_id=y)
    assert nb_caller.call("mv_f") == _ok("y")
    kernel.run_ok(callable_cell("def mv_other():\n    return 'o'"), cell_id=x)
    assert nb_caller.call("mv_other") == _ok("o")
    assert nb_caller.call("mv_f") == _ok("y"), "cell Y's mv_f was unregistered by re-running X"
    assert "mv_f" in kernel.status()["functions"]


def test_cells_without_cell_id_keep_each_others_registrations(kernel, nb_caller):
    # nbclient, nbval and plain IPython send no cellId.
    kernel.run_ok(callable_cell("def noid_one():\n    return 1"), cell_id=None)
    kernel.run_ok(callable_cell("def noid_two():\n    return 2"), cell_id=None)
    res = kernel.run_ok(callable_cell("def noid_two():\n    return 22"), cell_id=None)
    assert res.text.strip() == "", res.text
    assert nb_caller.call("noid_one") == _ok(1)
    assert nb_caller.call("noid_two") == _ok(22)
    assert kernel.status()["functions"].count("noid_two") == 1


def test_name_option_registers_the_single_function_under_that_name(kernel, nb_caller):
    kernel.run_ok(callable_cell("def make_loud(s):\n    return s.upper() + '!'", "--name shout"))
    assert nb_caller.call("shout", "hi") == _ok("HI!")
    assert _no_function(nb_caller.call("make_loud"))
    assert kernel.value("result = make_loud('x')") == "X!"  # still a normal name in the notebook


def test_require_user_refuses_calls_without_a_user(kernel, nb_caller, real_caller):
    kernel.run_ok(callable_cell("def ru_secret():\n    return 42", "--require-user"))
    for out in (
        kernel.call("ru_secret"),
        nb_caller.call("ru_secret"),
        real_caller.call("ru_secret"),
    ):
        assert not out["ok"], out
        # anvil.users.AuthenticationFailed, as on Anvil (the real caller has not imported
        # anvil.users, so it knows the type only by name)
        assert out["type"] in ("AuthenticationFailed", "AnvilWrappedError"), out
        assert "must be logged in" in out["message"], out


def test_a_cell_that_raises_registers_nothing_and_shows_the_users_traceback(kernel, nb_caller):
    res = kernel.run(
        callable_cell("""
        class RzThing:
            pass
        def rz_fn():
            return 1
        def rz_helper():
            raise ValueError("cell failed on purpose")
        rz_helper()
        """)
    )
    assert res.error is not None, res.text
    assert res.error["ename"] == "ValueError", res.error
    assert "cell failed on purpose" in res.error["evalue"], res.error
    tb = res.error["traceback"]
    assert 'raise ValueError("cell failed on purpose")' in tb, tb
    assert "rz_helper()" in tb, tb
    assert _no_function(nb_caller.call("rz_fn"))
    st = kernel.status()
    assert "rz_fn" not in st["functions"], st
    assert "__main__.RzThing" not in st["classes"], st


def test_a_failing_cells_traceback_has_no_anvil_nb_frames(kernel):
    res = kernel.run(callable_cell("def rz2():\n    return 1\nraise KeyError('rz2 boom')"))
    assert res.error is not None and res.error["ename"] == "KeyError", res.text
    tb = res.error["traceback"]
    assert "magics.py" not in tb and "anvil_nb" not in tb, tb


def test_a_failing_cells_traceback_names_the_cell_by_its_number(kernel):
    res = kernel.run(callable_cell("def rz3():\n    return 1\nraise KeyError('rz3 boom')"))
    assert res.error is not None, res.text
    n = res.execution_count
    # The frame of the user's line must be labelled with this cell's own In[n].
    chunks = re.split(r"(?=Cell In\[\d+\])", res.error["traceback"])
    user = [
        int(re.match(r"Cell In\[(\d+)\]", c).group(1))
        for c in chunks
        if c.startswith("Cell In[") and re.search(r"-+> \d+ raise KeyError\('rz3 boom'\)", c)
    ]
    assert user == [n], (
        f"cell In[{n}]: the user's line is labelled {user}\n{res.error['traceback']}"
    )


def test_a_syntax_error_in_a_callable_cell_names_the_users_line(kernel):
    # IPython lists the frames a SyntaxError passed through when a magic raises it, so a few
    # frames of the magic show above the user's line (docs/jupyter.md); the error itself is
    # the user's: their cell, their line, the caret, SyntaxError.
    res = kernel.run(callable_cell("def se_fn(:\n    return 1"))
    assert res.error is not None and res.error["ename"] == "SyntaxError", res.text
    tb = res.error["traceback"]
    assert "def se_fn(:" in tb and "^" in tb, tb
    assert "codeop.py" not in tb, tb
    assert "se_fn" not in kernel.status()["functions"]


def test_async_def_functions(kernel, nb_caller, real_caller):
    kernel.run_ok(
        callable_cell("""
        import asyncio
        async def as_add(a, b):
            await asyncio.sleep(0.01)
            return a + b
        """)
    )
    assert kernel.call("as_add", 1, 2) == _ok(3)
    assert nb_caller.call("as_add", 2, 2) == _ok(4)
    assert real_caller.call("as_add", 3, 2) == _ok(5)


# ---------------------------------------------------------------------------------------------
# 4. Blocked cells, captured output, interrupts


@pytest.mark.parametrize("how", ["event_wait", "server_call"])
def test_a_blocked_cell_still_serves_calls_and_their_output_stays_out(kernel, nb_caller, how):
    p = f"blk_{how}_"
    kernel.run_ok(
        callable_cell(
            """
        import sys, threading
        P_gate = threading.Event()

        def P_wait(timeout):
            return P_gate.wait(timeout)

        def P_noisy(tag):
            print("NOISY-OUT-" + tag)
            print("NOISY-ERR-" + tag, file=sys.stderr)
            return tag

        def P_open():
            print("NOISY-OPEN")
            P_gate.set()
            return "opened"
        """.replace("P_", p)
        )
    )
    block = f"{p}gate.wait(30)" if how == "event_wait" else f"server.call('{p}wait', 30)"
    mid = kernel.send(f"print('BLOCKED-START', flush=True)\n_r = {block}\nprint('BLOCKED-END', _r)")
    kernel.wait_output(mid, "BLOCKED-START")
    started = time.monotonic()
    assert nb_caller.call(p + "noisy", "x") == _ok("x")
    assert nb_caller.call(p + "open") == _ok("opened")
    res = kernel.result(mid)
    took = time.monotonic() - started
    assert "BLOCKED-END True" in res.stdout, res.text
    assert took < 15, f"the cell was released after {took:.1f} s (by its timeout, not the call)"
    assert "NOISY" not in res.text, f"call output leaked into the running cell:\n{res.text}"
    kernel.drain()
    assert "NOISY" not in kernel.all_streams(), "call output leaked into some cell's output"


def test_call_output_is_on_the_clients_event_bus(kernel, nb_caller):
    kernel.run_ok(
        textwrap.dedent("""
        from anvil_nb import runtime
        from anvil_nb.core.events import CallFinished
        _finished = []
        _unsub = runtime.current_client(start=False).events.subscribe(
            lambda e: _finished.append(e) if isinstance(e, CallFinished) else None
        )
        """)
    )
    kernel.run_ok(callable_cell("def ev_print(n):\n    print('ev line', n)\n    return n"))
    assert nb_caller.call("ev_print", 7) == _ok(7)
    out = kernel.value("""
        _unsub()
        result = [(e.command, e.output, e.ok) for e in _finished if e.command == "ev_print"]
    """)
    assert out == [["ev_print", "ev line 7\n", True]], out


def test_interrupting_a_blocked_cell_keeps_the_connection(kernels, spawn):
    k = kernels.start("interrupt")
    k.load()
    st = k.status()
    caller = spawn("nb", st["client_key"], st["url"])
    k.run_ok(
        callable_cell("""
        import threading
        it_gate = threading.Event()
        def it_ping():
            return "pong"
        def it_hang():
            return it_gate.wait(30)
        """)
    )
    blocked = (
        "import threading\nprint('WAITING', flush=True)\nthreading.Event().wait(30)",
        "print('WAITING', flush=True)\nserver.call('it_hang')",
    )
    for code in blocked:
        mid = k.send(code)
        k.wait_output(mid, "WAITING")
        k.interrupt()
        res = k.result(mid, timeout=10)
        assert res.error is not None and res.error["ename"] == "KeyboardInterrupt", res.text
        assert caller.call("it_ping") == _ok("pong")
        assert k.call("it_ping") == _ok("pong")
    k.run_ok("it_gate.set()")
    k.run_ok(callable_cell("def it_after():\n    return 'after'"))
    assert caller.call("it_after") == _ok("after")
    assert k.status()["url"] == st["url"]


# ---------------------------------------------------------------------------------------------
# 5. Several kernels on one host; shutdown; %anvil connect


def _poll_no_function(runner: Callable[[str], Any], name: str) -> dict[str, Any]:
    """Snippet-side loop: call *name* until NoServerFunctionError (3 s at most)."""
    return runner(f"""
        import time as _t
        _seen = []
        _t0 = _t.monotonic()
        while True:
            _o = CALL({name!r})
            _seen.append("ok" if _o["ok"] else _o["type"])
            if (not _o["ok"] and "NoServerFunctionError" in _o["is"]) or _t.monotonic() - _t0 > 3:
                break
        result = {{"seen": _seen, "elapsed": _t.monotonic() - _t0}}
    """)


def test_two_kernels_on_one_host_call_each_other_and_vanish_on_shutdown(kernels, spawn, served):
    env = {"ANVIL_NB_URL": served.url, "ANVIL_NB_SERVER_KEY": served.server_key}
    a = kernels.start("A", **env)
    b = kernels.start("B", **env)
    a.load()
    b.load()
    for k in (a, b):
        st = k.status()
        assert st["embedded"] is False, st
        assert st["url"] == served.url, st
        assert st["server_key"] == served.server_key, st
        assert st["client_key"] == served.client_key, st
    a.run_ok(callable_cell(CTX_FN.format(name="tk_ctx_a") + "\ndef tk_a(x):\n    return 'A' + x"))
    b.run_ok(callable_cell(CTX_FN.format(name="tk_ctx_b") + "\ndef tk_b(x):\n    return 'B' + x"))
    assert a.call("tk_b", "1") == _ok("B1")
    assert b.call("tk_a", "2") == _ok("A2")
    ctx = a.call("tk_ctx_b")["value"]
    assert (ctx["remote_type"], ctx["trusted"], ctx["type"]) == (
        "server_module",
        True,
        "server_module",
    ), ctx
    caller = spawn("nb", served.client_key, served.url)
    assert caller.call("tk_a", "3") == _ok("A3")
    assert caller.call("tk_b", "4") == _ok("B4")
    assert "client_uplink" in a.run_ok("%anvil status").stdout

    # A shuts down (gracefully): its functions are gone at once.
    a.shutdown()
    out = _poll_no_function(lambda code: b.value(code.replace("CALL(", "_probe(")), "tk_a")
    assert out["seen"][-1] == "NoServerFunctionError", out
    assert out["seen"][0] == "NoServerFunctionError", f"not gone at once: {out}"
    assert b.call("tk_b", "5") == _ok("B5")

    # B's process is killed: its functions are gone as soon as the host sees the socket close.
    b.shutdown(now=True)
    out = _poll_no_function(lambda code: caller.run(code.replace("CALL(", "catch(")), "tk_b")
    assert out["seen"][-1] == "NoServerFunctionError", out
    assert out["elapsed"] < 3, out


def test_anvil_connect_moves_the_kernel_to_another_host(kernels, spawn, served, status):
    k = kernels.start("connect")
    k.load()
    before = k.status()
    assert before["embedded"] is True
    # Fresh random keys for every embedded host.
    assert before["client_key"] != status["client_key"]
    assert before["server_key"] != status["server_key"]
    k.run_ok(callable_cell("def cn_before():\n    return 'before'"))
    res = k.run_ok(f"%anvil connect {served.url} {served.server_key}")
    assert served.url in res.stdout, res.text
    after = k.status()
    assert after["embedded"] is False, after
    assert after["url"] == served.url, after
    caller = spawn("nb", served.client_key, served.url)
    assert caller.call("cn_before") == _ok("before")  # registrations follow the kernel
    k.run_ok(callable_cell("def cn_after():\n    return 'after'"))
    assert caller.call("cn_after") == _ok("after")
    assert k.call("cn_after") == _ok("after")


def test_a_failed_anvil_connect_keeps_the_current_connection(kernels, spawn, served):
    k = kernels.start("badconnect")
    k.load()
    before = k.status()
    caller = spawn("nb", before["client_key"], before["url"])
    k.run_ok(callable_cell("def bc_fn():\n    return 'still here'"))
    res = k.run(f"%anvil connect {served.url} not-the-server-key")
    # A short UsageError (no anvil_nb traceback): the cell fails and says why.
    assert res.status == "error", res.text
    assert "UsageError: %anvil connect" in res.stderr and "Incorrect uplink key" in res.stderr
    after = k.status()
    assert (after.get("url"), after.get("embedded"), after.get("connected")) == (
        before["url"],
        True,
        True,
    ), after
    assert caller.call("bc_fn") == _ok("still here")


def test_an_explicit_portable_name_in_a_callable_cell_is_kept(kernel):
    kernel.run_ok(
        callable_cell("""
        from anvil_nb import server
        @server.portable_class("my.UniqueThing")
        class UniqueThing:
            pass
        """)
    )
    classes = kernel.status()["classes"]
    assert "my.UniqueThing" in classes and "__main__.UniqueThing" not in classes


def test_server_disconnect_leaves_the_host_like_unload_ext(kernels):
    k = kernels.start("disconnect")
    k.load()
    assert k.status()["connected"] is True
    k.run_ok("from anvil_nb import server\nserver.disconnect()")
    assert k.status() == {"connected": False, "functions": k.status()["functions"]}


@pytest.mark.parametrize(
    ("session_name", "root", "app"),
    [
        ("one.ipynb", None, "one"),  # a session made through the REST API: relative
        ("/srv/nb/Sub Dir/Two.ipynb", "/srv/nb", "sub-dir-two"),  # JupyterLab: absolute
        ("/elsewhere/Three.ipynb", "/srv/nb", "three"),
        (None, None, None),  # a kernel without a notebook joins default
    ],
)
def test_a_kernel_joins_the_app_named_after_its_notebook(monkeypatch, session_name, root, app):
    from anvil_nb import config
    from anvil_nb.jupyter import kernel

    for name, value in ((config.ENV_NOTEBOOK, session_name), (config.ENV_ROOT, root)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert kernel.notebook_app() == app
