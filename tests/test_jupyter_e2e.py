"""End to end: a real ``jupyter server`` process, a real kernel, and a script calling into it.

The server runs as a subprocess with a token and the base URL ``/jh/user/`` (as behind
JupyterHub), and nothing anvil_nb-specific on its command line but the data dir: the extension
is enabled by the jupyter-config file that installing anvil_nb put into the environment. A
kernel started through the REST API runs ``%load_ext anvil_nb`` and a ``%%callable`` cell over
the kernel WebSocket (Jupyter messaging protocol v5); anvil_nb's own client, holding the client
key that ``_/admin/state`` gives the token's holder, calls the function through the server's
``anvil/_/uplink`` route. Deleting the kernel withdraws its function at once.

Every wait is bounded: polls run against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket  # websocket-client, a dependency of jupyter_server
from support.jupyter import WAIT, JupyterProcess, jupyter_env
from support.uplink import install_anvil_uplink
from support.waiting import wait_until

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core.errors import NoServerFunctionError

BASE_URL = "/jh/user/"


class JupyterServer(JupyterProcess):
    """``jupyter server`` as a subprocess, reached over HTTP with its token."""

    log_limit = 4000

    def __init__(self, tmp_path: Path):
        jupyter = tmp_path / "jupyter"
        env = jupyter_env(
            JUPYTER_CONFIG_DIR=str(jupyter / "config"),  # no user config leaks in
            JUPYTER_RUNTIME_DIR=str(jupyter / "runtime"),
        )
        super().__init__("jupyter server", "jupyter server", tmp_path, env, BASE_URL)

    def anvil_state(self) -> dict[str, Any]:
        status, state = self.request("GET", "anvil/_/admin/state")
        assert status == 200, (status, state)
        return state


class KernelChannel:
    """The kernel's ``channels`` WebSocket, with a minimal execute (messaging protocol v5)."""

    def __init__(self, server: JupyterServer, kernel_id: str):
        url = (
            f"ws://127.0.0.1:{server.port}{BASE_URL}api/kernels/{kernel_id}/channels"
            f"?token={server.token}"
        )
        self.ws = websocket.create_connection(url, timeout=WAIT)
        self.session = uuid.uuid4().hex

    def execute(self, code: str, timeout: float = WAIT) -> tuple[dict[str, Any], list[dict]]:
        """Run *code*; return the ``execute_reply`` content and the iopub outputs."""
        msg_id = uuid.uuid4().hex
        self.ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": msg_id,
                        "msg_type": "execute_request",
                        "username": "test",
                        "session": self.session,
                        "date": datetime.now(timezone.utc).isoformat(),
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {
                        "code": code,
                        "silent": False,
                        "store_history": True,
                        "user_expressions": {},
                        "allow_stdin": False,
                        "stop_on_error": True,
                    },
                    "channel": "shell",
                    "buffers": [],
                }
            )
        )
        reply: dict[str, Any] | None = None
        idle = False
        outputs: list[dict] = []
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no reply within {timeout} s to {code!r}; got {outputs}")
            self.ws.settimeout(remaining)
            frame = self.ws.recv()
            if not isinstance(frame, str):
                continue  # binary frames carry buffers; nothing here sends any
            msg = json.loads(frame)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["header"]["msg_type"]
            if kind == "execute_reply":
                reply = msg["content"]
            elif kind == "status":
                idle = msg["content"]["execution_state"] == "idle"
            elif kind in ("stream", "error", "execute_result", "display_data"):
                outputs.append(msg["content"])
        return reply, outputs

    def run(self, code: str) -> list[dict]:
        """Execute *code* and require it to succeed; return its outputs."""
        reply, outputs = self.execute(code)
        assert reply["status"] == "ok", (code, reply, outputs)
        return outputs

    def close(self) -> None:
        self.ws.close()


def text_of(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs)


@pytest.fixture
def jupyter(tmp_path: Path) -> Iterator[JupyterServer]:
    server = JupyterServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Things with ``close()`` to close at the end, last opened first."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.close()


