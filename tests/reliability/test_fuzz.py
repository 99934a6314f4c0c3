"""Hostile frames, generated and hand-written, against a real ``anvil-nb serve``.

While the frames arrive (on fresh connections, as a server-key uplink, a client-key uplink, a
browser on ``_/ws`` or a connection that never says hello), a legitimate caller keeps calling a
legitimate provider. Afterwards the host is still running, every legit call came back with its
own answer (none lost, duplicated or mismatched), and the host answers new connections.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.peers import CallLoop
from support.processes import ServeProc
from support.ws import RawWS

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport

KINDS = ["CALL", "REGISTER", "UNREGISTER", "CHUNK_HEADER", "MEDIA_ERROR", "EVENT",
         "LAUNCH_BACKGROUND", "REGISTER_LIVE_OBJECT_BACKEND", "LOG", "GET_TASK_STATE"]  # fmt: skip
KEYS = ["type", "id", "command", "args", "kwargs", "objects", "response", "error",
        "sessionData", "call-stack-id", "capUpdates", "vt_global", "liveObjectCall", "name",
        "requestId", "mediaId", "chunkIndex", "lastChunk", "key", "v", "output", "auth"]  # fmt: skip
COMMANDS = ["echo", "anvil.private.echo", "anvil.private.reset_session", "task:x", "http:/a",
            "anvil.private.capability_is_valid", "anvil.private.watch_events", "e.ho", "(a+)+$",
            "anvil.private.host_state", "anvil.private.get_session_id"]  # fmt: skip

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
paths = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "args",
                "kwargs",
                "response",
                "sessionData",
                "session",
                "call-stack",
                "client",
                "id",
                "vt_global",
            ]
        ),
        st.integers(-2, 3),
        st.text(max_size=4),
        st.none(),
    ),  # fmt: skip
    max_size=5,
)
entries = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(
            st.lists(
                st.sampled_from(
                    [
                        "Capability",
                        "DataMedia",
                        "ValueType",
                        "Primitive",
                        "Date",
                        "LiveObject",
                        "Long",
                        "x",
                    ]
                ),
                max_size=3,
            ),
            json_values,
        ),  # fmt: skip
        "path": st.one_of(paths, json_values),
        "scope": json_values,
        "mac": st.one_of(st.text(max_size=50), json_values),
        "narrow": json_values,
        "id": json_values,
        "value": json_values,
    },
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(KINDS), json_values),
        "id": json_values,
        "command": st.one_of(st.sampled_from(COMMANDS), json_values),
        "args": st.one_of(st.lists(json_values, max_size=3), json_values),
        "kwargs": st.one_of(
            st.dictionaries(st.text(max_size=5), json_values, max_size=3), json_values
        ),  # fmt: skip
        "objects": st.one_of(st.lists(entries, max_size=4), json_values),
        "response": json_values,
        "error": json_values,
        "sessionData": json_values,
        "call-stack-id": json_values,
        "capUpdates": json_values,
        "vt_global": json_values,
        "liveObjectCall": json_values,
        "name": st.one_of(st.sampled_from(COMMANDS), json_values),
        "requestId": json_values,
        "mediaId": json_values,
        "lastChunk": json_values,
    },
)
frames = st.one_of(
    messages.map(json.dumps),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6).map(json.dumps),
    st.binary(max_size=64),
    st.text(max_size=64),
)
ROLES = ["server", "client", "browser", "nohello"]
#: The legit function: a name no fuzzed REGISTER can match (fuzzed names may be regexes, and a
#: server-key fuzzer that registered a matching one would take legit calls and never answer).
LEGIT = "legit-echo-3f9c2"


class LegitTraffic:
    """A provider serving ``echo`` and a client-key caller calling it in a loop (a thread)."""

    def __init__(self, host: ServeProc):
        registry = FunctionRegistry()
        registry.register(LEGIT, lambda x: x)
        registry.register("echo", lambda *a, **k: [a, k])  # for the hostile calls to reach
        self.provider = Client(
            WebSocketTransport(host.url, host.server_key), functions=registry
        ).start()
        self.caller = CallLoop(host, LEGIT, "legit")

    @property
    def ok(self) -> int:
        return len(self.caller.ok)

    @property
    def wrong(self) -> list[Any]:
        return self.caller.wrong

    def close(self) -> None:
        self.caller.close(30)
        self.provider.close()


@pytest.fixture(scope="module")
def fuzzed_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProc, Any]]:
    host = ServeProc(tmp_path_factory.mktemp("fuzz"))
    traffic = LegitTraffic(host)
    stats = {"frames": 0, "connections": 0}
    yield host, (traffic, stats)
    traffic.close()
    code = host.stop()
    assert code == 0, f"the host did not stop cleanly after fuzzing (exit {code})"


def open_as(host: ServeProc, role: str) -> RawWS:
    path = "_/ws" if role == "browser" else "_/uplink"
    ws = RawWS(host.url.replace("_/uplink", path))
    if role in ("server", "client"):
        ws.hello(host.server_key if role == "server" else host.client_key)
    return ws


def blast(host: ServeProc, stats: dict[str, int], role: str, batch: list[Any]) -> None:
    ws = open_as(host, role)
    try:
        for frame in batch:
            if not ws.frames.empty() and ws.closed(0):
                break  # the host ended this connection: the rest would go nowhere
            try:
                ws.send(frame, binary=isinstance(frame, bytes))
            except Exception:  # closed under us: the host refused this connection
                break
            stats["frames"] += 1
    finally:
        ws.close()
    stats["connections"] += 1


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
@given(role=st.sampled_from(ROLES), batch=st.lists(frames, min_size=1, max_size=16))
def test_generated_frames_never_hurt_the_host_or_other_connections(fuzzed_host, role, batch):
    host, (traffic, stats) = fuzzed_host
    blast(host, stats, role, batch)
    assert host.proc.poll() is None, "the host died"
    assert traffic.wrong == []


DEEP = "[" * 300 + "1" + "]" * 300
HAND_WRITTEN = [
    # F1 injections, as a caller and as a provider's response
    {"type": "CALL", "id": "i1", "command": "echo", "args": [1], "kwargs": {},
     "objects": [{"type": ["Primitive"], "path": ["sessionData", "session"], "value": {"a": 1}}]},
    {"type": "CALL", "id": "i2", "command": "echo", "args": [1], "kwargs": {},
     "objects": [{"type": ["Primitive"], "path": ["call-stack", 0, "type"], "value": "uplink"}]},
    {"id": "server-1", "response": 1,
     "objects": [{"type": ["Primitive"], "path": ["id"], "value": "x"}]},
    # ids of every shape; responses for calls nobody made
    {"type": "CALL", "id": ["list"], "command": "echo", "args": [], "kwargs": {}},
    {"type": "CALL", "id": {"a": 1}, "command": "echo", "args": [], "kwargs": {}},
    {"type": "CALL", "id": True, "command": "echo", "args": [], "kwargs": {}},
    {"id": ["x"], "response": 1}, {"id": {"x": 1}, "error": "e"}, {"id": "nope", "error": 5},
    # deep, odd and reserved
    '{"type": "CALL", "id": "deep", "command": "echo", "args": [' + DEEP + '], "kwargs": {}}',
    {"type": "CALL", "id": "lo", "liveObjectCall": {"backend": "x"}, "args": [], "kwargs": {}},
    {"type": "CALL", "id": "t", "command": "task:x", "args": [], "kwargs": {}},
    {"type": "CALL", "id": "k", "command": "echo", "args": [], "kwargs": None, "objects": None},
    {"type": "CALL", "id": "c", "command": "echo", "args": [], "kwargs": {},
     "objects": [{"type": ["Capability"], "path": ["args", 0], "scope": [["x"] * 50] * 10,
                  "mac": 5}]},
    {"type": "CALL", "id": "cs", "command": "echo", "args": [], "kwargs": {},
     "call-stack-id": "server-1", "sessionData": {"session": {"admin": True}}},
    # registration and media nonsense
    {"type": "REGISTER", "name": "(unclosed"}, {"type": "REGISTER", "name": 5},
    {"type": "UNREGISTER", "name": "echo"},
    {"type": "CHUNK_HEADER", "requestId": "r", "mediaId": "m", "chunkIndex": 0},
    b"\x00" * 100,
    {"type": "MEDIA_ERROR", "requestId": "r", "cause": "x" * 1000},
    {"type": "CALL", "id": "m1", "command": "echo", "args": [None], "kwargs": {},
     "objects": [{"type": ["DataMedia"], "path": ["args", 0], "id": "m", "mime-type": "x"}]},
    {"type": "CHUNK_HEADER", "requestId": "m1", "mediaId": "m", "chunkIndex": 0,
     "lastChunk": False},
    b"x" * 1000,
    {"key": "again", "v": 8}, {"auth": "OK"}, {"output": "hello"}, {"error": "fatal?"},
    "", "null", "[]", '"string"', "{",
]  # fmt: skip


@pytest.mark.parametrize("role", ROLES)
def test_hand_written_hostile_frames_never_hurt_the_host(fuzzed_host, role):
    host, (traffic, stats) = fuzzed_host
    for frame in HAND_WRITTEN:  # each on its own connection: a fatal one must not hide the rest
        blast(host, stats, role, [frame])
    blast(host, stats, role, HAND_WRITTEN)  # and all of them on one
    assert host.proc.poll() is None
    assert traffic.wrong == []


def test_after_fuzzing_the_host_still_serves_everyone(fuzzed_host):
    host, (traffic, stats) = fuzzed_host
    assert stats["frames"] > 1000, stats
    assert traffic.ok > 0 and traffic.wrong == []
    log = host.log()
    assert "Traceback" not in log and "internal error" not in log.lower(), log[-3000:]
    registry = FunctionRegistry()
    registry.register("late", lambda: "still here")
    late = Client(WebSocketTransport(host.url, host.server_key), functions=registry).start()
    try:
        caller = Client(WebSocketTransport(host.url, host.client_key), functions=FunctionRegistry())
        caller.start()
        try:
            assert caller.call("late") == "still here"
        finally:
            caller.close()
    finally:
        late.close()
    print(f"fuzzed {stats['frames']} frames over {stats['connections']} connections; "
          f"{traffic.ok} legit calls, 0 lost")  # fmt: skip
