"""The uplink WebSocket on a real tornado server on 127.0.0.1: handshake, bad input, media,
flood control, and anvil_nb's own client over the network (reconnection, provider loss).

``RawWS`` is a bare WebSocket client (tornado's, on a loop thread of its own) for frames an
honest client never sends. Every test that breaks one connection checks that a bystander
connection still works.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket
from support.gates import Gate
from support.nethost import KEYS, NetHost
from support.waiting import wait_until
from support.ws import RawWS

from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core import protocol
from anvil_nb.core.capability import Capability
from anvil_nb.core.errors import (
    AppOfflineError,
    PermissionDenied,
    QuotaExceededError,
    UplinkDisconnectedError,
)
from anvil_nb.host.inprocess import HostThread
from anvil_nb.media import BlobMedia

WAIT = 10.0


@pytest.fixture
def raw(net: NetHost) -> Iterator[Any]:
    opened: list[RawWS] = []

    def make() -> RawWS:
        opened.append(RawWS(net.url))
        return opened[-1]

    yield make
    for ws in opened:
        ws.close()


def fatal_then_closed(ws: RawWS) -> str:
    msg = ws.recv()
    assert set(msg) == {"error"}  # a fatal error never has an id
    assert ws.closed()
    return msg["error"]


# ---------------------------------------------------------------------------------------------
# Handshake


def test_server_key_is_trusted_and_gets_app_info(raw):
    auth = raw().hello(KEYS.server_key)
    assert auth["auth"] == "OK" and auth["priv"] == "uplink"
    assert auth["app-info"]["environment"]["description"]


def test_client_key_is_untrusted(raw):
    assert raw().hello(KEYS.client_key)["priv"] == "client"


@pytest.mark.parametrize("entry_type", [60.0, 7, {"DataMedia": 1}, None, ["Long"], "DataMedia"])
def test_an_objects_entry_of_any_type_fails_only_its_call(net, raw, entry_type):
    """Found by the fuzzer: an entry whose ``type`` was a number ended the connection with an
    internal error. Whatever the entry, the call fails alone and the connection serves on.
    """
    net.provider(ping=lambda: "pong")
    ws = raw()
    ws.hello(KEYS.client_key)
    entry = {"type": entry_type, "id": "m1", "path": ["args", 0]}
    ws.send({"type": "CALL", "id": "bad", "command": "ping", "args": [None], "kwargs": {},
             "objects": [entry]})  # fmt: skip
    if entry_type == "DataMedia":  # a media entry: its bytes never come, so the call waits
        ws.send({"type": "CALL", "id": "ok", "command": "ping", "args": [], "kwargs": {},
                 "objects": []})  # fmt: skip
        assert ws.response("ok")["response"] == "pong"
        return
    assert ws.response("bad")["error"]["type"] == "anvil.server.SerializationError"
    ws.send(
        {"type": "CALL", "id": "ok", "command": "ping", "args": [], "kwargs": {}, "objects": []}
    )
    assert ws.response("ok")["response"] == "pong"


def test_wrong_key_is_refused_with_annvils_message(raw):
    ws = raw()
    ws.send({"key": "nope", "v": 8})
    assert fatal_then_closed(ws) == "Incorrect uplink key"


@pytest.mark.parametrize("hello", [{"key": KEYS.server_key, "v": 4}, {"key": KEYS.server_key}])
def test_outdated_or_missing_protocol_version_is_refused(raw, hello):
    ws = raw()
    ws.send(hello)
    assert "outdated version of the uplink library" in fatal_then_closed(ws)


def test_registers_sent_right_after_the_key_take_effect(net, raw):
    ws = raw()
    ws.send({"key": KEYS.server_key, "v": 8})
    ws.send(
        {"type": "REGISTER", "name": "early"}
    )  # before auth has been read, as the real client does
    assert ws.recv()["auth"] == "OK"
    caller = net.client(KEYS.client_key)
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(v=caller.call("early", 5)))
    t.start()
    call = ws.recv()
    assert call["command"] == "early" and call["args"] == [5]
    ws.send({"id": call["id"], "response": 10, "objects": []})
    t.join(WAIT)
    assert result == {"v": 10}


def test_the_origin_header_is_not_checked(net):
    async def connect() -> Any:
        request = tornado.httpclient.HTTPRequest(
            net.url, headers={"Origin": "ws://elsewhere.example"}
        )
        ws = await tornado.websocket.websocket_connect(request)
        await ws.write_message(orjson.dumps({"key": KEYS.server_key, "v": 8}))
        reply = await ws.read_message()
        ws.close()
        return orjson.loads(reply)

    import tornado.httpclient

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(asyncio.wait_for(connect(), WAIT))["auth"] == "OK"
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error to that connection, nothing for the others


@pytest.mark.parametrize(
    ("frame", "binary", "says"),
    [
        ("{not json", False, "malformed JSON"),
        ("[1, 2, 3]", False, "JSON object"),
        ('{"type": "SOMETHING"}', False, "unexpected message"),
        (b"\x00\x01", True, "binary frame without a CHUNK_HEADER"),
        (
            '{"type": "CHUNK_HEADER", "requestId": "x", "mediaId": "m", "chunkIndex": 0, "lastChunk": true}',
            False,
            "unknown media",
        ),
    ],
)
def test_bad_frames_end_only_that_connection_with_a_clear_error(net, raw, frame, binary, says):
    net.provider(ok=lambda: "fine")
    bystander = net.client(KEYS.client_key)
    ws = raw()
    ws.hello(KEYS.server_key)
    ws.send(frame, binary=binary)
    assert says in fatal_then_closed(ws)
    assert bystander.call("ok") == "fine"


def test_frames_over_the_size_limit_close_the_connection():
    h = NetHost(max_frame_bytes=64 * 1024)
    try:
        h.provider(ok=lambda: "fine")
        bystander = h.client(KEYS.client_key)
        ws = RawWS(h.url)
        try:
            ws.hello(KEYS.server_key)
            ws.send(
                {
                    "type": "CALL",
                    "id": "big",
                    "command": "ok",
                    "args": ["x" * 100_000],
                    "kwargs": {},
                }
            )
            assert ws.closed()
            assert ws.ws.close_code == 1009  # message too big
        finally:
            ws.close()
        assert bystander.call("ok") == "fine"
        # Big data goes as Media, in chunks below the frame limit.
        h.provider(size=lambda m: m.length)
        assert (
            bystander.call("size", BlobMedia("application/octet-stream", b"x" * 1_000_000))
            == 1_000_000
        )
    finally:
        h.stop()


def test_client_key_register_is_refused_and_closed(net, raw):
    ws = raw()
    ws.hello(KEYS.client_key)
    ws.send({"type": "REGISTER", "name": "sneaky"})
    assert fatal_then_closed(ws) == protocol.CLIENT_REGISTER


def test_forged_capability_from_an_untrusted_client_fails_that_call_only(net):
    net.provider(read=lambda cap: cap.scope, mint=lambda: Capability(["doc", 1]))
    client = net.client(KEYS.client_key)
    with pytest.raises(PermissionDenied):
        client.call("read", Capability(["doc", 1], mac="forged"))
    assert client.call("read", client.call("mint")) == ["doc", 1]


def test_untrusted_callers_cannot_call_colon_names(net):
    net.provider(**{"http:/x": lambda: "secret"})
    with pytest.raises(PermissionDenied):
        net.client(KEYS.client_key).call("http:/x")


def test_a_flood_of_calls_is_bounded_per_connection():
    h = NetHost(max_calls_in_flight=8)
    release = threading.Event()
    try:
        h.provider(wait=lambda: release.wait(WAIT))
        caller = h.client(KEYS.client_key)
        pending = [caller.send_call("wait", [], {}) for _ in range(8)]
        with pytest.raises(QuotaExceededError, match="at most 8"):
            caller.call("wait")
        release.set()
        for p in pending:
            msg, _ = p.result(WAIT)
            assert msg["response"] is True
    finally:
        release.set()
        h.stop()


# ---------------------------------------------------------------------------------------------
# Media on the wire


def test_media_in_chunks_including_an_empty_one_reaches_the_provider(net, raw):
    net.provider(sizes=lambda a, b: [a, b])
    ws = raw()
    ws.hello(KEYS.client_key)
    ws.send({
        "type": "CALL", "id": "c1", "command": "sizes", "args": [None, None], "kwargs": {},
        "objects": [
            {"type": ["DataMedia"], "path": ["args", 0], "id": "a", "mime-type": "text/plain", "name": None},
            {"type": ["DataMedia"], "path": ["args", 1], "id": "b", "mime-type": "text/plain", "name": None},
        ],
    })  # fmt: skip
    for media_id, index, last, data in [
        ("a", 0, False, b"he"),
        ("b", 0, True, b""),
        ("a", 1, True, b"llo"),
    ]:
        ws.send(
            {
                "type": "CHUNK_HEADER",
                "requestId": "c1",
                "mediaId": media_id,
                "chunkIndex": index,
                "lastChunk": last,
            }
        )
        ws.send(data, binary=True)
    reply = ws.recv()
    assert reply["id"] == "c1" and reply["response"] == [None, None]
    chunks: dict[str, bytes] = {}
    for _ in reply["objects"]:
        header = ws.recv()
        assert header["type"] == "CHUNK_HEADER" and header["requestId"] == "c1"
        chunks[header["mediaId"]] = ws.recv()
        assert header["lastChunk"] is True
    by_path = {tuple(o["path"]): chunks[o["id"]] for o in reply["objects"]}
    assert by_path == {("response", 0): b"hello", ("response", 1): b""}


# ---------------------------------------------------------------------------------------------
# anvil_nb's client over the network


def test_calls_and_context_over_the_network(net):
    from anvil_nb import server

    def ctx():
        c = server.context
        return [
            c.type,
            c.client.type,
            c.client.ip,
            c.remote_caller.type,
            c.remote_caller.is_trusted,
        ]

    net.provider(ctx=ctx)
    assert net.client(KEYS.client_key).call("ctx") == [
        "uplink",
        "client_uplink",
        "127.0.0.1",
        "client_uplink",
        False,
    ]
    assert net.client(KEYS.server_key).call("ctx") == [
        "uplink",
        "uplink",
        "127.0.0.1",
        "uplink",
        True,
    ]
    assert net.client(KEYS.server_key, kind="server_module").call("ctx")[3:] == [
        "server_module",
        True,
    ]


def test_only_the_server_key_may_join_as_a_server_module(net):
    from anvil_nb import server

    net.provider(who=lambda: server.context.remote_caller.type)
    assert net.client(KEYS.client_key, kind="server_module").call("who") == "client_uplink"


def test_wrong_key_fails_connect_with_the_hosts_message(net):
    with pytest.raises(AppOfflineError, match="Incorrect uplink key"):
        net.client("wrong")


def test_client_reconnects_and_registers_again_after_the_connection_drops(net):
    provider = net.provider(ping=lambda: "pong")
    caller = net.client(KEYS.client_key)
    assert caller.call("ping") == "pong"
    registered = threading.Event()
    net.host.events.subscribe(lambda e: registered.set() if getattr(e, "added", False) else None)
    # Drop the provider's connection from the host's side.
    net.ht.run(lambda: next(p for p in net.host.peers if p.kind == "uplink").close("test drop"))
    assert registered.wait(WAIT)  # it came back and registered "ping" again
    assert caller.call("ping") == "pong"
    assert provider.connected


def test_provider_lost_mid_call_fails_the_caller_at_once(net):
    slow = Gate(timeout=WAIT)
    started, release = slow.started, slow.release
    provider = net.provider(slow=slow)
    provider.transport.reconnect = False
    caller = net.client(KEYS.client_key)
    pending = caller.send_call("slow", [], {})
    assert started.wait(WAIT)
    provider.transport.close()
    msg, _ = pending.result(WAIT)
    release.set()
    with pytest.raises(UplinkDisconnectedError):
        caller._result(pending, msg, {})


def test_call_async_awaits_network_calls_concurrently(net):
    started = threading.Barrier(3, timeout=WAIT)

    def add(a, b):
        started.wait()  # all three calls are in flight at once
        return a + b

    net.provider(add=add)
    caller = net.client(KEYS.client_key)

    async def main() -> list[Any]:
        return await asyncio.gather(*(caller.call_async("add", i, 1) for i in range(3)))

    assert asyncio.run(main()) == [1, 2, 3]


class _Deaf(tornado.websocket.WebSocketHandler):
    """Reads the first frame, then never again: a host that has stopped reading."""

    def on_message(self, message: Any) -> Any:
        return asyncio.get_running_loop().create_future()  # tornado waits on it: reading stops


def test_a_sender_waits_while_the_host_is_not_reading():
    ht = HostThread()
    transport = None
    try:

        def listen() -> int:
            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            server = tornado.httpserver.HTTPServer(tornado.web.Application([("/", _Deaf)]))
            server.add_sockets(sockets)
            ht._deaf = server  # type: ignore[attr-defined]
            return sockets[0].getsockname()[1]

        port = ht.run(listen)
        transport = WebSocketTransport(
            f"ws://127.0.0.1:{port}/", "k", reconnect=False, max_queued_bytes=1024 * 1024
        )
        transport.open(lambda m, media: None, lambda reason: None)
        sent = []

        def flood() -> None:
            for i in range(200):
                try:
                    transport.send({"id": i, "response": "x" * 256 * 1024})
                except ConnectionError:  # closed at the end of the test, while it waited
                    return
                sent.append(i)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        assert wait_until(lambda: transport._queued > 1024 * 1024, timeout=WAIT)
        thread.join(0.5)  # bounded: it must still be blocked
        assert thread.is_alive()
        assert len(sent) < 200
        assert transport._queued <= 1024 * 1024 + 2 * 256 * 1024 + 1024
    finally:
        if transport is not None:
            transport.close()  # the waiting sender is released
        ht.run(ht._deaf.stop)  # type: ignore[attr-defined]
        ht.stop()
    thread.join(WAIT)
    assert not thread.is_alive()
