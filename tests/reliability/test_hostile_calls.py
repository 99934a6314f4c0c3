"""F1, F3, F6, F9, F11: what a hostile caller or provider sends never reaches anyone else.

A real ``anvil-nb serve`` subprocess, providers in their own processes (anvil_nb's client and
the unmodified ``anvil-uplink`` 0.7.0), and raw WebSocket callers that send exactly the frames
an attacker would. Each test checks the attack fails *that call* with an error that names what
was wrong, and that the provider, its session and other connections are untouched.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.peers import WAIT, ProviderProc
from support.processes import ServeProc
from support.waiting import wait_until
from support.ws import RawWS


@pytest.fixture(params=["nb", "real"])
def provided(
    request: pytest.FixtureRequest, serve_proc: Callable[..., ServeProc], tmp_path: Path
) -> Iterator[tuple[ServeProc, ProviderProc]]:
    """A host and one provider of the parametrised kind (anvil_nb's client or the real one)."""
    uplink_dir = request.getfixturevalue("anvil_uplink_dir") if request.param == "real" else None
    host = serve_proc()
    provider = ProviderProc(request.param, host, tmp_path, uplink_dir)
    try:
        caller = RawWS(host.url)
        try:
            assert caller.hello(host.server_key)["auth"] == "OK"
            call(caller, "whoami")  # the provider's registrations are in
        finally:
            caller.close()
        yield host, provider
    finally:
        provider.stop()


_ids = iter(range(1, 1_000_000))


def call(ws: RawWS, command: str, *args: Any, objects: list[Any] | None = None) -> dict[str, Any]:
    """Send a CALL and return its response (waiting for the registration if needed)."""

    def attempt() -> dict[str, Any] | None:
        call_id = f"c{next(_ids)}"
        ws.send(
            {
                "type": "CALL",
                "id": call_id,
                "command": command,
                "args": list(args),
                "kwargs": {},
                "objects": objects or [],
            }
        )
        reply = ws.response(call_id)
        missing = "NoServerFunctionError" in str(reply.get("error", {}).get("type"))
        return None if missing else reply  # the provider registers right after connecting

    return wait_until(attempt, WAIT, f"{command!r} to be registered")


def client_caller(host: ServeProc, raw_ws: Callable[..., RawWS]) -> RawWS:
    ws = raw_ws(host.url)
    assert ws.hello(host.client_key)["priv"] == "client"
    return ws


INJECTIONS = [
    pytest.param(["sessionData", "session"], {"admin": True}, id="session"),
    pytest.param(["call-stack", 0, "type"], "uplink", id="call-stack"),
    pytest.param(["client", "type"], "uplink", id="client"),
    pytest.param(["id"], "other", id="id"),
]


@pytest.mark.parametrize(("path", "value"), INJECTIONS)
def test_f1_a_caller_cannot_write_outside_its_arguments(provided, raw_ws, path, value):
    host, _ = provided
    ws = client_caller(host, raw_ws)
    entry = {"type": ["Primitive"], "path": path, "value": value}
    reply = call(ws, "whoami", objects=[entry])
    assert reply["error"]["type"] == "anvil.server.SerializationError"
    assert repr(path[0]) in reply["error"]["message"]
    assert "outside" in reply["error"]["message"]
    honest_reply = call(ws, "whoami")
    assert "response" in honest_reply, honest_reply
    honest = honest_reply["response"]
    assert honest == {
        "trusted": False,
        "caller": "client_uplink" if honest["caller"] == "client_uplink" else "client-uplink",
        "client": honest["client"],
        "session": {},
    }
    assert honest["client"] in ("client_uplink", "client-uplink", "uplink_client")
    assert honest["client"] != "uplink"


def test_f1_an_entry_inside_the_arguments_still_travels(provided, raw_ws):
    host, _ = provided
    ws = client_caller(host, raw_ws)
    date = {"type": ["Date"], "path": ["args", 0], "value": "2024-01-31"}
    reply = call(ws, "echo", None, objects=[date])
    assert reply["response"] is None
    assert reply["objects"] == [{"type": ["Date"], "path": ["response"], "value": "2024-01-31"}]


def test_f1_a_trusted_caller_cannot_write_the_session_by_injection_either(provided, raw_ws):
    host, _ = provided
    ws = raw_ws(host.url)
    ws.hello(host.server_key)
    entry = {"type": ["Primitive"], "path": ["sessionData", "session", "admin"], "value": True}
    assert "error" in call(ws, "remember", "x", 1, objects=[entry])
    assert call(ws, "whoami")["response"]["session"] == {}


def test_f3_an_under_limit_call_that_grows_past_it_fails_alone(provided, raw_ws):
    host, _ = provided
    ws = client_caller(host, raw_ws)
    pending = []
    for i in range(4):
        pending.append(f"slow{i}")
        ws.send({"type": "CALL", "id": f"slow{i}", "command": "slow", "args": [1.0], "kwargs": {}})
    frame_limit = 16 * 1024 * 1024
    body = {"type": "CALL", "id": "big", "command": "echo", "args": [""], "kwargs": {}}
    body["args"][0] = "x" * (frame_limit - len(json.dumps(body)) - 16)
    ws.send(json.dumps(body))
    big = ws.response("big")
    assert big["error"]["type"] == "anvil.server.SerializationError"
    assert "over the limit of 16,777,216 bytes" in big["error"]["message"]
    assert "Media" in big["error"]["message"]
    for call_id in pending:
        assert ws.response(call_id)["response"] == "slept"
    assert call(ws, "echo", 5)["response"] == 5  # the provider is still there


def test_f3_a_response_that_grows_past_the_limit_fails_alone(provided, raw_ws):
    host, _ = provided
    ws = client_caller(host, raw_ws)
    long_id = "i" * 5000  # the caller's id is longer than the host's: the relayed form grows
    size = 16 * 1024 * 1024 - 1000
    ws.send({"type": "CALL", "id": long_id, "command": "text", "args": [size], "kwargs": {}})
    reply = ws.response(long_id, timeout=60)
    assert reply["error"]["type"] == "anvil.server.SerializationError"
    assert "limit" in reply["error"]["message"]
    assert call(ws, "echo", 6)["response"] == 6


def admin_state(host: ServeProc) -> dict[str, Any]:
    request = urllib.request.Request(
        host.http_url + "_/admin/state", headers={"Authorization": f"Bearer {host.server_key}"}
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        return json.loads(response.read())


def test_f6_calls_that_cannot_be_relayed_hold_nothing(serve_proc, raw_ws, tmp_path):
    host = serve_proc()
    provider = ProviderProc("nb", host, tmp_path, None)
    try:
        ws = client_caller(host, raw_ws)
        deep: Any = 1
        for _ in range(300):
            deep = [deep]
        n = 1500  # more than the 1,024 calls a connection may have in flight
        frame = json.dumps(
            {"type": "CALL", "id": 0, "command": "echo", "args": [deep], "kwargs": {}}
        )
        for i in range(n):
            ws.send_nowait(frame.replace('"id": 0', f'"id": {i}', 1))
        for i in range(n):
            error = ws.response(i)["error"]
            assert error["type"] == "anvil.server.SerializationError", error
            assert "cannot be relayed" in error["message"]
        assert call(ws, "echo", 7)["response"] == 7
        peers = [p for p in admin_state(host)["peers"] if p["kind"] == "client_uplink"]
        assert [p["calls_in_flight"] for p in peers] == [0]
    finally:
        provider.stop()


def test_f9_peer_strings_in_the_log_are_clipped_and_rate_limited(serve_proc, raw_ws):
    host = serve_proc()
    ws = raw_ws(host.url)
    ws.hello(host.server_key)
    before = len(host.log())
    ws.send({"id": "y" * (15 * 1024 * 1024), "response": 1, "objects": []})
    for i in range(200):
        ws.send({"id": f"unknown-{i}-" + "z" * 10_000, "response": 1, "objects": []})
    assert call(ws, "anvil.private.echo", "alive")["response"] == "alive"
    grown = host.log()[before:]
    assert "unknown call id" in grown
    assert len(grown) < 2000, grown[:3000]
    assert grown.count("unknown call id") == 1


def signed(ws: RawWS, *scope: Any) -> dict[str, Any]:
    """A capability entry as the host signed it for *ws*'s session (from a provider's reply)."""
    entry = {"type": ["Capability"], "path": ["args", 0], "scope": list(scope)}
    reply = call(ws, "echo", None, objects=[entry])  # trusted: an unsigned one is accepted
    [back] = reply["objects"]
    assert back["type"] == ["Capability"] and back["mac"]
    return back


def test_f11_a_wrong_mac_is_refused_even_from_the_server_key(serve_proc, raw_ws, tmp_path):
    host = serve_proc()
    provider = ProviderProc("nb", host, tmp_path, None)
    try:
        ws = raw_ws(host.url)
        ws.hello(host.server_key)
        good = signed(ws, "doc", 42)
        again = dict(good, path=["args", 0])
        assert call(ws, "echo", None, objects=[again])["objects"][0]["scope"] == ["doc", 42]
        tampered = dict(again, mac=good["mac"][:-2] + ("AA" if good["mac"][-2:] != "AA" else "BB"))
        reply = call(ws, "echo", None, objects=[tampered])
        assert reply["error"]["type"] == "anvil.server.PermissionDenied"
        assert "not issued to this session" in reply["error"]["message"]
        other = raw_ws(host.url)
        other.hello(host.server_key)
        foreign = call(other, "echo", None, objects=[again])  # minted for ws's session
        assert foreign["error"]["type"] == "anvil.server.PermissionDenied"
        reserved = {"type": ["Capability"], "path": ["args", 0], "scope": ["_", "x"]}
        assert call(ws, "echo", None, objects=[reserved])["error"]["type"] == (
            "anvil.server.PermissionDenied"
        )
    finally:
        provider.stop()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"objects": [{"type": ["Primitive"], "path": ["id"], "value": "x"}]}, "['id']"),
        (
            {"sessionData": {"session": {}, "objects": [{"type": ["Date"], "path": ["x"]}]}},
            "['x']",
        ),
        ({"objects": [{"type": "Capability", "path": ["response"]}]}, "'type' list"),
    ],
)
def test_f1_a_hostile_provider_cannot_write_outside_its_response(serve_proc, raw_ws, extra, says):
    host = serve_proc()
    evil = raw_ws(host.url)
    evil.hello(host.server_key)
    evil.send({"type": "REGISTER", "name": "evil"})
    caller = client_caller(host, raw_ws)
    caller.send({"type": "CALL", "id": "e1", "command": "evil", "args": [], "kwargs": {}})
    request = evil.recv()
    assert request["type"] == "CALL" and request["command"] == "evil"
    evil.send({"id": request["id"], "response": "fine", **extra})
    reply = caller.response("e1")
    assert reply["error"]["type"] == "anvil.server.SerializationError"
    assert says in reply["error"]["message"]
    assert call(caller, "anvil.private.echo", "still")["response"] == "still"
