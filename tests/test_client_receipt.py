"""The client applies the host's rule to what it receives (DESIGN.md, "The host builds every
message it sends"), and capabilities it receives as results ask the host whether they hold.

A CALL's ``objects`` entries may only lie inside ``args``/``kwargs``/``vt_global``, a
response's inside ``response``/``vt_global``, a session blob's inside ``session``. Crafted
messages are fed to the client through a transport that records what the client sends: the
host itself never relays such messages, so only a hostile or broken host could send them.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from anvil_nb import server
from anvil_nb.client.client import Client, FunctionRegistry, reset_current_session
from anvil_nb.core import protocol
from anvil_nb.core.capability import Capability
from anvil_nb.core.errors import SerializationError
from anvil_nb.core.transport import Transport

WAIT = 10.0


class RecordingTransport(Transport):
    """A host played by the test: it records what the client sends and answers its echoes."""

    def __init__(self) -> None:
        self.sent: queue.Queue[dict[str, Any]] = queue.Queue()
        self._deliver: Callable[[dict[str, Any], Mapping[str, bytes]], None] | None = None

    def open(self, on_message: Any, on_close: Any) -> None:  # noqa: ARG002
        self._deliver = on_message
        self.deliver(protocol.auth("uplink", {"id": "test"}))

    def deliver(self, msg: dict[str, Any]) -> None:
        """A message from the 'host', decoded from its frame as a transport would."""
        assert self._deliver is not None
        self._deliver(protocol.decode(protocol.encode(msg)), {})

    def send(self, msg: dict[str, Any], media: Mapping[str, bytes] | None = None) -> None:  # noqa: ARG002
        msg = protocol.decode(protocol.encode(msg))
        if msg.get("type") == "CALL" and msg.get("command") == "anvil.private.echo":
            self.deliver(protocol.response(msg["id"], msg["args"][0], []))
            return
        self.sent.put(msg)

    def close(self) -> None:
        pass

    def next_sent(self, **match: Any) -> dict[str, Any]:
        """The next message the client sent that has these fields (others are skipped)."""
        while True:
            msg = self.sent.get(timeout=WAIT)
            if all(msg.get(k) == v for k, v in match.items()):
                return msg


@pytest.fixture
def rig() -> Iterator[tuple[Client, RecordingTransport, FunctionRegistry]]:
    transport, registry = RecordingTransport(), FunctionRegistry()
    client = Client(transport, functions=registry).start()
    yield client, transport, registry
    client.close()


def a_date(path: list[Any]) -> dict[str, Any]:
    return {"type": ["Date"], "value": "2020-01-02", "path": path}


def incoming_call(command: str, **fields: Any) -> dict[str, Any]:
    msg = protocol.call("server-1", command, [], {}, [], call_stack_id="server-1")
    msg.update(
        {
            "call-stack": [{"type": "uplink", "protocol-version": 8}],
            "client": {"type": "uplink", "ip": "127.0.0.1"},
            "sessionData": {"session": {}},
        }
    )
    msg.update(fields)
    return msg


# ---------------------------------------------------------------------------------------------
# Incoming calls


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (["sessionData", "session"], "['sessionData']['session']"),
        (["client", "type"], "['client']['type']"),
        (["call-stack", 0], "['call-stack'][0]"),
        (["command"], "['command']"),
    ],
)
def test_a_call_with_an_object_outside_its_values_never_runs(rig, path, named):
    client, transport, registry = rig
    ran = threading.Event()
    registry.register("victim", lambda *a, **k: ran.set())
    transport.deliver(incoming_call("victim", objects=[a_date(path)]))
    answer = transport.next_sent(id="server-1")
    assert "response" not in answer
    assert answer["error"]["type"] == "anvil.server.SerializationError"
    assert named in answer["error"]["message"]
    assert not ran.is_set()


def test_a_call_whose_session_blob_points_outside_the_session_never_runs(rig):
    client, transport, registry = rig
    ran = threading.Event()
    registry.register("victim", lambda *a, **k: ran.set())
    blob = {"session": {"n": 1}, "objects": [a_date(["args", 0])]}
    transport.deliver(incoming_call("victim", args=[None], sessionData=blob))
    answer = transport.next_sent(id="server-1")
    assert "['args'][0]" in answer["error"]["message"]
    assert "session" in answer["error"]["message"]
    assert not ran.is_set()


def test_entries_inside_the_values_are_rebuilt_as_before(rig):
    client, transport, registry = rig
    registry.register(
        "when",
        lambda d, *, also: [type(d).__name__, str(d), str(also), str(server.session["seen"])],
    )
    blob = {"session": {"seen": None}, "objects": [a_date(["session", "seen"])]}
    msg = incoming_call(
        "when",
        args=[None],
        kwargs={"also": None},
        objects=[a_date(["args", 0]), a_date(["kwargs", "also"])],
        sessionData=blob,
    )
    transport.deliver(msg)
    answer = transport.next_sent(id="server-1")
    assert answer["response"] == ["date", "2020-01-02", "2020-01-02", "2020-01-02"], answer
    # the call used its session, so it came back, its date still a date
    assert answer["sessionData"]["objects"] == [a_date(["session", "seen"])]


def test_a_call_that_never_uses_its_session_sends_none_back(rig):
    client, transport, registry = rig
    registry.register("plain", lambda: "ok")
    blob = {"session": {"n": 1}, "objects": [a_date(["session", "n"])]}
    transport.deliver(incoming_call("plain", sessionData=blob))
    answer = transport.next_sent(id="server-1")
    assert answer["response"] == "ok"
    assert "sessionData" not in answer  # unchanged: the host keeps what it has


# ---------------------------------------------------------------------------------------------
# Responses


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (["sessionData", "session"], "['sessionData']['session']"),
        (["id"], "['id']"),
        (["capUpdates", "x"], "['capUpdates']['x']"),
    ],
)
def test_a_response_with_an_object_outside_its_value_raises(rig, path, named):
    client, transport, _ = rig
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(client.call, "f", 1)
        sent = transport.next_sent(type="CALL", command="f")
        # every path leads to a value: only the receipt rule can refuse it
        answer = protocol.response(
            sent["id"], None, [a_date(path)], session_data={"session": None}, cap_updates={"x": 1}
        )
        transport.deliver(answer)
        with pytest.raises(SerializationError) as info:
            result.result(WAIT)
    assert named in str(info.value)
    assert "response" in str(info.value)  # says where entries may lie


def test_a_response_with_its_entries_inside_the_value_is_rebuilt(rig):
    client, transport, _ = rig
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        result = pool.submit(client.call, "f")
        sent = transport.next_sent(type="CALL", command="f")
        transport.deliver(protocol.response(sent["id"], [None], [a_date(["response", 0])]))
        assert str(result.result(WAIT)[0]) == "2020-01-02"


def test_a_nested_response_whose_session_blob_points_outside_the_session_raises(rig):
    client, transport, registry = rig
    caught: list[BaseException] = []

    def outer() -> str:
        try:
            client.call("inner")
        except SerializationError as exc:
            caught.append(exc)
        return "done"

    registry.register("outer", outer)
    transport.deliver(incoming_call("outer"))
    nested = transport.next_sent(type="CALL", command="inner")
    assert nested["call-stack-id"] == "server-1"
    blob = {"session": {}, "response": None, "objects": [a_date(["response"])]}
    transport.deliver(protocol.response(nested["id"], None, [], session_data=blob))
    assert transport.next_sent(id="server-1")["response"] == "done"
    assert len(caught) == 1
    assert "['response']" in str(caught[0]) and "session" in str(caught[0])


# ---------------------------------------------------------------------------------------------
# Capabilities received as results ask the host whether they hold (F11)


def test_a_capability_received_as_a_result_turns_invalid_when_the_session_is_reset(connect):
    provider_fns = FunctionRegistry()
    provider_fns.register("mint", lambda: Capability(["doc", 42]))
    connect("server_module", provider_fns)
    caller = connect("server_module")
    cap = caller.call("mint")
    narrowed = cap.narrow(["page", 1])
    assert isinstance(cap, Capability) and cap.is_valid and narrowed.is_valid
    reset_current_session(caller)
    assert cap.is_valid is False
    assert narrowed.is_valid is False


def test_server_reset_session_invalidates_a_capability_received_as_a_result():
    @server.callable
    def mint_doc():
        return server.Capability(["doc", 7])

    cap = server.call("mint_doc")
    assert cap.is_valid is True
    server.reset_session()
    assert cap.is_valid is False
