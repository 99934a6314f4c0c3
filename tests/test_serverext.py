"""The Jupyter server extension ``anvil_nb`` on a real jupyter_server (pytest-jupyter).

The extension is enabled by overriding ``jp_server_config`` and Jupyter's authentication stays
on. Every test runs under pytest-jupyter's deliberately odd base URL ``/a%40b/`` and under
``/``, so no URL here is built without ``jp_base_url``.

What is checked: the extension loads and mounts the host under ``{base_url}anvil/``; the uplink
route is authenticated by the uplink key alone (no Jupyter token, any Origin) while
``_/admin/state`` always needs Jupyter's auth and ``_/api/...`` / ``_/ws`` need it unless
``AnvilNB.public``; anvil_nb's own clients call each other through the Jupyter-hosted host;
kernels inherit ``ANVIL_NB_URL`` / ``ANVIL_NB_SERVER_KEY``; keys that are not configured are
generated and kept in ``data_dir/keys.json``; the host stops with the server.

The tests run on the server's event loop, while anvil_nb's :class:`Client` is thread-based
(its transport has an I/O thread of its own): everything that blocks (``start``, ``call``,
``close``) goes through ``asyncio.to_thread`` so that the server keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import tornado.httpclient
import tornado.websocket
from support.gates import Gate
from traitlets import TraitError
from traitlets.config import Config

from anvil_nb.client.client import Client, FunctionRegistry, current_call
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core import protocol
from anvil_nb.core.errors import AppOfflineError, NoServerFunctionError, RuntimeUnavailableError
from anvil_nb.host.dispatcher import Host

pytest_plugins = ["pytest_jupyter.jupyter_server"]

SERVER_KEY = "server-key-for-jupyter-tests"
CLIENT_KEY = "client-key-for-jupyter-tests"
ENV_NAMES = ("ANVIL_NB_URL", "ANVIL_NB_SERVER_KEY", "ANVIL_NB_ROOT")
WAIT = 10.0


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(params=["/a%40b/", "/"], ids=["odd-base", "root"])
def jp_base_url(request: pytest.FixtureRequest) -> str:
    """pytest-jupyter's odd default, and the plain root."""
    return request.param


