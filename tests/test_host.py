"""The dispatcher: routing, trust, sessions, capabilities, timeouts and provider loss.

Each test runs a real host on its own loop thread and joins it with real clients over the
in-process transport (which encodes every message to JSON bytes, as a WebSocket would). A
``client_uplink`` or ``browser`` client plays an untrusted caller. ``RawPeer`` speaks bare
protocol messages, for what an anvil_nb client would never send.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
from support.gates import Gate
from support.waiting import wait_until

from anvil_nb import server
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.core.capability import Capability
from anvil_nb.core.errors import (
    AnvilError,
    AuthenticationFailed,
    NoServerFunctionError,
    PermissionDenied,
    SerializationError,
    SessionExpiredError,
    StackOverflow,
    TimeoutError,
    UplinkDisconnectedError,
)
from anvil_nb.core.events import CallFinished, CallStarted, CapabilityUpdated, RegistrationChanged
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.host.sessions import SessionManager
from anvil_nb.media import BlobMedia

WAIT = 10.0


def provider_with(connect: Any, **fns: Any) -> Client:
    registry = FunctionRegistry()
    for name, fn in fns.items():
        registry.register(name, fn)
    return connect("server_module", registry)


class RawPeer:
    """A peer that sends and receives bare protocol messages."""

    def __init__(self, ht: HostThread, kind: str = "server_module"):
        self.transport = ht.connect(kind)
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.closed = threading.Event()
        self.transport.open(
            lambda msg, media: self.inbox.put(msg), lambda reason: self.closed.set()
        )
        assert self.next()["auth"] == "OK"

    def send(self, msg: dict[str, Any]) -> None:
        self.transport.send(msg)

    def next(self) -> dict[str, Any]:
        return self.inbox.get(timeout=WAIT)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture
def raw(host_thread: HostThread) -> Any:
    peers: list[RawPeer] = []

    def make(kind: str = "server_module") -> RawPeer:
        peers.append(RawPeer(host_thread, kind))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


# ---------------------------------------------------------------------------------------------
# Routing


def test_call_reaches_the_provider_and_returns_a_copy(connect):
    received = []

    def keep(d):
        received.append(d)
        d["seen"] = True
        return d

    provider_with(connect, keep=keep)
    caller = connect("server_module")
    original = {"a": [1, 2]}
    result = caller.call("keep", original)
    assert result == {"a": [1, 2], "seen": True}
    assert original == {"a": [1, 2]}  # the caller's object is untouched
    assert received[0] is not original and result is not received[0]


def test_names_are_full_match_regexes(connect):
    provider_with(connect, **{"get_[a-z]+": lambda: server.context.type})
    caller = connect()
    assert caller.call("get_user") == "server_module"
    with pytest.raises(NoServerFunctionError, match='"xget_user"'):
        caller.call("xget_user")
    with pytest.raises(NoServerFunctionError):
        caller.call("get_user2")


def test_unknown_function_raises_no_server_function_error(connect):
    caller = connect()
    with pytest.raises(NoServerFunctionError, match='No server function matching "missing"'):
        caller.call("missing")


def test_registration_is_idempotent_and_withdrawn_on_unregister(connect, host_thread):
    registry = FunctionRegistry()
    registry.register("f", lambda: 1)
    provider = connect("server_module", registry)
    provider.transport.send({"type": "REGISTER", "name": "f"})  # repeats are harmless
    provider.sync()
    names = host_thread.run(host_thread.host.registry.names)
    assert len(names["f"]) == 1
    registry.register("f", lambda: 2)  # same name, new function: replaced locally
    assert connect().call("f") == 2
    registry.unregister("f")
    provider.sync()
    with pytest.raises(NoServerFunctionError):
        connect().call("f")


def test_several_providers_share_calls_round_robin_and_each_call_runs_once(connect):
    counts = {"a": 0, "b": 0}
    lock = threading.Lock()

    def counter(tag):
        def f(i):
            with lock:
                counts[tag] += 1
            return tag, i

        return f

    provider_with(connect, work=counter("a"))
    provider_with(connect, work=counter("b"))
    caller = connect()
    results = [caller.call("work", i) for i in range(10)]
    assert counts == {"a": 5, "b": 5}
    assert [r[1] for r in results] == list(range(10))
    assert [r[0] for r in results[:4]] in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


def test_media_of_one_megabyte_travels_both_ways(connect):
    provider_with(
        connect, rev=lambda m: BlobMedia("application/x-rev", m.get_bytes()[::-1], name="r.bin")
    )
    data = bytes(range(256)) * 4096
    out = connect().call("rev", BlobMedia("application/octet-stream", data, name="d.bin"))
    assert out.get_bytes() == data[::-1]
    assert (out.content_type, out.name, out.length) == ("application/x-rev", "r.bin", len(data))


def test_async_callables_run_and_return(connect):
    async def double(x):
        return x * 2

    provider_with(connect, double=double)
    assert connect().call("double", 21) == 42


def test_errors_arrive_as_the_same_class_with_a_remote_trace(connect):
    def boom():
        raise ValueError("kaboom")

    class MyError(Exception):
        pass

    def mine():
        raise MyError("custom")

    provider_with(connect, boom=boom, mine=mine)
    caller = connect()
    with pytest.raises(ValueError, match="kaboom") as info:
        caller.call("boom")
    assert any("Remote traceback" in n and "test_host.py" in n for n in info.value.__notes__)
    with pytest.raises(AnvilError, match="custom") as wrapped:
        caller.call("mine")
    assert wrapped.value.remote_type == "MyError"


# ---------------------------------------------------------------------------------------------
# Trust and call context


def describe():
    ctx = server.context
    return {
        "type": ctx.type,
        "client": ctx.client.type,
        "remote": ctx.remote_caller.type,
        "trusted": ctx.remote_caller.is_trusted,
        "stack": [f.type for f in ctx.call_stack],
    }


@pytest.mark.parametrize(
    ("kind", "trusted"),
    [("server_module", True), ("uplink", True), ("client_uplink", False), ("browser", False)],
)
def test_provider_sees_caller_type_and_trust(connect, kind, trusted):
    provider_with(connect, describe=describe)
    seen = connect(kind).call("describe")
    assert seen == {
        "type": "server_module",
        "client": kind,
        "remote": kind,
        "trusted": trusted,
        "stack": [kind],
    }


def test_untrusted_callers_cannot_reach_names_with_a_colon(connect):
    provider_with(connect, **{"task:slow": lambda: "ran"})
    assert connect("server_module").call("task:slow") == "ran"
    with pytest.raises(PermissionDenied, match="task:slow"):
        connect("client_uplink").call("task:slow")


def test_untrusted_peer_cannot_register_and_others_are_unaffected(connect, host_thread):
    provider_with(connect, ok=lambda: "fine")
    bystander = connect()
    registry = FunctionRegistry()
    registry.register("sneaky", lambda: "pwned")
    with pytest.raises(AnvilError):
        Client(host_thread.connect("client_uplink"), functions=registry).start(timeout=WAIT)
    assert "sneaky" not in host_thread.run(host_thread.host.registry.names)
    assert bystander.call("ok") == "fine"


def test_nested_calls_stack_frames_and_share_the_callers_session(connect):
    def outer():
        server.session["from_outer"] = 1
        inner_view = server.call("inner")
        return {"outer": describe(), "inner": inner_view, "session": dict(server.session)}

    def inner():
        seen = dict(server.session)
        server.session["from_inner"] = 2
        return {**describe(), "seen": seen, "sid": server.get_session_id()}

    provider_with(connect, outer=outer)
    provider_with(connect, inner=inner)
    caller = connect("client_uplink")
    out = caller.call("outer")
    assert out["outer"]["stack"] == ["client_uplink"]
    assert out["inner"]["stack"] == ["server_module", "client_uplink"]
    assert out["inner"]["trusted"] is True and out["inner"]["client"] == "client_uplink"
    assert out["inner"]["seen"] == {"from_outer": 1}  # the outer call's change travelled along
    assert out["session"] == {"from_outer": 1, "from_inner": 2}  # and the inner one came back
    assert caller.call("anvil.private.get_session_id") == out["inner"]["sid"]


def test_calls_nested_too_deeply_raise_stack_overflow(connect):
    def recurse(n):
        return server.call("recurse", n + 1)

    provider_with(connect, recurse=recurse)
    with pytest.raises(StackOverflow):
        connect().call("recurse", 0)


def test_require_user_without_a_user_is_authentication_failed(connect):
    # as the real client: anvil.users.AuthenticationFailed (tests/test_users_host.py logs in)
    registry = FunctionRegistry()
    registry.register("secret", lambda: 1, require_user=True)
    connect("server_module", registry)
    with pytest.raises(AuthenticationFailed, match="must be logged in"):
        connect().call("secret")


# ---------------------------------------------------------------------------------------------
# Sessions


def count():
    server.session["n"] = server.session.get("n", 0) + 1
    return server.session["n"], server.get_session_id()


def test_each_connection_has_its_own_session(connect):
    provider_with(connect, count=count)
    a, b = connect("client_uplink"), connect("client_uplink")
    assert [a.call("count")[0] for _ in range(3)] == [1, 2, 3]
    assert b.call("count")[0] == 1
    assert a.call("count")[1] != b.call("count")[1]


def test_unserialisable_session_value_fails_that_call_and_keeps_the_old_session(connect):
    def store_bad():
        server.session["n"] = 99
        server.session["lock"] = threading.Lock()

    provider_with(connect, count=count, store_bad=store_bad)
    caller = connect()
    caller.call("count")
    with pytest.raises(SerializationError, match=r"session.*\['lock'\]"):
        caller.call("store_bad")
    assert caller.call("count")[0] == 2


def test_reset_session_empties_it_and_changes_its_id(connect):
    def reset():
        before = server.get_session_id()
        server.reset_session()
        return before, server.get_session_id(), dict(server.session)

    provider_with(connect, count=count, reset=reset)
    caller = connect()
    caller.call("count")
    before, after, contents = caller.call("reset")
    assert before != after and contents == {}
    assert caller.call("count") == [1, after]  # tuples travel as lists


def test_idle_session_expires_then_a_fresh_one_starts():
    clock = {"now": 1000.0}
    ht = HostThread(lambda: Host(sessions=SessionManager(timeout=60, clock=lambda: clock["now"])))
    try:
        registry = FunctionRegistry()
        registry.register("count", count)
        provider = Client(ht.connect(), functions=registry).start()
        caller = Client(ht.connect("client_uplink"), functions=FunctionRegistry()).start()
        assert caller.call("count")[0] == 1
        clock["now"] += 61
        with pytest.raises(SessionExpiredError):
            caller.call("count")
        assert caller.call("count")[0] == 1
        for c in (caller, provider):
            c.close()
    finally:
        ht.stop()


# ---------------------------------------------------------------------------------------------
# Capabilities


def cap_functions() -> dict[str, Any]:
    def mint(doc):
        return Capability(["doc", doc])

    def read(cap):
        return server.unwrap_capability(cap, ["doc", Capability.ANY, "page"])

    def touch(cap):
        cap.send_update({"touched": cap.scope[1]})
        return cap.is_valid

    def reset_then_check(cap):
        server.reset_session()
        return cap.is_valid

    return {"mint": mint, "read": read, "touch": touch, "reset_then_check": reset_then_check}


def test_capability_minted_by_provider_round_trips_through_an_untrusted_client(connect):
    provider_with(connect, **cap_functions())
    client = connect("client_uplink")
    cap = client.call("mint", 42)
    assert isinstance(cap, Capability) and cap.scope == ["doc", 42] and cap._mac
    assert client.call("read", cap) == ["doc", 42, None]
    assert client.call("read", cap.narrow(["page"])) == ["doc", 42, "page"]
    with pytest.raises(ValueError, match="too narrow"):
        client.call("read", cap.narrow(["page", 3, "line"]))


@pytest.mark.parametrize("mac", ["forged", None, ""])
def test_forged_or_missing_mac_from_an_untrusted_client_is_refused(connect, mac):
    provider_with(connect, **cap_functions())
    client = connect("client_uplink")
    fake = Capability(["doc", 42], mac=mac) if mac is not None else Capability(["doc", 42])
    with pytest.raises(PermissionDenied, match="Invalid Capability"):
        client.call("read", fake)
    assert client.call("read", client.call("mint", 1)) == ["doc", 1, None]  # still connected


def test_capability_from_another_session_is_refused(connect):
    provider_with(connect, **cap_functions())
    alice, mallory = connect("client_uplink"), connect("client_uplink")
    cap = alice.call("mint", 7)
    with pytest.raises(PermissionDenied):
        mallory.call("read", cap)
    assert alice.call("read", cap) == ["doc", 7, None]


def test_trusted_callers_may_send_unsigned_capabilities(connect):
    provider_with(connect, **cap_functions())
    assert connect("server_module").call("read", Capability(["doc", 5])) == ["doc", 5, None]


def test_updates_flow_back_to_the_caller_that_passed_the_capability(connect):
    provider_with(connect, **cap_functions())
    client = connect("client_uplink")
    cap = client.call("mint", 3)
    applied = []
    cap.set_update_handler(applied.append)
    assert client.call("touch", cap) is True
    assert applied == [{"touched": 3}]
    other = client.call("mint", 4)
    other_applied = []
    other.set_update_handler(other_applied.append)
    client.call("touch", cap)
    assert other_applied == []  # only the capability passed in hears of it


def test_default_update_rule_merges_dicts_on_the_caller(connect):
    provider_with(connect, **cap_functions())
    client = connect("client_uplink")
    cap = client.call("mint", 9)
    client.call("touch", cap)
    assert cap._take_update() == {"touched": 9}


def test_host_drops_updates_for_capabilities_the_caller_did_not_pass(connect, raw):
    provider = raw()
    provider.send({"type": "REGISTER", "name": "leak"})
    caller = connect("client_uplink")
    result: dict[str, Any] = {}
    t = threading.Thread(target=lambda: result.update(v=caller.call("leak")))
    t.start()
    call = provider.next()
    assert call["type"] == "CALL" and call["command"] == "leak"
    provider.send(
        {"id": call["id"], "response": 1, "objects": [], "capUpdates": {'["secret"]': {"x": 1}}}
    )
    t.join(WAIT)
    assert result == {"v": 1}


def test_capability_is_invalid_after_its_session_is_reset(connect):
    provider_with(connect, **cap_functions())
    client = connect("client_uplink")
    cap = client.call("mint", 1)
    assert client.call("reset_then_check", cap) is False
    with pytest.raises(PermissionDenied):
        client.call("read", cap)  # the old session's MAC is refused in the new one


# ---------------------------------------------------------------------------------------------
# Timeouts and lost providers


def test_call_times_out_and_the_late_answer_is_dropped():
    release = threading.Event()
    ht = HostThread(lambda: Host(call_timeout=0.3))
    try:
        registry = FunctionRegistry()
        registry.register("stuck", lambda: release.wait(WAIT))
        registry.register("quick", lambda: "ok")
        provider = Client(ht.connect(), functions=registry).start()
        caller = Client(ht.connect(), functions=FunctionRegistry()).start()
        with pytest.raises(TimeoutError, match="stuck"):
            caller.call("stuck")
        release.set()
        assert caller.call("quick") == "ok"
        for c in (caller, provider):
            c.close()
    finally:
        release.set()
        ht.stop()


def test_provider_lost_mid_call_fails_the_caller_at_once(connect, host_thread):
    slow = Gate(timeout=WAIT)
    started, release = slow.started, slow.release
    provider = provider_with(connect, slow=slow)
    caller = connect()
    errors: list[BaseException] = []

    def call():
        try:
            caller.call("slow")
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert started.wait(WAIT)
    provider.transport.close()
    t.join(WAIT)
    release.set()
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], UplinkDisconnectedError)
    with pytest.raises(NoServerFunctionError):
        caller.call("slow")


def test_response_for_an_unknown_id_is_dropped_and_the_connection_stays(connect, raw, caplog):
    provider_with(connect, ok=lambda: "fine")
    bystander = connect()
    rogue = raw()
    for _ in range(50):
        rogue.send({"id": "nonsense", "response": 1, "objects": []})
    rogue.send({"type": "CALL", "id": "c1", "command": "ok", "args": [], "kwargs": {}})
    assert rogue.next() == {"id": "c1", "response": "fine", "objects": []}
    assert not rogue.closed.is_set()
    assert bystander.call("ok") == "fine"
    dropped = [r for r in caplog.records if "unknown call id" in r.getMessage()]
    assert len(dropped) == 1  # fifty of them, one line (rate-limited)


def test_malformed_call_fails_that_call_only(raw):
    peer = raw()
    peer.send({"type": "CALL", "id": "c1", "command": "x", "args": "not a list", "kwargs": {}})
    reply = peer.next()
    assert reply["id"] == "c1" and "args" in reply["error"]["message"]
    peer.send(
        {
            "type": "CALL",
            "id": "c2",
            "command": "anvil.private.echo",
            "args": ["hi"],
            "kwargs": None,
        }
    )
    assert peer.next() == {"id": "c2", "response": "hi", "objects": []}


def test_calls_to_the_provider_carry_the_fields_the_real_client_needs(connect, raw):
    provider = raw()
    provider.send({"type": "REGISTER", "name": "see"})
    caller = connect("browser")
    t = threading.Thread(target=caller.call, args=("see", 1), kwargs={"k": 2})
    t.start()
    call = provider.next()
    provider.send(
        {
            "id": call["id"],
            "response": None,
            "objects": [],
            "sessionData": {"session": None, "objects": []},
        }
    )
    t.join(WAIT)
    assert call["args"] == [1] and call["kwargs"] == {"k": 2}
    assert call["call-stack-id"] == call["id"]
    assert call["call-stack"] == [{"type": "browser", "protocol-version": 8}]
    assert call["client"]["type"] == "browser" and isinstance(call["client"]["ip"], str)
    assert call["sessionData"] == {}  # a fresh session is {}, never null
    assert "type" not in provider.inbox.queue  # nothing else arrived


# ---------------------------------------------------------------------------------------------
# Events


def test_event_bus_reports_registrations_calls_and_capability_updates(connect, host):
    events: list[Any] = []
    host.events.subscribe(events.append)
    host.events.subscribe(lambda e: 1 / 0)  # a failing subscriber must not break anything
    provider_with(connect, **cap_functions())
    client = connect("browser")
    cap = client.call("mint", 1)
    client.call("touch", cap)
    kinds = [type(e) for e in events]
    assert RegistrationChanged in kinds and CapabilityUpdated in kinds
    started = [e for e in events if isinstance(e, CallStarted) and e.command == "touch"][0]
    finished = [e for e in events if isinstance(e, CallFinished) and e.call_id == started.call_id][
        0
    ]
    assert started.call_stack == ("browser",) and started.trusted is False
    assert started.client["type"] == "browser" and finished.ok and finished.duration >= 0
    update = [e for e in events if isinstance(e, CapabilityUpdated)][0]
    assert update.scope_key == '["doc", 1]' and update.update == {"touched": 1}


# ---------------------------------------------------------------------------------------------
# Concurrency


def test_concurrent_calls_keep_their_own_context_and_session(connect):
    n = 32
    barrier = threading.Barrier(n, timeout=WAIT)

    def who(tag):
        server.session["tag"] = tag
        barrier.wait()  # all n calls are in flight at once before anyone reads its context
        return tag, server.context.client.type, server.session["tag"], server.get_session_id()

    provider_with(connect, who=who)
    callers = [connect("browser" if i % 2 else "client_uplink") for i in range(n)]
    results: list[Any] = [None] * n

    def run(i):
        results[i] = callers[i].call("who", i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for i, (tag, client_type, session_tag, _sid) in enumerate(results):
        assert tag == i == session_tag
        assert client_type == ("browser" if i % 2 else "client_uplink")
    assert len({r[3] for r in results}) == n


def test_concurrent_async_calls_keep_their_own_context(connect):
    import asyncio

    n = 16

    async def who(tag):
        server.session["tag"] = tag
        await asyncio.sleep(0)  # yield to the other tasks on the loop
        return tag, server.session["tag"], server.context.client.type

    provider_with(connect, who=who)
    callers = [connect("client_uplink") for _ in range(n)]
    results: list[Any] = [None] * n
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, callers[i].call("who", i)))
        for i in range(n)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert results == [[i, i, "client_uplink"] for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Data dir


def test_data_dir_keeps_sessions_and_the_mac_key_across_a_restart(tmp_path):
    from anvil_nb.core.capability import sign_scope, verify_scope
    from anvil_nb.host.sessions import SQLiteSessionStore

    first = Host(data_dir=tmp_path)
    assert isinstance(first.sessions.store, SQLiteSessionStore)
    record = first.sessions.new(client={"type": "browser", "ip": "127.0.0.1"}, persistent=True)
    first.sessions.save_data(record, {"session": {"cart": [1, 2]}, "objects": []})
    mac = sign_scope(first.secret, record.secret, ["doc", 1])
    first.sessions.close()

    second = Host(data_dir=tmp_path)  # a restart: same folder, new process state
    again = second.sessions.use(record.id)
    assert again.data == {"session": {"cart": [1, 2]}, "objects": []}
    assert second.secret == first.secret
    assert verify_scope(second.secret, again.secret, ["doc", 1], mac)  # capabilities still hold
    assert (tmp_path / "host-secret").stat().st_mode & 0o077 == 0
    second.sessions.close()


def test_tasks_started_inside_an_async_callable_see_its_context(connect):
    import asyncio

    async def fan_out():
        async def peek(i):
            await asyncio.sleep(0)
            return i, server.context.client.type, server.get_session_id()

        return await asyncio.gather(*(peek(i) for i in range(4)))

    provider_with(connect, fan_out=fan_out)
    caller = connect("browser")
    sid = caller.call("anvil.private.get_session_id")
    assert caller.call("fan_out") == [[i, "browser", sid] for i in range(4)]


def test_housekeeping_removes_expired_sessions_and_reports_them():
    clock = {"now": 0.0}
    host = Host(sessions=SessionManager(timeout=60, clock=lambda: clock["now"]))
    old = host.sessions.new()
    clock["now"] = 30
    fresh = host.sessions.new()
    clock["now"] = 61
    seen: list[Any] = []
    host.events.subscribe(seen.append)
    assert host.housekeeping() == [old.id]
    assert host.sessions.get(fresh.id) is not None and host.sessions.get(old.id) is None
    assert [(e.session_id, e.reason) for e in seen] == [(old.id, "expired")]


def test_connection_sessions_live_in_memory_and_never_reach_the_store(connect, host_thread):
    writes = []
    store = host_thread.host.sessions.store
    original_put = store.put
    store.put = lambda record: (writes.append(record.id), original_put(record))  # count writes
    provider_with(connect, count=count, peek=lambda: dict(server.session))
    caller = connect()
    caller.call("count")
    caller.call("count")
    assert caller.call("peek") == {"n": 2}
    assert writes == []
    sid = caller.call("anvil.private.get_session_id")
    assert host_thread.run(host_thread.host.sessions.get, sid).data is not None
    caller.close()
    assert wait_until(lambda: host_thread.run(host_thread.host.sessions.get, sid) is None)


def test_unchanged_persistent_session_data_is_not_written_again(tmp_path):
    from anvil_nb.host.sessions import SQLiteSessionStore

    manager = SessionManager(SQLiteSessionStore(tmp_path / "s.sqlite3"))
    writes = []
    original_put = manager.store.put
    manager.store.put = lambda record: (writes.append(record.id), original_put(record))
    record = manager.new(persistent=True)
    manager.save_data(record, {"session": {"n": 1}, "objects": []})
    assert len(writes) == 2
    assert manager.store.get(record.id).data == {"session": {"n": 1}, "objects": []}
    manager.close()


def test_a_stale_session_copy_does_not_undo_changes_made_meanwhile(connect):
    entered, gate = threading.Event(), threading.Event()

    def slow():
        entered.set()
        gate.wait(WAIT)  # holds the session copy it was given, unchanged

    provider_with(connect, slow=slow, count=count)
    caller = connect()
    pending = caller.send_call("slow", [], {})
    assert entered.wait(WAIT)
    assert caller.call("count")[0] == 1  # the session changes while "slow" runs
    gate.set()
    msg, _ = pending.result(WAIT)
    assert "response" in msg
    assert caller.call("count")[0] == 2  # slow's older copy was not stored over it


def test_the_host_names_its_peers_uniquely_whatever_the_transport(host_thread, connect):
    first, second = connect(), connect()
    third = connect("client_uplink")
    names = [c.transport.name for c in (first, second, third)]
    assert len(set(names)) == 3, names
    assert names[0].startswith("server_module-") and names[2].startswith("client_uplink-")
    other = HostThread()
    try:
        elsewhere = Client(other.connect(), functions=FunctionRegistry()).start()
        assert elsewhere.transport.name == "server_module-1"  # counted per host
        elsewhere.close()
    finally:
        other.stop()
