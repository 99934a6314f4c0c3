"""The host's event stream: its wire form, what watchers are pushed, and ``_/admin/events``.

The host's stream is the one stream of what happens in an app. A trusted connection that
watches is pushed the events it was no party to; ``{root}_/admin/events`` streams every event
(of one app, or all) as Server-Sent Events to whoever holds the admin right. Everything here
runs a real host (on a loop thread, or ``anvil-nb serve``) with real clients.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import Any

import pytest
from support import wait_until

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.config import Keys
from anvil_nb.core import protocol
from anvil_nb.core.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    Event,
    RegistrationChanged,
    RegistrySnapshot,
    SessionChanged,
    from_wire,
    to_wire,
)
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.web.service import listen_embedded
from anvil_nb.widgets import Feed, render

WAIT = 10.0

# ---------------------------------------------------------------------------------------------
# The wire form

SAMPLES: list[Event] = [
    CallStarted(
        1.5,
        "c-1",
        "greet",
        {"type": "browser", "ip": "1.2.3.4"},
        ("browser",),
        False,
        "s-1",
        caller="browser-3",
        provider="server_module-1",
        direction="host",
        app="notes",
        args=("secret",),
        kwargs={"k": 1},
    ),
    CallFinished(
        2.0,
        "c-1",
        "greet",
        0.25,
        False,
        "ValueError",
        "bad",
        result="secret",
        output="printed",
        direction="host",
        trace=(["cell", 3],),
        app="notes",
    ),
    SessionChanged(3.0, "s-1", "saved", data={"secret": 1}, provider="server_module-1", app="x"),
    CapabilityUpdated(4.0, "c-2", '["doc",1]', {"progress": 0.5}, direction="host", app="x"),
    RegistrationChanged(5.0, "greet", "server_module-1", True, app="x"),
    RegistrySnapshot(6.0, {"greet": ["server_module-1"]}, app="x"),
]
LOCAL_ONLY = {"args", "kwargs", "result", "output", "data"}


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_kind_of_event_crosses_the_wire_without_what_only_a_process_knows(event):
    body = json.loads(json.dumps(to_wire(event)))  # through real JSON
    assert not LOCAL_ONLY & set(body)
    back = from_wire(body)
    assert type(back) is type(event)
    for f in fields(event):
        if f.name not in LOCAL_ONLY:
            assert getattr(back, f.name) == getattr(event, f.name), f.name


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        "call_started",
        {},
        {"kind": "nonsense", "time": 1.0},
        {"kind": "registration", "name": "f", "provider": "p", "added": True},  # no time
        {"kind": "registration", "time": 1.0, "name": 7, "provider": "p", "added": True},
        {"kind": "registration", "time": True, "name": "f", "provider": "p", "added": True},
        {
            "kind": "call_started",
            "time": 1.0,
            "call_id": "c",
            "command": "f",
            "client": None,
            "call_stack": "not a list",
            "trusted": True,
            "session_id": None,
        },  # fmt: skip
        {"kind": "session", "time": 1.0, "session_id": "s", "reason": ["x"]},
    ],
)
def test_what_is_not_an_event_is_refused(body):
    assert from_wire(body) is None


def test_unknown_fields_are_ignored_and_local_ones_never_read():
    body = {**to_wire(SAMPLES[4]), "extra": 1, "data": {"smuggled": True}}
    assert from_wire(body) == SAMPLES[4]


# ---------------------------------------------------------------------------------------------
# Watchers: pushed what they were no party to


def _registry(**fns: Any) -> FunctionRegistry:
    registry = FunctionRegistry()
    for name, fn in fns.items():
        registry.register(name, fn)
    return registry


def _host_events(client: Client) -> list[Event]:
    seen: list[Event] = []
    client.events.subscribe(seen.append)
    return seen


def _marked(seen: list[Event], name: str) -> bool:
    """Whether the registration of *name* has arrived (everything pushed before it has too)."""
    return any(isinstance(e, RegistrationChanged) and e.name == name for e in seen)


def test_a_watcher_is_pushed_the_calls_of_others_and_never_its_own(connect):
    provider = connect("server_module", _registry(greet=lambda who: f"hi {who}"))
    provider_seen = _host_events(provider)
    provider.watch_events()
    watcher = connect("server_module")
    seen = _host_events(watcher)
    state = watcher.watch_events()
    assert "greet" in state["registrations"] and state["you"].startswith("server_module-")

    caller = connect("client_uplink")
    assert caller.call("greet", "ann") == "hi ann"
    assert watcher.call("greet", "bob") == "hi bob"  # its own call: told by its own client
    connect("server_module", _registry(marker=lambda: None))  # pushed after all of the above
    assert wait_until(lambda: _marked(seen, "marker") and _marked(provider_seen, "marker"), WAIT)

    pushed = [e for e in seen if getattr(e, "direction", "") == "host"]
    started = [e for e in pushed if isinstance(e, CallStarted)]
    assert [e.command for e in started] == ["greet"]  # ann's call only
    assert started[0].caller.startswith("client_uplink-")
    assert started[0].provider.startswith("server_module-")
    assert started[0].trusted is False and started[0].app == "default"
    assert started[0].args == ()  # arguments stay with the processes that had them
    finished = [e for e in pushed if isinstance(e, CallFinished)]
    assert [(e.call_id, e.ok) for e in finished] == [(started[0].call_id, True)]
    own = [e for e in seen if isinstance(e, CallStarted) and e.direction == "out"]
    assert [e.args for e in own] == [("bob",)]  # the watcher's own call, from its own client
    # the provider served both calls: the host pushes it nothing about them
    assert not [e for e in provider_seen if getattr(e, "direction", "") == "host"]


def test_a_failed_call_of_others_arrives_with_its_error_and_trace(connect):
    def fail():
        raise ValueError("no such thing")

    connect("server_module", _registry(fail=fail))
    watcher = connect("server_module")
    seen = _host_events(watcher)
    watcher.watch_events()
    with pytest.raises(ValueError, match="no such thing"):
        connect("client_uplink").call("fail")
    assert wait_until(lambda: any(isinstance(e, CallFinished) for e in seen), WAIT)
    done = next(e for e in seen if isinstance(e, CallFinished))
    assert (done.ok, done.error_type, done.error_message) == (False, "ValueError", "no such thing")
    assert done.trace and done.direction == "host"


def test_untrusted_connections_may_not_watch(connect):
    from anvil_nb.core.errors import PermissionDenied

    with pytest.raises(PermissionDenied, match="Only trusted code"):
        connect("client_uplink").call("anvil.private.watch_events")


def test_a_watcher_that_is_not_reading_loses_events_not_the_host(host_thread: HostThread):
    """Events are the first thing a slow watcher loses: never queued past the bound."""
    host = host_thread.host

    class Stuck:
        name = kind = "server_module"
        client = {"type": "server_module", "ip": "127.0.0.1"}
        queued_bytes = 10**12  # nothing it is sent is read
        sent: list[bytes] = []

        def send(self, data: bytes, media: Any = None, request_id: Any = None) -> None:
            self.sent.append(data)

        def close(self, reason: str) -> None:
            pass

    stuck = Stuck()

    def watch() -> None:
        host.attach(stuck)
        host.receive(stuck, {"type": "CALL", "id": "w", "command": "anvil.private.watch_events",
                             "args": [], "kwargs": {}})  # fmt: skip

    host_thread.run(watch)
    sent_before = len(stuck.sent)
    provider = Client(host_thread.connect("server_module"), functions=_registry(f=lambda: 1))
    try:
        provider.start()
        assert wait_until(lambda: host_thread.run(lambda: bool(host.state()["registrations"])))
        host_thread.run(lambda: None)  # one more turn of the loop: a push would have happened
        assert len(stuck.sent) == sent_before
    finally:
        provider.close()
        host_thread.run(host.detach, stuck)


# ---------------------------------------------------------------------------------------------
# The widgets of a watching process


def test_a_watching_process_shows_the_calls_of_other_connections(connect):
    connect("server_module", _registry(greet=lambda who: f"hi {who}"))
    watcher = connect("server_module")
    feed = Feed(bus=watcher.events, me="this process")
    try:
        watcher.watch_events()
        connect("browser").call("greet", "ann")
        assert wait_until(lambda: any(r.outcome == "ok" for r in feed.calls.rows()), WAIT)
        (row,) = feed.calls.rows()
        assert (row.function, row.direction, row.caller) == ("greet", "host", "browser")
        assert row.args == ""  # not known here
        assert row.context["from"].startswith("browser-")
        html = render.call_table(feed.calls.rows(), feed.calls.total)
        assert "<td>·</td>" in html
    finally:
        feed.unsubscribe()


# ---------------------------------------------------------------------------------------------
# _/admin/events


class EventStream:
    """A reader of a Server-Sent Events response (``http.client``), every read bounded."""

    def __init__(self, port: int, path: str, headers: dict[str, str] | None = None):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        self.conn.request("GET", path, headers=headers or {})
        self.response = self.conn.getresponse()
        self.status = self.response.status

    def next_event(self, deadline: float) -> dict[str, Any]:
        """The next ``data:`` line as JSON (comments and other fields skipped)."""
        while time.monotonic() < deadline:
            line = self.response.fp.readline()
            if not line:
                raise EOFError("the stream ended")
            if line.startswith(b"data: "):
                return json.loads(line[6:])
        raise TimeoutError("no event in time")

    def events_until(self, done: Any) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + WAIT
        while not done(got):
            got.append(self.next_event(deadline))
        return got

    def close(self) -> None:
        sock = self.conn.sock
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


@pytest.fixture
def streams() -> Iterator[list[EventStream]]:
    opened: list[EventStream] = []
    yield opened
    for s in opened:
        s.close()


def _finished(command: str) -> Any:
    return lambda got: any(e["kind"] == "call_finished" and e["command"] == command for e in got)


def test_admin_events_streams_the_hosts_events_to_the_server_keys_holder(serve_proc, streams):
    host = serve_proc()
    auth = {"Authorization": f"Bearer {host.server_key}"}
    refused = EventStream(host.port, "/_/admin/events")
    streams.append(refused)
    assert refused.status == 403
    missing = EventStream(host.port, "/_/admin/events?app=nope", auth)
    streams.append(missing)
    assert missing.status == 404

    other = Client(  # the host's server key may join any app: this makes "other"
        WebSocketTransport(host.url, host.server_key, app="other"),
        functions=_registry(shout=lambda: "HI"),
    ).start()
    everything = EventStream(host.port, "/_/admin/events", auth)
    only_other = EventStream(host.port, "/_/admin/events?app=other", auth)
    streams.extend([everything, only_other])
    assert everything.status == only_other.status == 200
    assert everything.response.getheader("Content-Type").startswith("text/event-stream")

    provider = Client(
        WebSocketTransport(host.url, host.server_key), functions=_registry(greet=lambda: "hi")
    ).start()
    caller = Client(WebSocketTransport(host.url, host.client_key)).start()
    try:
        assert caller.call("greet") == "hi"
        assert other.call("shout") == "HI"  # a call inside the app "other"
        got = everything.events_until(lambda g: _finished("greet")(g) and _finished("shout")(g))
        kinds = [(e["kind"], e.get("command") or e.get("name"), e["app"]) for e in got]
        assert ("registration", "greet", "default") in kinds
        assert ("call_started", "greet", "default") in kinds
        assert ("call_finished", "shout", "other") in kinds
        assert all("args" not in e and "result" not in e for e in got)

        mine = only_other.events_until(_finished("shout"))
        assert {e["app"] for e in mine} == {"other"}
    finally:
        for c in (caller, other, provider):
            c.close()


def test_a_reader_that_goes_away_is_unsubscribed(tmp_path):
    ht = HostThread(lambda: Host(data_dir=tmp_path))
    keys = Keys("server-key-for-event-tests", "client-key-for-event-tests")
    try:
        port = listen_embedded(ht, keys).port
        stream = EventStream(
            port, "/_/admin/events", {"Authorization": f"Bearer {keys.server_key}"}
        )
        assert stream.status == 200
        assert wait_until(lambda: ht.run(lambda: ht.host.events.active), WAIT)
        stream.close()
        assert wait_until(lambda: not ht.run(lambda: ht.host.events.active), WAIT)
    finally:
        ht.stop()


def test_the_events_of_one_turn_reach_a_watcher_as_one_message(host_thread: HostThread):
    """Twenty registrations handled in one turn of the host's loop: one EVENT message."""
    host = host_thread.host
    watcher = host_thread.connect("server_module")
    inbox: list[dict[str, Any]] = []
    watcher.open(lambda msg, media: inbox.append(msg), lambda reason: None)
    watcher.send(protocol.call("w", "anvil.private.watch_events", [], {}, []))
    assert wait_until(lambda: any(m.get("id") == "w" for m in inbox), WAIT)

    class Provider:
        name = kind = "server_module"
        client = {"type": "server_module", "ip": "127.0.0.1"}
        queued_bytes = 0

        def send(self, data: bytes, media: Any = None, request_id: Any = None) -> None:
            pass

        def close(self, reason: str) -> None:
            pass

    provider = Provider()

    def register_twenty() -> None:  # one callback: one turn of the loop
        host.attach(provider)
        for i in range(20):
            host.receive(provider, protocol.register(f"f{i}"))

    host_thread.run(register_twenty)
    try:
        assert wait_until(lambda: any(m.get("type") == "EVENT" for m in inbox), WAIT)
        host_thread.run(lambda: None)  # anything else pushed would be here by now
        pushes = [m for m in inbox if m.get("type") == "EVENT"]
        assert len(pushes) == 1
        assert [from_wire(e).name for e in pushes[0]["events"]] == [f"f{i}" for i in range(20)]
    finally:
        host_thread.run(host.detach, provider)
        watcher.close()


def test_a_reader_that_does_not_keep_up_loses_the_oldest_events_and_is_told():
    """What one ``_/admin/events`` reader can hold is bounded in events and in bytes."""
    from anvil_nb.web import handlers

    async def run() -> tuple[str, int]:
        sub = handlers._Subscription(app=None)
        big = "x" * (1024 * 1024)
        for i in range(20):  # 20 MiB of updates: more than the byte bound
            sub(CapabilityUpdated(float(i), f"c{i}", "scope", big, direction="host", app="a"))
        held = sub.size
        return sub.take(), held

    text, held = asyncio.run(run())
    assert held <= handlers.EVENTS_BACKLOG_BYTES
    first, *rest = text.split("\n\n")
    dropped = json.loads(first.split("data: ", 1)[1])["dropped"]
    kept = [json.loads(part[6:]) for part in rest if part.startswith("data: ")]
    assert dropped + len(kept) == 20 and dropped >= 12
    assert [e["call_id"] for e in kept] == [f"c{i}" for i in range(dropped, 20)]  # the newest