def test_a_kernel_function_is_called_through_the_jupyter_server(
    jupyter: JupyterServer, closing: list[Any]
):
    uplink_url = f"ws://127.0.0.1:{jupyter.port}{BASE_URL}anvil/_/uplink"

    status, kernel = jupyter.request("POST", "api/kernels", {"name": "python3"})
    assert status == 201, (status, kernel)
    kernel_id = kernel["id"]
    channel = KernelChannel(jupyter, kernel_id)
    closing.append(channel)

    # the kernel inherited where the host is
    out = channel.run("import os; print(os.environ['ANVIL_NB_URL'])")
    assert text_of(out).strip() == uplink_url, jupyter.log()

    channel.run("%load_ext anvil_nb")
    channel.run('%%callable\ndef greet(name):\n    return "hi " + name')

    # the kernel joined the server's host (not an embedded one) and its function is there
    state = jupyter.anvil_state()
    assert "greet" in state["registrations"], state
    (provider_name,) = state["registrations"]["greet"]
    kernels = [p for p in state["peers"] if p["kind"] == "server_module"]
    assert [p["name"] for p in kernels] == [provider_name], state

    client_key = (
        state.get("client_key")
        or json.loads((jupyter.data_dir / "keys.json").read_text())["client_key"]
    )
    caller = Client(
        WebSocketTransport(uplink_url, client_key, reconnect=False), functions=FunctionRegistry()
    ).start(WAIT)
    closing.append(caller)
    assert caller.call("greet", "ann") == "hi ann"

    # An unmodified anvil-uplink script, with the client key, through the Jupyter server.
    script = (
        "import anvil.server\n"
        f"anvil.server.connect({client_key!r}, url={uplink_url!r}, quiet=True)\n"
        "print('REAL:', anvil.server.call('greet', 'bob'), flush=True)\n"
        "anvil.server.disconnect()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(install_anvil_uplink())}
    real = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "REAL: hi bob" in real.stdout.splitlines(), (real.stdout, real.stderr)

    channel.close()
    status, _ = jupyter.request("DELETE", f"api/kernels/{kernel_id}")
    assert status == 204

    wait_until(
        lambda: "greet" not in jupyter.anvil_state()["registrations"],
        5.0,
        "the deleted kernel's registration to go",
    )
    assert not [p for p in jupyter.anvil_state()["peers"] if p["kind"] == "server_module"]
    with pytest.raises(NoServerFunctionError):
        caller.call("greet", "ann")
    caller.close()

    assert jupyter.stop() == 0, f"jupyter server did not stop cleanly on SIGTERM:\n{jupyter.log()}"


def test_two_notebooks_are_two_apps_and_never_collide(jupyter: JupyterServer, closing: list[Any]):
    """Each notebook's kernel joins its own app; the real client reaches each by its keys."""
    uplink_url = f"ws://127.0.0.1:{jupyter.port}{BASE_URL}anvil/_/uplink"
    apps = {}
    for path, text in (("one.ipynb", "One says hi"), ("Two Notes.ipynb", "Two says hi")):
        status, session = jupyter.request(
            "POST",
            "api/sessions",
            {"path": path, "type": "notebook", "kernel": {"name": "python3"}},
        )
        assert status == 201, (status, session)
        channel = KernelChannel(jupyter, session["kernel"]["id"])
        closing.append(channel)
        channel.run("%load_ext anvil_nb")
        channel.run(f'%%callable\ndef greet(name):\n    return "{text}, " + name')
        info = json.loads(text_of(channel.run("%anvil status --json")))
        assert info["uplink_url"] == uplink_url and info["functions"] == ["greet"], info
        apps[info["app"]] = (info, text)
    assert sorted(apps) == ["one", "two-notes"]
    status, one_state = jupyter.request("GET", "anvil/_/admin/state?app=one")
    assert status == 200, one_state
    # each kernel says which notebook it is (the Lab panel shows it)
    assert [p["label"] for p in one_state["peers"]] == ["one.ipynb"], one_state
    for info, text in apps.values():
        assert info["url"].endswith(f"{BASE_URL}anvil/app/{info['app']}/"), info
        keys_file = jupyter.data_dir / "apps" / info["app"] / "keys.json"
        assert json.loads(keys_file.read_text())["client_key"] == info["client_key"]
        script = (
            "import anvil.server\n"
            f"anvil.server.connect({info['client_key']!r}, url={uplink_url!r}, quiet=True)\n"
            "print('REAL:', anvil.server.call('greet', 'Ann'), flush=True)\n"
            "anvil.server.disconnect()\n"
        )
        real = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONPATH": str(install_anvil_uplink())},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert f"REAL: {text}, Ann" in real.stdout.splitlines(), (real.stdout, real.stderr)
    # The server's own app has no greet: the notebooks' functions stay in their apps.
    assert "greet" not in jupyter.anvil_state()["registrations"]

    # %anvil app NAME: the second notebook joins the first one's app, and its function goes
    # with it.
    assert "app:          one" in text_of(channel.run("%anvil app one"))
    moved = json.loads(text_of(channel.run("%anvil status --json")))
    again = text_of(
        channel.run("%%callable\nclass Note:\n    pass\ndef greet(name):\n    return name")
    )
    assert "'greet' is also provided by" in again, again
    status, listed = jupyter.request("GET", "anvil/_/admin/apps")
    assert status == 200, (status, listed)
    one = next(a for a in listed if a["app"] == "one")
    assert one["functions"] == ["greet"] and one["portable_classes"] == ["__main__.Note"], one
    assert moved["app"] == "one", moved
    left = Client(
        WebSocketTransport(uplink_url, apps["two-notes"][0]["client_key"], reconnect=False),
        functions=FunctionRegistry(),
    ).start(WAIT)
    closing.append(left)
    with pytest.raises(NoServerFunctionError):
        left.call("greet", "Ann")


def test_a_notebook_s_endpoints_are_served_under_its_app_behind_jupyter_auth(
    jupyter: JupyterServer, closing: list[Any]
):
    status, session = jupyter.request(
        "POST",
        "api/sessions",
        {"path": "shop.ipynb", "type": "notebook", "kernel": {"name": "python3"}},
    )
    assert status == 201, (status, session)
    channel = KernelChannel(jupyter, session["kernel"]["id"])
    closing.append(channel)
    channel.run("%load_ext anvil_nb")
    channel.run(
        "%%callable\n"
        "from anvil_nb import server\n"
        "@server.http_endpoint('/items/:n')\n"
        "def item(n):\n"
        "    server.session['seen'] = n\n"
        "    return {'item': int(n)}\n"
    )
    origins = text_of(channel.run("print(server.get_app_origin(), server.get_api_origin())"))
    app_origin = f"http://127.0.0.1:{jupyter.port}{BASE_URL}anvil/app/shop"
    assert origins.split() == [app_origin, app_origin + "/_/api"], origins
    url = app_origin + "/_/api/items/3"
    refused = requests.get(url, timeout=WAIT)
    assert refused.status_code == 403, refused.text  # not public: Jupyter's auth first
    got = requests.get(url, headers={"Authorization": f"token {jupyter.token}"}, timeout=WAIT)
    assert got.status_code == 200, got.text
    assert got.json() == {"item": 3}
    cookie = got.headers["Set-Cookie"]
    assert f"Path={BASE_URL}anvil/app/shop/" in cookie, cookie


def test_the_installed_config_enables_the_extension():
    result = subprocess.run(
        [sys.executable, "-m", "jupyter", "server", "extension", "list"],
        capture_output=True,
        text=True,
        timeout=WAIT,
        env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"},
        check=False,
    )
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "anvil_nb" in line]
    assert any("enabled" in line for line in lines), output
    assert any("OK" in line for line in lines), output  # "anvil_nb <version> OK": it imports
