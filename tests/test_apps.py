"""Apps: one host, many apps, and the uplink key selects the app (DESIGN.md, "Apps").

Unit tests of app names and the key ring, then a real ``anvil-nb serve`` with two apps made by
``anvil-nb keys``: each has an anvil_nb provider of ``greet``, and the unmodified
``anvil-uplink`` client with each app's client key gets that app's answer. A kernel-style
connection (the host's own server key asking for an app by name) joins the app it names.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.processes import ServeProc, stop_process, tail
from support.ws import RawWS

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.config import DEFAULT_APP, KeyRing, Keys, app_name
from anvil_nb.core.errors import PermissionDenied

WAIT = 30.0


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("default", "default"),
        ("Tutorials/01 Getting started.ipynb", "tutorials-01-getting-started"),
        ("  Ünïcode & spaces!! ", "n-code-spaces"),
        ("x" * 100, "x" * 64),
    ],
)
def test_app_names_are_slugs(text, name):
    assert app_name(text) == name


@pytest.mark.parametrize("text", ["", "---", ".ipynb", "!!!"])
def test_a_name_with_nothing_to_name_an_app_with_is_refused(text):
    with pytest.raises(ValueError, match="does not name an app"):
        app_name(text)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_ring_keeps_each_apps_keys_readable_by_the_owner_only(tmp_path):
    ring = KeyRing(tmp_path)
    assert ring.generated_default
    default = ring.default
    assert mode(tmp_path / "keys.json") == 0o600
    books = ring.keys("books")
    assert books != default and books.server_key != books.client_key
    assert mode(tmp_path / "apps" / "books" / "keys.json") == 0o600
    assert ring.identify(books.client_key) == ("books", "client_uplink")
    assert ring.identify(default.server_key) == (DEFAULT_APP, "uplink")
    assert ring.identify("nope") is None and ring.identify(None) is None
    again = KeyRing(tmp_path)  # a restart: the same keys, nothing generated
    assert not again.generated_default
    assert again.default == default and again.keys("books") == books
    assert again.names() == [DEFAULT_APP, "books"]


def test_configured_keys_of_default_are_used_and_never_written(tmp_path):
    ring = KeyRing(tmp_path, "server-k", "client-k")
    assert ring.default == Keys("server-k", "client-k") and not ring.generated_default
    assert not (tmp_path / "keys.json").exists()
    with pytest.raises(ValueError, match="must differ"):
        KeyRing(tmp_path, "same", "same")


def test_a_key_ring_in_memory_writes_nothing(tmp_path):
    ring = KeyRing.of(Keys("s", "c"))
    assert ring.keys("other").server_key.startswith("server_")
    assert ring.path("other") is None


def keys_cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anvil_nb", "keys", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )


def test_anvil_nb_keys_prints_an_apps_keys_making_it_once(tmp_path):
    first = keys_cli(tmp_path, "My Books", "--json")
    assert first.returncode == 0, first.stderr
    made = json.loads(first.stdout)
    assert made["app"] == "my-books" and made["server_key"].startswith("server_")
    assert json.loads(keys_cli(tmp_path, "my-books", "--json").stdout) == made
    plain = keys_cli(tmp_path, "my-books")
    assert plain.stdout.splitlines() == [
        "app: my-books",
        f"server key: {made['server_key']}",
        f"client key: {made['client_key']}",
    ]
    assert str(tmp_path / "apps" / "my-books" / "keys.json") in plain.stderr
    bad = keys_cli(tmp_path, "!!!")
    assert bad.returncode == 2 and "does not name an app" in bad.stderr


REAL_CALLER = textwrap.dedent(
    """
    import sys
    import anvil.server
    anvil.server.connect(sys.argv[1], url=sys.argv[2], quiet=True)
    print(anvil.server.call("greet", "Ann"), flush=True)
    anvil.server.disconnect()
    """
)


def provider(url: str, key: str, text: str, **hello: Any) -> Client:
    registry = FunctionRegistry()
    registry.register("greet", lambda name: f"{text}, {name}")
    return Client(WebSocketTransport(url, key, **hello), functions=registry).start()


def real_call(uplink_dir: Path, tmp_path: Path, key: str, url: str) -> str:
    script = tmp_path / "real_caller.py"
    script.write_text(REAL_CALLER)
    proc = subprocess.Popen(
        [sys.executable, str(script), key, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(uplink_dir)},
    )
    try:
        out, err = proc.communicate(timeout=WAIT)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, err
    return out.strip()


def test_two_apps_on_one_host_each_answer_their_own_callers(serve_proc, anvil_uplink_dir, tmp_path):
    host: ServeProc = serve_proc()
    books = json.loads(keys_cli(host.data_dir, "books", "--json").stdout)  # made while it runs
    films = json.loads(keys_cli(host.data_dir, "films", "--json").stdout)
    texts = {"books": "Books say hello", "films": "Films say hello", DEFAULT_APP: "Hi"}
    keys = {"books": books, "films": films, DEFAULT_APP: vars(host)}
    providers = [provider(host.url, keys[app]["server_key"], text) for app, text in texts.items()]
    try:
        for app, text in texts.items():
            got = real_call(anvil_uplink_dir, tmp_path, keys[app]["client_key"], host.url)
            assert got == f"{text}, Ann", (app, got, tail(host.log_path))
    finally:
        for p in providers:
            p.close()


def test_the_hosts_own_server_key_joins_the_app_a_kernel_names(
    serve_proc, anvil_uplink_dir, tmp_path
):
    host: ServeProc = serve_proc()
    kernel = provider(
        host.url,
        host.server_key,
        "Notebook says hello",
        kind="server_module",
        app="Notes/Intro.ipynb",
    )
    try:
        made = json.loads(keys_cli(host.data_dir, "notes-intro", "--json").stdout)
        assert real_call(anvil_uplink_dir, tmp_path, made["client_key"], host.url) == (
            "Notebook says hello, Ann"
        )
        caller = Client(WebSocketTransport(host.url, host.client_key), functions=FunctionRegistry())
        caller.start()
        try:
            with pytest.raises(Exception, match="No server function matching"):
                caller.call("greet", "Ann")  # default has no greet: the kernel is in its own app
        finally:
            caller.close()
    finally:
        kernel.close()


@pytest.fixture
def books_host(serve_proc: Any) -> Iterator[tuple[ServeProc, dict[str, str], Client]]:
    """A host with the app ``books`` (made by ``anvil-nb keys``) and its provider of ``greet``."""
    host: ServeProc = serve_proc()
    books = json.loads(keys_cli(host.data_dir, "books", "--json").stdout)
    shelf = provider(host.url, books["server_key"], "Shelf")
    yield host, books, shelf
    shelf.close()


def test_app_routes_name_an_app_that_exists(books_host):
    host, books, shelf = books_host
    base = host.url.removesuffix("_/uplink")
    ws = RawWS(base + "app/books/_/ws")
    try:
        deadline = time.monotonic() + WAIT
        ws.send({"type": "CALL", "id": "b1", "command": "greet", "args": ["Bo"], "kwargs": {}})
        assert ws.response("b1", timeout=max(0.0, deadline - time.monotonic()))["response"] == (
            "Shelf, Bo"
        )
    finally:
        ws.close()
    with pytest.raises(Exception, match="404"):
        RawWS(base + "app/nowhere/_/ws")


def admin(host: ServeProc, query: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{host.http_url}_/admin/state{query}",
        headers={"Authorization": f"Bearer {host.server_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_admin_state_shows_one_app_at_a_time(books_host):
    host, books, shelf = books_host
    status, state = admin(host, "?app=books")
    assert status == 200 and state["app"] == "books", state
    assert list(state["registrations"]) == ["greet"]
    assert state["client_key"] == books["client_key"]
    assert "server_key" not in state
    status, state = admin(host)
    assert status == 200 and state["app"] == DEFAULT_APP and state["registrations"] == {}
    status, state = admin(host, "?app=nowhere")
    assert status == 404 and "nowhere" in state["error"]


def test_admin_apps_lists_every_app_with_its_urls_keys_and_functions(books_host):
    host, books, shelf = books_host
    shelf.call("anvil.private.report_classes", ["books.Book"])
    request = urllib.request.Request(
        f"{host.http_url}_/admin/apps", headers={"Authorization": f"Bearer {host.server_key}"}
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        apps = {a["app"]: a for a in json.loads(response.read())}
    assert sorted(apps) == ["books", DEFAULT_APP]
    assert apps["books"] == {
        "app": "books",
        "url": f"{host.http_url}app/books/",
        "uplink_url": host.url,
        "server_key": books["server_key"],
        "client_key": books["client_key"],
        "functions": ["greet"],
        "portable_classes": ["books.Book"],
    }
    assert apps[DEFAULT_APP]["url"] == host.http_url
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(f"{host.http_url}_/admin/apps", timeout=WAIT)


def test_the_front_door_shows_an_apps_name_uplink_url_and_functions(books_host):
    host, books, shelf = books_host
    with urllib.request.urlopen(f"{host.http_url}app/books/", timeout=WAIT) as response:
        page = response.read().decode()
        assert response.headers["Content-Type"].startswith("text/html")
    assert "<code>books</code>" in page and host.url in page and "<code>greet</code>" in page
    assert books["client_key"] not in page and books["server_key"] not in page
    with urllib.request.urlopen(host.http_url, timeout=WAIT) as response:
        assert "(none yet)" in response.read().decode()  # default serves nothing here
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(f"{host.http_url}app/nowhere/", timeout=WAIT)


@pytest.mark.parametrize(
    "wanted",
    [5, ["books"], {"a": 1}, "", "!!!", "x" * 100_000],
    ids=["int", "list", "dict", "empty", "symbols", "huge"],
)
def test_a_hostile_app_name_in_a_hello_is_refused_with_a_clear_error(serve_proc, wanted):
    host: ServeProc = serve_proc()
    ws = RawWS(host.url)
    try:
        ws.send({"key": host.server_key, "v": 8, "kind": "server_module", "app": wanted})
        if isinstance(wanted, str) and len(wanted) > 64:
            reply = ws.recv()  # a long name is cut to 64 characters, not refused
            assert reply.get("auth") == "OK", reply
            assert (host.data_dir / "apps" / ("x" * 64) / "keys.json").exists()
            return
        reply = ws.recv()
        assert "Invalid app name" in reply["error"] and len(reply["error"]) < 600, reply
        assert ws.closed()
        assert not (host.data_dir / "apps").exists()  # nothing was made
    finally:
        ws.close()


def test_an_app_in_a_client_keys_hello_is_ignored(serve_proc):
    host: ServeProc = serve_proc()
    ws = RawWS(host.url)
    try:
        ws.send({"key": host.client_key, "v": 8, "app": "books"})
        assert ws.recv()["priv"] == "client"
        assert admin(host, "?app=books")[0] == 404  # no app was made
        kinds = [p["kind"] for p in admin(host)[1]["peers"]]
        assert kinds == ["client_uplink"]  # it joined default, its key's app
    finally:
        ws.close()


def test_reported_portable_classes_are_bounded_and_trusted_only(books_host):
    host, books, shelf = books_host
    assert shelf.call("anvil.private.report_classes", [f"c{i}" * 300 for i in range(5000)]) == 1000
    request = urllib.request.Request(
        f"{host.http_url}_/admin/apps", headers={"Authorization": f"Bearer {host.server_key}"}
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        (listed,) = [a for a in json.loads(response.read()) if a["app"] == "books"]
    assert len(listed["portable_classes"]) == 1000  # at most 1,000 names
    assert max(len(n) for n in listed["portable_classes"]) <= 200  # each clipped
    with pytest.raises(Exception, match="list of names"):
        shelf.call("anvil.private.report_classes", "not a list")
    caller = Client(WebSocketTransport(host.url, books["client_key"]), functions=FunctionRegistry())
    try:
        with pytest.raises(PermissionDenied):
            caller.start().call("anvil.private.report_classes", ["x"])
    finally:
        caller.close()
