"""HTTP endpoints: real HTTP requests to a real tornado host, served by anvil_nb providers.

Each test runs a host behind a real listener on 127.0.0.1 (``net``) and a provider (anvil_nb's
``Client`` over a real WebSocket) serving endpoints made by the same code as
``@server.http_endpoint``; requests go over the network with ``requests``. The pure parts
(turning a request into kwargs, rendering an answer) have unit tests at the end. The real
``anvil-uplink`` client as a provider, users and restarts are in ``test_http_real.py``.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest
import requests
from support.nethost import KEYS, NetHost
from support.waiting import wait_until
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from anvil_nb.client.client import Client, FunctionRegistry, current_call
from anvil_nb.client.endpoints import HttpHeaders, HttpResponse, endpoint_name, make_endpoint
from anvil_nb.client.endpoints import request as server_request
from anvil_nb.core.events import CallStarted, Event
from anvil_nb.core.media import BlobMedia
from anvil_nb.host.endpoints import cookie_name, door_of, is_cross_site
from anvil_nb.host.http import (
    Incoming,
    RenderError,
    basic_credentials,
    endpoint_kwargs,
    json_problem,
    render,
)

TIMEOUT = 10.0
COOKIE = cookie_name("default")


def serve(net: NetHost, *endpoints: tuple[Callable[..., Any], str, dict[str, Any]]) -> Client:
    """A provider serving *endpoints* (``(fn, path, options)``), once the host routes them."""
    return net.serve_endpoints(*endpoints)


def get(net: NetHost, path: str, **kw: Any) -> requests.Response:
    return requests.get(net.api + path, timeout=TIMEOUT, **kw)


# ---------------------------------------------------------------------------------------------
# Calling an endpoint


def test_path_query_and_request_fields_reach_the_function(net: NetHost):
    def book(id, **params):  # noqa: A002 - the path parameter's name
        r = server_request
        return {
            "id": id, "params": params, "path": r.path, "method": r.method,
            "query": r.query_params, "header": r.headers.get("x-test"),
            "remote": r.remote_address, "origin": r.origin, "body": r.body,
        }  # fmt: skip

    serve(net, (book, "/books/:id", {}))
    response = get(net, "/books/42?shelf=top&shelf=low", headers={"X-Test": "yes"})
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {
        "id": "42", "params": {"shelf": "top"}, "path": "/books/42", "method": "GET",
        "query": {"shelf": "top"}, "header": "yes", "remote": "127.0.0.1", "origin": None,
        "body": None,
    }  # fmt: skip


def test_path_parameters_win_over_query_and_query_over_form(net: NetHost):
    serve(net, (lambda a, b, c: [a, b, c], "/p/:a", {}))
    response = requests.post(
        net.api + "/p/path?a=query&b=query", data={"a": "form", "b": "form", "c": "form"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert response.json() == ["path", "query", "form"]


def test_json_body_and_body_json(net: NetHost):
    def echo():
        body = server_request.body
        return {"json": server_request.body_json, "type": body.content_type, "n": body.length}

    serve(net, (echo, "/echo", {}))
    response = requests.post(net.api + "/echo", json={"x": [1, 2]}, timeout=TIMEOUT)
    assert response.json() == {"json": {"x": [1, 2]}, "type": "application/json", "n": 13}
    text = requests.post(
        net.api + "/echo", data=b"plain", headers={"Content-Type": "text/plain"}, timeout=TIMEOUT
    )
    assert text.json() == {"json": None, "type": "text/plain", "n": 5}


def test_a_body_declared_json_that_does_not_parse_is_400_before_the_endpoint_runs(net: NetHost):
    ran = threading.Event()
    serve(net, (ran.set, "/j", {}))
    response = requests.post(
        net.api + "/j", data=b"{nope", headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert response.status_code == 400
    assert "not valid JSON" in response.text
    assert not ran.is_set()


@pytest.mark.parametrize(
    ("value", "content_type", "body"),
    [
        ("hello", "text/plain; charset=utf-8", b"hello"),
        ({"a": 1}, "application/json", b'{"a":1}'),
        ([1, None], "application/json", b"[1,null]"),
        (BlobMedia("image/png", b"\x89PNG"), "image/png", b"\x89PNG"),
    ],
)
def test_return_values_render_by_kind(net: NetHost, value: Any, content_type: str, body: bytes):
    serve(net, (lambda: value, "/v", {}))
    response = get(net, "/v")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    assert response.content == body


def test_http_response_sets_status_and_repeated_headers(net: NetHost):
    def made():
        response = HttpResponse(201, {"id": 7}, {"Location": "/books/7"})
        response.headers.add("X-Tag", "a")
        response.headers.add("X-Tag", "b")
        return response

    serve(net, (made, "/made", {"methods": ["POST"]}))
    response = requests.post(net.api + "/made", timeout=TIMEOUT)
    assert response.status_code == 201
    assert response.headers["Location"] == "/books/7"
    assert response.raw.headers.getlist("X-Tag") == ["a", "b"]
    assert response.json() == {"id": 7}
    assert "Etag" not in response.headers  # endpoints choose their own caching


def test_methods_are_enforced_with_allow(net: NetHost):
    serve(net, (lambda: "ok", "/default", {}), (lambda: "put", "/put", {"methods": ["PUT"]}))
    assert get(net, "/default").text == "ok"
    refused = requests.put(net.api + "/default", timeout=TIMEOUT)
    assert refused.status_code == 405
    assert refused.headers["Allow"] == "GET, POST"
    assert "PUT" in refused.text
    assert requests.put(net.api + "/put", timeout=TIMEOUT).text == "put"
    assert get(net, "/put").status_code == 405


def test_unknown_paths_are_404(net: NetHost):
    serve(net, (lambda id: id, "/books/:id", {}))  # noqa: A006
    for path in ("/nothing", "/books", "/books/1/more"):
        response = get(net, path)
        assert response.status_code == 404, path
        assert "No matching API endpoint" in response.text


def test_an_error_is_a_500_that_names_no_internals(net: NetHost, caplog: pytest.LogCaptureFixture):
    def broken():
        raise KeyError("secret-internal-detail")

    serve(net, (broken, "/broken", {}))
    with caplog.at_level("ERROR", logger="anvil_nb.endpoints"):
        response = get(net, "/broken")
    assert response.status_code == 500
    for leak in ("secret-internal-detail", "KeyError", "Traceback", "broken"):
        assert leak not in response.text
    # the provider's log has the trace
    assert any("secret-internal-detail" in r.getMessage() + str(r.exc_info) for r in caplog.records)


def test_a_bad_answer_from_the_provider_is_a_500(net: NetHost):
    registry = FunctionRegistry()
    registry.register("http:/raw", lambda **_: {"status": "teapot", "body": "x"})
    registry.register("http:/header", lambda **_: {"status": 200, "headers": [["X-A", "a\r\nb"]]})
    net.client(registry=registry)
    for path in ("/raw", "/header"):
        wait_until(
            lambda p=path: net.ht.run(net.host.endpoint_command, "default", p), TIMEOUT, path
        )
        response = get(net, path)
        assert response.status_code == 500, path
        assert "X-A" not in response.headers


def test_a_body_over_the_limit_is_413_from_its_headers_alone():
    net = NetHost(max_http_body_bytes=1000)
    try:
        ran = threading.Event()
        serve(net, (ran.set, "/up", {}))
        with socket.create_connection(("127.0.0.1", net.port), timeout=TIMEOUT) as s:
            s.sendall(
                b"POST /_/api/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n"
            )  # and never a byte of the body
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 413"), reply
        assert "1,000 bytes" in reply
        small = requests.post(net.api + "/up", data=b"x" * 1000, timeout=TIMEOUT)
        assert small.status_code == 200
        assert ran.is_set()
    finally:
        net.stop()


def test_cors_preflight_and_headers_only_when_enabled(net: NetHost):
    serve(
        net,
        (lambda: "open", "/open", {"enable_cors": True}),
        (lambda: "one", "/one", {"enable_cors": "https://app.example"}),
        (lambda: "closed", "/closed", {}),
    )
    asked = {
        "Origin": "https://other.example",
        "Access-Control-Request-Headers": "X-Key, Authorization",
    }
    pre = requests.options(net.api + "/open", headers=asked, timeout=TIMEOUT)
    assert pre.status_code == 200
    assert pre.headers["Access-Control-Allow-Origin"] == "*"
    assert pre.headers["Access-Control-Allow-Headers"] == "content-type, x-key, authorization"
    assert get(net, "/open").headers["Access-Control-Allow-Origin"] == "*"
    assert get(net, "/one").headers["Access-Control-Allow-Origin"] == "https://app.example"
    closed = requests.options(net.api + "/closed", headers=asked, timeout=TIMEOUT)
    assert closed.status_code == 405
    assert not any(h.lower().startswith("access-control") for h in closed.headers)
    assert not any(h.lower().startswith("access-control") for h in get(net, "/closed").headers)


def test_basic_credentials_reach_a_function_that_requires_them(net: NetHost):
    serve(
        net,
        (
            lambda: [server_request.username, server_request.password],
            "/cred",
            {"require_credentials": True},
        ),
    )
    refused = get(net, "/cred")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic realm=")
    assert "username and password" in refused.text
    assert get(net, "/cred", auth=("ann", "pw:with:colons")).json() == ["ann", "pw:with:colons"]


def test_endpoint_calls_show_in_the_call_log_as_http(net: NetHost):
    seen: list[Event] = []
    unsubscribe = net.ht.run(net.host.events.subscribe, seen.append)
    try:
        serve(net, (lambda: "x", "/logged", {}))
        get(net, "/logged")
        started = wait_until(
            lambda: [e for e in seen if isinstance(e, CallStarted) and e.command == "http:/logged"],
            TIMEOUT,
            "the call's CallStarted event",
        )
    finally:
        net.ht.run(unsubscribe)
    assert started[0].client["type"] == "http"
    assert started[0].trusted is False
    assert started[0].call_stack == ("http",)


def test_server_request_outside_an_endpoint(net: NetHost):
    from anvil_nb import server  # noqa: PLC0415

    assert hasattr(server, "request")
    with pytest.raises(RuntimeError, match="only available inside an HTTP endpoint call"):
        _ = server.request.path
    provider = net.provider(plain=lambda: current_call().request)
    caller = net.client()
    assert provider is not None
    assert caller.call("plain") is None


def test_untrusted_callers_cannot_call_endpoint_names(net: NetHost):
    serve(net, (lambda: "x", "/secret", {}))
    from support.nethost import KEYS  # noqa: PLC0415

    from anvil_nb.core.errors import PermissionDenied  # noqa: PLC0415

    client = net.client(key=KEYS.client_key)
    with pytest.raises(PermissionDenied):
        client.call("http:/secret")


# ---------------------------------------------------------------------------------------------
# Cookie sessions


def counter() -> int:
    state = current_call()
    assert state is not None
    state.session["n"] = state.session.get("n", 0) + 1
    return state.session["n"]


def test_a_session_is_kept_by_cookie_only_when_the_call_stores_something(net: NetHost):
    serve(net, (counter, "/count", {}), (lambda: "quiet", "/quiet", {}))
    assert COOKIE not in get(net, "/quiet").cookies
    browser = requests.Session()
    first = browser.get(net.api + "/count", timeout=TIMEOUT)
    assert first.json() == 1
    header = first.headers["Set-Cookie"]
    assert COOKIE in header and "HttpOnly" in header and "SameSite=Lax" in header
    assert "Path=/;" in header or header.endswith("Path=/")
    assert browser.get(net.api + "/count", timeout=TIMEOUT).json() == 2
    assert "Set-Cookie" not in browser.get(net.api + "/count", timeout=TIMEOUT).headers
    assert get(net, "/count").json() == 1  # no cookie: a fresh session


def test_a_tampered_or_unknown_cookie_gets_a_fresh_session(net: NetHost):
    serve(net, (counter, "/count", {}))
    good = get(net, "/count").cookies[COOKIE]
    session_id, _, mac = good.rpartition(".")
    for bad in (f"{session_id}.{'0' * len(mac)}", f"other.{mac}", "garbage", "", f"{session_id}.é"):
        response = get(net, "/count", cookies={COOKIE: bad})
        assert response.json() == 1, bad
    assert get(net, "/count", cookies={COOKIE: good}).json() == 2


def test_the_session_cookie_is_hidden_from_endpoints(net: NetHost):
    serve(net, (counter, "/count", {}), (lambda: server_request.headers.get("cookie"), "/seen", {}))
    value = get(net, "/count").cookies[COOKIE]
    seen = get(net, "/seen", cookies={COOKIE: value, "theme": "dark"}).text
    assert seen == "theme=dark"


def test_a_cross_site_request_runs_in_a_fresh_session_unless_the_endpoint_allows(net: NetHost):
    serve(net, (counter, "/count", {}), (counter, "/shared", {"cross_site_session": True}))
    browser = requests.Session()
    assert browser.get(net.api + "/count", timeout=TIMEOUT).json() == 1
    other = {"Origin": "https://evil.example"}
    crossed = browser.get(net.api + "/count", headers=other, timeout=TIMEOUT)
    assert crossed.json() == 1
    assert "Set-Cookie" not in crossed.headers
    fetched = {"Sec-Fetch-Site": "cross-site"}
    assert browser.get(net.api + "/count", headers=fetched, timeout=TIMEOUT).json() == 1
    assert browser.get(net.api + "/shared", headers=other, timeout=TIMEOUT).json() == 2
    same = {"Origin": f"http://127.0.0.1:{net.port}"}
    assert browser.get(net.api + "/count", headers=same, timeout=TIMEOUT).json() == 3


def test_a_browser_websocket_shares_the_cookie_session_with_endpoints(net: NetHost):
    registry = FunctionRegistry()
    name, wrapper = make_endpoint(counter, "/count")
    registry.register(name, wrapper)
    registry.register("bump", counter)
    net.client(registry=registry)
    wait_until(
        lambda: net.ht.run(net.host.endpoint_command, "default", "/count"), TIMEOUT, "/count"
    )
    ws_url = f"ws://127.0.0.1:{net.port}/_/ws"

    def bump(ws: Any, call_id: str) -> Any:
        ws.send(
            json.dumps({"type": "CALL", "id": call_id, "command": "bump", "args": [], "kwargs": {}})
        )
        return json.loads(ws.recv(timeout=TIMEOUT))["response"]

    with ws_connect(ws_url, open_timeout=TIMEOUT) as ws:
        set_cookie = ws.response.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie
        value = set_cookie.split(";", 1)[0].split("=", 1)[1]
        assert bump(ws, "b1") == 1
    # the endpoint, with the cookie the WebSocket got, runs in the same session
    assert get(net, "/count", cookies={COOKIE: value}).json() == 2
    with ws_connect(
        ws_url, open_timeout=TIMEOUT, additional_headers={"Cookie": f"{COOKIE}={value}"}
    ) as ws:
        assert "Set-Cookie" not in ws.response.headers
        assert bump(ws, "b2") == 3
    with pytest.raises(InvalidStatus) as refused:  # a page of another site
        ws_connect(ws_url, open_timeout=TIMEOUT, origin="https://evil.example")
    assert refused.value.response.status_code == 403


def test_a_websocket_s_cookie_session_that_holds_nothing_ends_with_it(net: NetHost):
    ws_url = f"ws://127.0.0.1:{net.port}/_/ws"
    with ws_connect(ws_url, open_timeout=TIMEOUT) as ws:
        session_id = ws.response.headers["Set-Cookie"].split("=", 1)[1].split(".", 1)[0]
        assert net.ht.run(net.host.sessions.get, session_id) is not None
    # memory only and unused: dropped when its only connection closes, not left to expire
    wait_until(lambda: net.ht.run(net.host.sessions.get, session_id) is None, TIMEOUT, "the drop")


# ---------------------------------------------------------------------------------------------
# The pure parts


def incoming(**kw: Any) -> Incoming:
    base: dict[str, Any] = {
        "method": "get", "path": "/x", "query": {}, "form": {}, "headers": [], "body": b"",
        "remote_ip": "10.0.0.1",
    }  # fmt: skip
    return Incoming(**{**base, **kw})


def test_endpoint_kwargs_are_the_protocol_s():
    auth = "Basic " + base64.b64encode(b"ann:pw").decode()
    kwargs = endpoint_kwargs(
        incoming(
            query={"q": [b"1", b"2"]}, form={"f": [b"v"]},
            headers=[("Origin", "https://a"), ("X-Many", "1"), ("x-many", "2"), ("Authorization", auth)],
        ),
        None,
    )  # fmt: skip
    assert kwargs == {
        "method": "GET", "path": "/x", "query_params": {"q": "1"}, "form_params": {"f": "v"},
        "origin": "https://a",
        "headers": {"origin": "https://a", "x-many": "1, 2", "authorization": auth},
        "remote_address": "10.0.0.1", "body": None, "username": "ann", "password": "pw",
    }  # fmt: skip


def test_parameters_that_are_not_utf8_are_named():
    with pytest.raises(ValueError, match="query parameter 'q' is not UTF-8"):
        endpoint_kwargs(incoming(query={"q": [b"\xff"]}), None)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"nocolon").decode()]
)
def test_basic_credentials_that_are_not_there(header: str | None):
    assert basic_credentials(header) == (None, None)


def test_json_problem():
    assert json_problem("application/json; charset=utf-8", b"{}") is None
    assert json_problem("text/plain", b"{") is None
    assert json_problem("application/json", b"") is None
    assert "not valid JSON" in (json_problem("Application/JSON", b"{") or "")


@pytest.mark.parametrize(
    "answer",
    [
        None, "x", {"body": "x"}, {"status": 99}, {"status": 600}, {"status": True},
        {"status": 200, "headers": "X: y"}, {"status": 200, "headers": [["X"]]},
        {"status": 200, "headers": {"Bad Name": "v"}}, {"status": 200, "headers": {"X": "a\nb"}},
        {"status": 200, "body": object()},
    ],
)  # fmt: skip
def test_render_refuses_what_cannot_be_a_response(answer: Any):
    with pytest.raises(RenderError):
        render(answer)


def test_render_keeps_the_endpoint_s_content_type_and_header_order():
    reply = render(
        {
            "status": 202,
            "body": {"a": 1},
            "headers": [["Content-Type", "application/x+json"], ["X", "1"], ["X", "2"]],
        }
    )
    assert reply.status == 202
    assert reply.headers == [("Content-Type", "application/x+json"), ("X", "1"), ("X", "2")]
    assert reply.body == b'{"a":1}'


def test_endpoint_names_are_the_real_client_s():
    assert endpoint_name("/books/:id/:page") == ("http:/books/([^/]*)/([^/]*)", ["id", "page"])
    assert endpoint_name("/plain") == ("http:/plain", [])


def test_http_headers_are_case_insensitive_and_keep_repeats():
    headers = HttpHeaders({"X-A": "1"})
    headers.add("x-a", "2")
    assert headers.items() == [("x-a", "1"), ("x-a", "2")]
    headers["X-A"] = "3"
    assert headers.items() == [("x-a", "3")]
    assert "X-a" in headers
    assert headers["x-A"] == "3"


@pytest.mark.parametrize(
    ("origin", "fetch_site", "cross"),
    [
        (None, None, False),
        ("http://127.0.0.1:8888", None, False),
        ("http://127.0.0.1:9999", None, True),
        ("https://127.0.0.1:8888", None, True),
        ("null", None, True),
        (None, "cross-site", True),
        (None, "same-origin", False),
    ],
)
def test_is_cross_site(origin: str | None, fetch_site: str | None, cross: bool):
    assert is_cross_site(origin, fetch_site, "http://127.0.0.1:8888") is cross


def test_a_connection_s_label_is_kept_clean_and_short(net: NetHost):
    from anvil_nb.client.websocket import WebSocketTransport  # noqa: PLC0415
    from anvil_nb.core.protocol import MAX_LABEL, peer_label  # noqa: PLC0415

    assert peer_label("  report.ipynb ") == "report.ipynb"
    assert peer_label("a\x00b\nc") == "abc"
    assert peer_label(42) is None and peer_label("") is None
    client = Client(
        WebSocketTransport(net.url, KEYS.server_key, label="x" * 500), functions=FunctionRegistry()
    ).start()
    try:
        peers = net.ht.run(net.host.state)["peers"]
        assert [p["label"] for p in peers] == ["x" * MAX_LABEL]
    finally:
        client.close()


def test_a_host_side_failure_gets_its_own_status():
    """503 past the requests in flight, 504 past the call timeout, 502 when the provider is
    lost mid-call (docs/http.md), each with a body that says so.
    """
    net = NetHost(max_calls_in_flight=1)
    gate = threading.Event()
    try:
        holder: list[Client] = []

        def lost() -> None:
            holder[0].close()  # the provider goes away while serving

        holder.append(
            net.serve_endpoints((lambda: gate.wait(TIMEOUT), "/slow", {}), (lost, "/lost", {}))
        )
        first = threading.Thread(target=lambda: get(net, "/slow"))
        first.start()
        wait_until(
            lambda: net.ht.run(lambda: door_of(net.host).in_flight) == 1, TIMEOUT, "one in flight"
        )
        busy = get(net, "/slow")
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1", busy.text
        gate.set()
        first.join(TIMEOUT)
        net.ht.run(setattr, net.host, "call_timeout", 0.2)
        gate.clear()
        late = get(net, "/slow")
        assert late.status_code == 504 and "in time" in late.text, late.text
        gate.set()
        net.ht.run(setattr, net.host, "call_timeout", None)
        gone = get(net, "/lost")
        assert gone.status_code == 502 and "lost" in gone.text, gone.text
    finally:
        gate.set()
        net.stop()