@pytest.fixture(autouse=True)
def restore_anvil_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extension writes ANVIL_NB_* into os.environ; put them back as they were afterwards."""
    for name in ENV_NAMES:
        monkeypatch.setenv(name, "placeholder")  # records the original value (or its absence)
        monkeypatch.delenv(name)


@pytest.fixture
def anvil_public() -> bool:
    return False


@pytest.fixture
def anvil_data_dir(tmp_path: Path) -> Path:
    return tmp_path / "anvil_data"


@pytest.fixture
def anvil_limits() -> dict[str, Any]:
    return {}


@pytest.fixture
def anvil_config(
    anvil_data_dir: Path, anvil_public: bool, anvil_limits: dict[str, Any]
) -> dict[str, Any]:
    config = {
        "server_key": SERVER_KEY,
        "client_key": CLIENT_KEY,
        "data_dir": str(anvil_data_dir),
        "public": anvil_public,
    }
    if anvil_limits:
        config["limits"] = anvil_limits
    return config


@pytest.fixture
def allow_unauthenticated_access() -> bool:
    return True  # jupyter_server's default


@pytest.fixture
def jp_server_config(anvil_config: dict[str, Any], allow_unauthenticated_access: bool) -> Config:
    return server_config(anvil_config, allow_unauthenticated_access)


def server_config(anvil_config: dict[str, Any], allow_unauthenticated_access: bool) -> Config:
    return Config(
        {
            "ServerApp": {
                # terminals off: pytest-jupyter adds them otherwise, and they are not ours
                "jpserver_extensions": {"anvil_nb": True, "jupyter_server_terminals": False},
                "allow_unauthenticated_access": allow_unauthenticated_access,
            },
            "AnvilNB": anvil_config,
        }
    )


@pytest.fixture
def server(jp_serverapp: Any, http_server: Any, jp_asyncio_loop: asyncio.AbstractEventLoop) -> Any:
    """The server app, listening, with its extensions started.

    pytest-jupyter never runs ``ServerApp._post_start`` (it does not start the IOLoop itself),
    so the extensions' start hooks are run here, as ``jupyter server`` does once it listens.
    """
    jp_asyncio_loop.run_until_complete(jp_serverapp.extension_manager.start_all_extensions())
    return jp_serverapp


@pytest.fixture
def anvil_url(jp_http_port: int, jp_base_url: str) -> Callable[..., str]:
    """``anvil_url("uplink", scheme="ws")`` -> the full URL of a route under ``{base_url}anvil/``."""

    def make(path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{jp_http_port}{jp_base_url}anvil/_/{path}"

    return make


@pytest.fixture
def token(server: Any) -> str:
    return server.identity_provider.token


@pytest.fixture
def fetch(server: Any, anvil_url: Callable[..., str]) -> Callable[..., Any]:
    """GET a route under ``{base_url}anvil/_/``: no auth unless ``token`` is given, no
    redirects followed, no exception for error codes.
    """

    async def get(path: str, token: str | None = None, **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"token {token}"
        client = tornado.httpclient.AsyncHTTPClient()
        return await client.fetch(
            anvil_url(path),
            headers=headers,
            follow_redirects=False,
            raise_error=False,
            request_timeout=WAIT,
            **kw,
        )

    return get


@pytest.fixture
def websockets() -> Iterator[list[tornado.websocket.WebSocketClientConnection]]:
    """Every raw websocket a test opens goes in here and is closed at the end."""
    opened: list[tornado.websocket.WebSocketClientConnection] = []
    yield opened
    for ws in opened:
        ws.close()


@pytest.fixture
def open_ws(
    server: Any,
    anvil_url: Callable[..., str],
    websockets: list[tornado.websocket.WebSocketClientConnection],
) -> Callable[..., Any]:
    """Open a websocket to ``{base_url}anvil/_/<path>`` straight with tornado (no Jupyter auth
    is added, unlike ``jp_ws_fetch``).
    """

    async def connect(
        path: str, headers: dict[str, str] | None = None
    ) -> tornado.websocket.WebSocketClientConnection:
        request = tornado.httpclient.HTTPRequest(
            anvil_url(path, scheme="ws"),
            headers=headers or {},
            connect_timeout=WAIT,
            request_timeout=WAIT,
        )
        ws = await tornado.websocket.websocket_connect(request)
        websockets.append(ws)
        return ws

    return connect


@pytest.fixture
def clients(http_server: Any) -> Iterator[list[Client]]:
    """anvil_nb clients a test started; closed before the server goes (safety net only: tests
    close their own through a thread so that the server loop keeps running).
    """
    started: list[Client] = []
    yield started
    for client in started:
        client.close()


@pytest.fixture
def join(server: Any, anvil_url: Callable[..., str], clients: list[Client]) -> Callable[..., Any]:
    """``await join(key, registry=None, url=None)`` -> a started anvil_nb :class:`Client`."""

    async def start(
        key: str, registry: FunctionRegistry | None = None, url: str | None = None
    ) -> Client:
        client = Client(
            WebSocketTransport(url or anvil_url("uplink", scheme="ws"), key, reconnect=False),
            functions=registry or FunctionRegistry(),
        )
        clients.append(client)
        return await asyncio.to_thread(client.start, WAIT)

    return start


async def read_json(ws: tornado.websocket.WebSocketClientConnection) -> dict[str, Any] | None:
    """The next frame as JSON, or ``None`` when the connection closed."""
    frame = await asyncio.wait_for(ws.read_message(), WAIT)
    return None if frame is None else orjson.loads(frame)


async def state_of(fetch: Callable[..., Any], token: str) -> dict[str, Any]:
    response = await fetch("admin/state", token=token)
    assert response.code == 200, response.body
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.body)


async def close_all(*clients: Client) -> None:
    for client in clients:
        await asyncio.to_thread(client.close)


def anvil_extension(serverapp: Any) -> Any:
    """The ``anvil_nb`` ExtensionApp instance the server loaded."""
    apps = serverapp.extension_manager.extension_apps["anvil_nb"]
    assert len(apps) == 1, apps
    return next(iter(apps))


# ---------------------------------------------------------------------------------------------
# Loading


async def test_extension_loads_and_mounts_the_host(server: Any):
    manager = server.extension_manager
    assert "anvil_nb" in manager.extensions
    assert manager.extensions["anvil_nb"].enabled
    app = anvil_extension(server)
    assert type(app).__name__ == "AnvilNB"
    assert app.name == "anvil_nb"
    # the configured traits reached the extension
    assert app.server_key == SERVER_KEY
    assert app.client_key == CLIENT_KEY
    assert app.public is False
    assert isinstance(app.host, Host)


async def test_admin_state_refuses_requests_without_the_jupyter_token(fetch: Callable[..., Any]):
    response = await fetch("admin/state")
    assert response.code in (401, 403), (response.code, response.body)
    assert b"registrations" not in (response.body or b"")
    assert CLIENT_KEY.encode() not in (response.body or b"")


async def test_admin_state_refuses_the_server_key_in_place_of_the_jupyter_token(
    fetch: Callable[..., Any],
):
    # standalone, the server key opens _/admin; inside Jupyter only Jupyter's auth does
    response = await fetch("admin/state", headers={"Authorization": f"Bearer {SERVER_KEY}"})
    assert response.code in (401, 403), (response.code, response.body)


async def test_admin_state_answers_json_with_the_jupyter_token(
    fetch: Callable[..., Any], token: str
):
    state = await state_of(fetch, token)
    assert isinstance(state["registrations"], dict)
    assert isinstance(state["peers"], list)
    assert SERVER_KEY not in json.dumps(state)


async def open_event_stream(
    anvil_url: Callable[..., str], headers: dict[str, str]
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    """GET ``_/admin/events`` over a raw connection (the stream never ends): its status code,
    and the reader positioned after the headers.
    """
    url = urlsplit(anvil_url("admin/events"))
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    lines = [
        f"GET {url.path} HTTP/1.1",
        f"Host: {url.netloc}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    status = int((await asyncio.wait_for(reader.readline(), WAIT)).split()[1])
    while (await asyncio.wait_for(reader.readline(), WAIT)).strip():
        pass  # headers
    return status, reader, writer


async def test_admin_events_streams_behind_the_jupyter_token(
    anvil_url: Callable[..., str], join: Callable[..., Any], token: str
):
    status, _, writer = await open_event_stream(anvil_url, {})
    writer.close()
    assert status in (401, 403)
    status, _, writer = await open_event_stream(
        anvil_url, {"Authorization": f"Bearer {SERVER_KEY}"}
    )
    writer.close()
    assert status in (401, 403)  # the server key opens _/admin standalone, not in Jupyter

    status, reader, writer = await open_event_stream(anvil_url, {"Authorization": f"token {token}"})
    try:
        assert status == 200
        registry = FunctionRegistry()
        registry.register("greet", _greet)
        await join(SERVER_KEY, registry)
        caller = await join(CLIENT_KEY)
        assert await caller.call_async("greet", "ann") == "hi ann (from client_uplink)"
        seen: list[dict[str, Any]] = []
        while not any(e["kind"] == "call_finished" for e in seen):
            line = await asyncio.wait_for(reader.readline(), WAIT)
            assert line, "the stream ended"
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:]))
        kinds = [(e["kind"], e.get("command") or e.get("name")) for e in seen]
        assert [k for k in kinds if k[0] != "session"] == [
            ("registration", "greet"), ("call_started", "greet"), ("call_finished", "greet")
        ]  # fmt: skip
        started = next(e for e in seen if e["kind"] == "call_started")
        assert started["caller"].startswith("client_uplink-") and started["app"] == "default"
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# The uplink route: the uplink key alone authenticates


async def test_uplink_accepts_the_server_key_without_jupyter_token_from_any_origin(
    open_ws: Callable[..., Any],
):
    ws = await open_ws("uplink", headers={"Origin": "https://unrelated.example.com"})
    await ws.write_message(orjson.dumps({"key": SERVER_KEY, "v": protocol.PROTOCOL_VERSION}))
    auth = await read_json(ws)
    assert auth is not None
    assert auth["auth"] == "OK"
    assert auth["priv"] == "uplink"


async def test_uplink_accepts_the_client_key_as_an_unprivileged_uplink(
    open_ws: Callable[..., Any],
):
    ws = await open_ws("uplink", headers={"Origin": "null"})
    await ws.write_message(orjson.dumps({"key": CLIENT_KEY, "v": protocol.PROTOCOL_VERSION}))
    auth = await read_json(ws)
    assert auth is not None
    assert auth["auth"] == "OK"
    assert auth["priv"] == "client"


async def test_uplink_refuses_a_wrong_key_with_a_fatal_frame(open_ws: Callable[..., Any]):
    ws = await open_ws("uplink", headers={"Origin": "https://unrelated.example.com"})
    await ws.write_message(orjson.dumps({"key": "not-a-key", "v": protocol.PROTOCOL_VERSION}))
    assert await read_json(ws) == {"error": "Incorrect uplink key"}
    assert await read_json(ws) is None  # then the host closes the connection


async def test_uplink_refuses_the_jupyter_token_as_an_uplink_key(
    open_ws: Callable[..., Any], token: str
):
    ws = await open_ws("uplink", headers={"Authorization": f"token {token}"})
    await ws.write_message(orjson.dumps({"key": token, "v": protocol.PROTOCOL_VERSION}))
    assert await read_json(ws) == {"error": "Incorrect uplink key"}
    assert await read_json(ws) is None


# ---------------------------------------------------------------------------------------------
# Calls through the Jupyter-hosted host


def _greet(name: str) -> str:
    state = current_call()
    assert state is not None
    caller = state.context.remote_caller
    return f"hi {name} (from {caller.type if caller else None})"


async def test_provider_and_callers_call_each_other_through_the_host(
    join: Callable[..., Any], fetch: Callable[..., Any], token: str
):
    registry = FunctionRegistry()
    registry.register("greet", _greet)
    provider = await join(SERVER_KEY, registry)
    caller = await join(CLIENT_KEY)
    # an untrusted caller (client key) reaches the provider's function
    assert await caller.call_async("greet", "ann") == "hi ann (from client_uplink)"
    # and a trusted one (the provider itself, through the host)
    assert await provider.call_async("greet", "bob") == "hi bob (from uplink)"
    with pytest.raises(NoServerFunctionError):
        await caller.call_async("nobody_serves_this")

    state = await state_of(fetch, token)
    assert list(state["registrations"]) == ["greet"]
    assert len(state["registrations"]["greet"]) == 1
    kinds = sorted(peer["kind"] for peer in state["peers"])
    assert kinds == ["client_uplink", "uplink"]
    provider_name = state["registrations"]["greet"][0]
    assert provider_name in [peer["name"] for peer in state["peers"] if peer["kind"] == "uplink"]

    await close_all(provider)
    deadline = time.monotonic() + WAIT
    while (await state_of(fetch, token))["registrations"]:
        assert time.monotonic() < deadline, "the registration outlived its provider"
        await asyncio.sleep(0.02)
    with pytest.raises(NoServerFunctionError):
        await caller.call_async("greet", "ann")
    await close_all(caller)


async def test_a_wrong_key_fails_the_client_start(join: Callable[..., Any]):
    with pytest.raises(AppOfflineError, match="Incorrect uplink key"):
        await join("not-a-key")


async def test_app_and_api_origins_include_the_base_url(
    join: Callable[..., Any], jp_http_port: int, jp_base_url: str
):
    client = await join(SERVER_KEY)
    api_origin = await client.call_async("anvil.private.get_api_origin")
    app_origin = await client.call_async("anvil.private.get_app_origin")
    await close_all(client)
    parts = urlsplit(api_origin)
    assert (parts.scheme, parts.port) == ("http", jp_http_port)
    assert parts.path == f"{jp_base_url}anvil/_/api"
    assert api_origin.startswith(app_origin)


async def test_uplink_frames_up_to_16_mib_are_accepted(open_ws: Callable[..., Any]):
    # docs/protocol.md: frames up to 16 MiB by default, in Jupyter as standalone
    ws = await open_ws("uplink")
    ws.protocol.params.max_message_size = 64 * 1024 * 1024  # let the echo back in
    await ws.write_message(orjson.dumps({"key": SERVER_KEY, "v": protocol.PROTOCOL_VERSION}))
    assert (await read_json(ws) or {}).get("auth") == "OK"
    big = "x" * (12 * 1024 * 1024)
    call = {"type": "CALL", "id": "big-1", "command": "anvil.private.echo", "args": [big]}
    with contextlib.suppress(tornado.websocket.WebSocketClosedError):
        await ws.write_message(orjson.dumps({**call, "kwargs": {}}))
    reply = await read_json(ws)
    assert reply is not None, f"the host closed the connection: {ws.close_code} {ws.close_reason}"
    assert reply["id"] == "big-1"
    assert reply.get("response") == big


async def test_uplink_connections_are_pinged_to_find_dead_peers(
    server: Any, open_ws: Callable[..., Any]
):
    # Jupyter's own default is no pings at all (ServerApp.websocket_ping_interval = 0): the
    # handler runs its own keep-alive from the host's Limits, so a frozen peer is found within
    # ping_interval + ping_timeout (tests/reliability/test_bounds.py measures it standalone).
    ws = await open_ws("uplink")
    await ws.write_message(orjson.dumps({"key": SERVER_KEY, "v": protocol.PROTOCOL_VERSION}))
    assert (await read_json(ws) or {}).get("auth") == "OK"
    (peer,) = anvil_extension(server).host.peers
    handler = peer._handler  # white-box: waiting 25 s for a real ping is too slow for a test
    limits = handler.host.limits
    assert 0 < limits.ping_interval and limits.ping_interval + limits.ping_timeout <= 30
    assert handler._keep_alive_task is not None and not handler._keep_alive_task.done()


# ---------------------------------------------------------------------------------------------
# Kernel discovery


async def test_kernels_inherit_the_uplink_url_and_the_server_key(
    server: Any, jp_http_port: int, jp_base_url: str, join: Callable[..., Any]
):
    url = os.environ.get("ANVIL_NB_URL")
    assert url, "ANVIL_NB_URL is not set once the server has started"
    assert os.environ.get("ANVIL_NB_SERVER_KEY") == SERVER_KEY
    parts = urlsplit(url)
    assert parts.scheme == "ws"
    assert parts.port == jp_http_port
    assert parts.hostname not in ("", None, "0.0.0.0", "::")
    assert parts.path == f"{jp_base_url}anvil/_/uplink"
    # what a kernel would do with them: join as a trusted uplink
    client = await join(os.environ["ANVIL_NB_SERVER_KEY"], url=url)
    assert client.own_type == "uplink"
    await close_all(client)


# ---------------------------------------------------------------------------------------------
# AnvilNB.public: _/api/... and _/ws


@pytest.mark.parametrize("anvil_public", [True])
async def test_admin_tasks_always_need_jupyter_auth(fetch: Callable[..., Any], token: str):
    assert (await fetch("admin/tasks")).code in (401, 403)
    listed = await fetch("admin/tasks", token=token)
    assert listed.code == 200 and json.loads(listed.body) == []
    assert (await fetch("admin/tasks?app=nowhere", token=token)).code == 404
    kill = await fetch("admin/tasks/kill", token=token, method="POST", body=b'{"id": "t-none"}')
    assert kill.code == 404, kill.body
    assert b"No running task" in kill.body


async def test_api_needs_the_jupyter_token_when_not_public(fetch: Callable[..., Any], token: str):
    response = await fetch("api/x")
    assert response.code in (401, 403), (response.code, response.body)
    # with the token it reaches the host, which has no endpoint there
    assert (await fetch("api/x", token=token)).code == 404


async def test_browser_ws_needs_the_jupyter_token_when_not_public(
    open_ws: Callable[..., Any], token: str
):
    with pytest.raises(tornado.httpclient.HTTPClientError) as refused:
        await open_ws("ws")
    assert refused.value.code in (401, 403)
    ws = await open_ws("ws", headers={"Authorization": f"token {token}"})
    assert ws.protocol is not None


@pytest.mark.parametrize("anvil_public", [True])
async def test_api_is_open_without_token_when_public(fetch: Callable[..., Any], server: Any):
    assert anvil_extension(server).public is True
    response = await fetch("api/x")
    assert response.code == 404, (response.code, response.body)


@pytest.mark.parametrize("anvil_public", [True])
async def test_api_post_is_open_without_token_or_xsrf_cookie_when_public(
    fetch: Callable[..., Any],
):
    # HTTP endpoints are called by scripts and other sites, which hold no Jupyter _xsrf cookie
    response = await fetch("api/x", method="POST", body=b'{"a": 1}')
    assert response.code == 404, (response.code, response.body)


async def test_api_refusals_are_json_not_html_pages(fetch: Callable[..., Any]):
    # STYLE.md section 5: at HTTP, an error is JSON with the right status code
    response = await fetch("api/x")
    assert response.code in (401, 403)
    assert response.headers.get("Content-Type", "").startswith("application/json"), (
        response.headers.get("Content-Type"),
        response.body[:80],
    )


async def test_api_post_with_the_token_reaches_the_host_when_not_public(
    fetch: Callable[..., Any], token: str
):
    response = await fetch("api/x", token=token, method="POST", body=b"{}")
    assert response.code == 404, (response.code, response.body)


@pytest.mark.parametrize("anvil_public", [True])
@pytest.mark.parametrize("anvil_limits", [{"max_http_body_bytes": 100}])
async def test_api_refuses_a_large_body_from_its_headers_inside_jupyter(fetch: Callable[..., Any]):
    response = await fetch("api/x", method="POST", body=b"x" * 101)
    assert response.code == 413, (response.code, response.body)
    assert b"100 bytes" in response.body
    assert (await fetch("api/x", method="POST", body=b"x" * 100)).code == 404  # reached the host


@pytest.mark.parametrize("anvil_public", [True])
async def test_browser_ws_is_open_without_token_when_public(open_ws: Callable[..., Any]):
    ws = await open_ws("ws")
    assert ws.protocol is not None


@pytest.mark.parametrize("anvil_public", [True])
async def test_admin_state_needs_the_jupyter_token_even_when_public(fetch: Callable[..., Any]):
    response = await fetch("admin/state")
    assert response.code in (401, 403), (response.code, response.body)


# With ServerApp.allow_unauthenticated_access = False, jupyter_server warns about every handler
# method of an extension that declares no auth rule (@allow_unauthenticated, @ws_authenticated
# or @web.authenticated), and JupyterHandler refuses unauthenticated requests to undeclared
# methods. The uplink route (its own keys) and, with AnvilNB.public, _/api and _/ws are open by
# an explicit rule of ours, so they must declare it and stay open.


@pytest.mark.parametrize("allow_unauthenticated_access", [False])
async def test_every_route_declares_its_auth_rule(server: Any, open_ws: Callable[..., Any]):
    # filterwarnings=error turns jupyter_server's JupyterServerAuthWarning into a failed load
    # of the extension, so reaching the routes shows that none was raised for them
    ws = await open_ws("uplink")
    await ws.write_message(orjson.dumps({"key": SERVER_KEY, "v": protocol.PROTOCOL_VERSION}))
    assert (await read_json(ws) or {}).get("auth") == "OK"


@pytest.mark.filterwarnings("ignore::jupyter_server.utils.JupyterServerAuthWarning")
@pytest.mark.parametrize("allow_unauthenticated_access", [False])
@pytest.mark.parametrize("anvil_public", [True])
async def test_public_routes_stay_open_when_jupyter_requires_auth_everywhere(
    fetch: Callable[..., Any], open_ws: Callable[..., Any]
):
    response = await fetch("api/x")
    assert response.code == 404, (response.code, response.body[:200])
    ws = await open_ws("ws")
    assert ws.protocol is not None


@pytest.mark.filterwarnings("ignore::jupyter_server.utils.JupyterServerAuthWarning")
@pytest.mark.parametrize("allow_unauthenticated_access", [False])
async def test_uplink_needs_no_token_when_jupyter_requires_auth_everywhere(
    open_ws: Callable[..., Any],
):
    ws = await open_ws("uplink", headers={"Origin": "https://unrelated.example.com"})
    await ws.write_message(orjson.dumps({"key": SERVER_KEY, "v": protocol.PROTOCOL_VERSION}))
    assert (await read_json(ws) or {}).get("auth") == "OK"


@pytest.mark.filterwarnings("ignore::jupyter_server.utils.JupyterServerAuthWarning")
@pytest.mark.parametrize("allow_unauthenticated_access", [False])
async def test_closed_routes_still_answer_403_when_jupyter_requires_auth_everywhere(
    fetch: Callable[..., Any],
):
    # not public: refused as in the default mode (403/401), not redirected to the login page
    response = await fetch("api/x")
    assert response.code in (401, 403), (response.code, response.headers.get("Location"))


# ---------------------------------------------------------------------------------------------
# Keys


@pytest.fixture
def unconfigured_keys(anvil_config: dict[str, Any]) -> None:
    del anvil_config["server_key"], anvil_config["client_key"]


async def test_unconfigured_keys_are_generated_and_kept_in_data_dir(
    unconfigured_keys: None,
    server: Any,
    anvil_data_dir: Path,
    fetch: Callable[..., Any],
    token: str,
    join: Callable[..., Any],
):
    path = anvil_data_dir / "keys.json"
    assert path.exists(), "keys.json was not written"
    if os.name == "posix":
        assert path.stat().st_mode & 0o077 == 0, oct(path.stat().st_mode)
    stored = json.loads(path.read_text())
    assert stored["server_key"] and stored["client_key"]
    assert stored["server_key"] != stored["client_key"]
    assert os.environ["ANVIL_NB_SERVER_KEY"] == stored["server_key"]
    assert (await state_of(fetch, token))["client_key"] == stored["client_key"]
    trusted = await join(stored["server_key"])
    untrusted = await join(stored["client_key"])
    assert (trusted.own_type, untrusted.own_type) == ("uplink", "client_uplink")
    await close_all(trusted, untrusted)


@pytest.fixture
def stored_keys(unconfigured_keys: None, anvil_data_dir: Path) -> dict[str, str]:
    keys = {"server_key": "stored-server-key", "client_key": "stored-client-key"}
    anvil_data_dir.mkdir(parents=True)
    (anvil_data_dir / "keys.json").write_text(json.dumps(keys))
    return keys


async def test_keys_kept_in_data_dir_are_used_again(
    stored_keys: dict[str, str], server: Any, fetch: Callable[..., Any], token: str
):
    assert os.environ["ANVIL_NB_SERVER_KEY"] == stored_keys["server_key"]
    assert (await state_of(fetch, token))["client_key"] == stored_keys["client_key"]


async def test_configured_keys_are_used_as_given(
    server: Any, fetch: Callable[..., Any], token: str, join: Callable[..., Any]
):
    assert (await state_of(fetch, token))["client_key"] == CLIENT_KEY
    client = await join(CLIENT_KEY)
    assert client.own_type == "client_uplink"
    await close_all(client)


# ---------------------------------------------------------------------------------------------
# The host stops with the server


async def test_the_host_stops_with_the_server(server: Any, open_ws: Callable[..., Any]):
    ws = await open_ws("uplink")
    await ws.write_message(orjson.dumps({"key": SERVER_KEY, "v": protocol.PROTOCOL_VERSION}))
    assert (await read_json(ws) or {}).get("auth") == "OK"
    await asyncio.wait_for(server.extension_manager.stop_all_extensions(), WAIT)
    deadline = time.monotonic() + WAIT
    while (await read_json(ws)) is not None:  # whatever the host says last, then it closes
        assert time.monotonic() < deadline


async def test_calls_in_flight_fail_when_the_server_stops(server: Any, join: Callable[..., Any]):
    slow = Gate("too late", timeout=WAIT)
    started, release = slow.started, slow.release
    registry = FunctionRegistry()
    registry.register("slow", slow)
    provider = await join(SERVER_KEY, registry)
    caller = await join(CLIENT_KEY)
    call = asyncio.ensure_future(caller.call_async("slow"))
    assert await asyncio.to_thread(started.wait, WAIT)
    await asyncio.wait_for(server.extension_manager.stop_all_extensions(), WAIT)
    with pytest.raises(RuntimeUnavailableError):
        await asyncio.wait_for(call, WAIT)
    release.set()
    await close_all(provider, caller)


# ---------------------------------------------------------------------------------------------
# Installation


def test_jupyter_config_file_enables_the_extension():
    path = Path(sys.prefix) / "etc/jupyter/jupyter_server_config.d/anvil_nb.json"
    assert path.exists(), f"{path} is not installed (pip install -e . installs it)"
    config = json.loads(path.read_text())
    assert config == {"ServerApp": {"jpserver_extensions": {"anvil_nb": True}}}


def test_extension_points_name_the_extension_app():
    import anvil_nb

    points = anvil_nb._jupyter_server_extension_points()
    assert len(points) == 1
    assert points[0]["module"].startswith("anvil_nb")
    assert points[0]["app"].__name__ == "AnvilNB"
    assert points[0]["app"].name == "anvil_nb"


@pytest.mark.parametrize("jp_base_url", ["/"], indirect=True)
async def test_limits_are_configurable_and_checked(
    anvil_config: dict[str, Any], jp_configurable_serverapp: Any
):
    anvil_config["limits"] = {"ping_interval": 3, "max_queued_bytes": 1 << 20}
    app = jp_configurable_serverapp(config=server_config(anvil_config, False))
    ext = anvil_extension(app)
    assert (ext.host.limits.ping_interval, ext.host.limits.max_queued_bytes) == (3, 1 << 20)
    assert ext.host.limits.handshake_timeout == 10  # the rest keep their defaults
    with pytest.raises(TraitError, match="unknown bound 'ping'"):
        ext.limits = {"ping": 1}
    with pytest.raises(TraitError, match="must be a positive number"):
        ext.limits = {"ping_timeout": -1}


async def test_the_host_service_keeps_house_on_the_servers_loop(server: Any):
    service = anvil_extension(server).service
    assert service._housekeeping is not None and service._housekeeping.is_running()
