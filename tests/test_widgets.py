"""The live widgets: models after sequences of events, throttled renders, bounds, thread safety,
the HTML the views show, and a feed driven by real calls through an in-process host.

Widgets are created without a kernel (ipywidgets then uses a comm that sends nothing); the
views are rendered synchronously with ``refresh()`` where a test looks at their HTML.
"""

from __future__ import annotations

import threading
import time

import pytest
from support.nethost import KEYS, NetHost
from support.waiting import wait_until

from anvil_nb.client import capture
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.core.capability import Capability
from anvil_nb.core.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    EventBus,
    RegistrationChanged,
    RegistrySnapshot,
    SessionChanged,
)
from anvil_nb.widgets import CallLog, CapabilityStream, Feed, Registry, SessionInspector, dashboard
from anvil_nb.widgets.models import CallLogModel, CapabilityModel, SessionModel, short_repr
from anvil_nb.widgets.throttle import Throttle

WAIT = 10.0


def started(
    call_id: str, command: str = "greet", caller: str = "client_uplink", **kw
) -> CallStarted:
    return CallStarted(
        time=time.time(),
        call_id=call_id,
        command=command,
        client={
            "type": caller,
            "ip": "10.0.0.1",
            "location": {"city": "Cambridge", "country": {"name": "UK"}},
        },
        call_stack=(caller,),
        trusted=caller in ("uplink", "server_module"),
        session_id="sess-123456789",
        args=kw.pop("args", ("ann",)),
        kwargs=kw.pop("kwargs", {}),
        **kw,
    )


def finished(call_id: str, command: str = "greet", ok: bool = True, **kw) -> CallFinished:
    return CallFinished(
        time=time.time(), call_id=call_id, command=command, duration=0.0123, ok=ok, **kw
    )


def boom_failed(call_id: str, frame: tuple[str, int]) -> CallFinished:
    """``boom`` raised ``ValueError("kaboom")`` at *frame* (file, line)."""
    return finished(
        call_id,
        command="boom",
        ok=False,
        error_type="ValueError",
        error_message="kaboom",
        trace=(frame,),
    )


# ---------------------------------------------------------------------------------------------
# Models


def test_call_log_keeps_calls_newest_first_with_their_outcome():
    m = CallLogModel()
    m.apply(started("c1"))
    m.apply(started("c2", command="boom"))
    m.apply(finished("c1", result="hi ann", output="printed\n"))
    m.apply(boom_failed("c2", ("f.py", 3)))
    rows = m.rows()
    assert [r.call_id for r in rows] == ["c2", "c1"]
    assert (rows[1].outcome, rows[1].result, rows[1].output) == ("ok", "'hi ann'", "printed\n")
    assert (rows[0].outcome, rows[0].error_type, rows[0].error_message) == (
        "error",
        "ValueError",
        "kaboom",
    )
    assert rows[1].caller == "client_uplink" and rows[1].trusted is False
    assert rows[1].location == "Cambridge, UK" and rows[1].ip == "10.0.0.1"
    assert [r.call_id for r in m.rows(outcome="error")] == ["c2"]
    assert [r.call_id for r in m.rows(function="greet")] == ["c1"]
    assert m.functions() == ["boom", "greet"]


def test_call_log_is_a_ring_buffer():
    m = CallLogModel(maxlen=10)
    for i in range(25):
        m.apply(started(f"c{i}"))
        m.apply(finished(f"c{i}"))
    assert len(m.rows()) == 10 and m.total == 25
    assert m.rows()[-1].call_id == "c15"
    m.apply(finished("c0"))  # the end of a call already dropped changes nothing
    assert m.version == 50


def test_reprs_are_short_and_never_raise():
    class Bad:
        def __repr__(self):
            raise RuntimeError("no")

    assert "..." in short_repr("x" * 1000) and len(short_repr("x" * 1000)) < 100
    assert short_repr("y" * 1000, limit=20) == "'" + "y" * 18 + "…"
    assert short_repr(Bad()).startswith("<Bad instance at")  # reprlib's own fallback
    m = CallLogModel()
    m.apply(started("c1", args=(Bad(), list(range(100)))))
    assert "Bad instance" in m.rows()[0].args


def test_session_model_highlights_changed_keys_and_shows_resets():
    m = SessionModel()
    m.apply(SessionChanged(time.time(), "s1", "saved", {"a": 1, "b": 2}))
    assert m.sessions()[0].changed == {"a", "b"}
    m.apply(SessionChanged(time.time(), "s1", "saved", {"a": 1, "b": 3, "c": 4}))
    assert m.sessions()[0].changed == {"b", "c"}
    m.apply(SessionChanged(time.time(), "s1", "saved", {"a": 1}))
    assert m.sessions()[0].changed == {"b", "c"}  # removed keys count as changed
    m.apply(SessionChanged(time.time(), "s1", "reset", replaced_by="s2"))
    view = m.sessions()[0]
    assert (view.status, view.replaced_by, view.data) == ("reset", "s2", {"a": "1"})


def test_capability_model_aggregates_by_the_default_rule():
    m = CapabilityModel(per_scope=3)
    key = '["doc", 1]'
    for update in ({"a": 1}, {"b": 2}, {"a": 3}):
        m.apply(CapabilityUpdated(time.time(), "c", key, update))
    assert m.scopes()[0].aggregate == {"a": 3, "b": 2}
    m.apply(CapabilityUpdated(time.time(), "c", key, "replaced"))
    view = m.scopes()[0]
    assert view.aggregate == "replaced" and view.count == 4 and len(view.updates) == 3


def test_capability_model_takes_a_custom_rule_and_survives_a_failing_one():
    summing = CapabilityModel(rule=lambda agg, u: (agg or 0) + u)
    for n in (1, 2, 3):
        summing.apply(CapabilityUpdated(time.time(), "c", "[1]", n))
    assert summing.scopes()[0].aggregate == 6
    failing = CapabilityModel(rule=lambda agg, u: 1 / 0)
    failing.apply(CapabilityUpdated(time.time(), "c", "[1]", 1))
    assert "rule failed" in failing.scopes()[0].aggregate


def test_registry_model_follows_snapshots_and_changes():
    feed = Feed(bus=EventBus())
    feed.apply(RegistrySnapshot(time.time(), {"a": ["k1"], "b": ["k1", "u2"]}))
    feed.apply(RegistrationChanged(time.time(), "c", "u2", True))
    feed.apply(RegistrationChanged(time.time(), "b", "k1", False))
    feed.apply(RegistrationChanged(time.time(), "a", "k1", False))
    assert feed.registry.names() == {"b": ["u2"], "c": ["u2"]}


def test_models_are_safe_from_many_threads():
    m = CallLogModel(maxlen=100_000)
    renders = []
    m.subscribe(lambda: renders.append(1))

    def work(t):
        for i in range(500):
            m.apply(started(f"t{t}-{i}"))
            m.apply(finished(f"t{t}-{i}"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert m.total == 4000 and all(r.outcome == "ok" for r in m.rows())
    assert len(renders) == m.version == 8000


# ---------------------------------------------------------------------------------------------
# Throttling


def test_a_burst_of_changes_renders_once():
    done = threading.Event()
    calls = []
    throttle = Throttle(lambda: (calls.append(1), done.set()), interval=0.05)
    for _ in range(1000):
        throttle.mark()
    assert done.wait(WAIT)
    assert calls == [1] and throttle.renders == 1
    done.clear()
    throttle.mark()  # the next change after a render schedules another
    assert done.wait(WAIT) and throttle.renders == 2


def test_a_failing_render_is_logged_and_later_renders_still_happen(caplog):
    done = threading.Event()
    attempts = []

    def render():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("render broke")
        done.set()

    throttle = Throttle(render, interval=0.01)
    throttle.mark()
    assert wait_until(lambda: attempts, WAIT)  # the first (failing) render
    throttle.mark()
    assert done.wait(WAIT)
    assert "render failed" in caplog.text


def test_views_render_at_most_once_per_interval_under_load():
    bus = EventBus()
    feed = Feed(bus=bus)
    view = CallLog(feed, interval=0.05)
    rendered = threading.Event()
    original = view.refresh

    def counting_refresh():
        original()
        rendered.set()

    view.throttle.render = counting_refresh
    for i in range(2000):
        bus.emit(started(f"c{i}"))
        bus.emit(finished(f"c{i}"))
    assert rendered.wait(WAIT)
    assert view.throttle.renders <= 3  # 4,000 events, a handful of renders
    view.refresh()
    assert view.table.value.count('class="anvil-nb-call"') == 200  # the view's limit


# ---------------------------------------------------------------------------------------------
# Views


def test_call_log_view_shows_rows_filters_and_details():
    bus = EventBus()
    feed = Feed(bus=bus)
    view = CallLog(feed)
    bus.emit(started("c1"))
    bus.emit(finished("c1", result="hi ann"))
    bus.emit(started("c2", command="boom", caller="browser"))
    bus.emit(boom_failed("c2", ("cell.py", 7)))
    view.refresh()
    html = view.table.value
    assert (
        '<tr class="anvil-nb-call" data-function="greet" data-caller="client_uplink" data-outcome="ok"'
        in html
    )
    assert 'data-function="boom" data-caller="browser" data-outcome="error"' in html
    assert "ValueError: kaboom" in html and "Cambridge, UK" in html
    view.function.value = "boom"
    assert 'data-function="greet"' not in view.table.value
    view.function.value = ""
    view.outcome.value = "ok"
    assert 'data-function="boom"' not in view.table.value
    view.outcome.value = ""
    view.choice.value = "c2"
    assert (
        "CallContext" in view.detail.value
        and "File &quot;cell.py&quot;, line 7" in view.detail.value
    )


def test_session_capability_and_registry_views_render_their_models():
    bus = EventBus()
    feed = Feed(bus=bus)
    sessions, caps, registry = SessionInspector(feed), CapabilityStream(feed), Registry(feed)
    bus.emit(SessionChanged(time.time(), "s1", "saved", {"cart": [1, 2]}))
    bus.emit(CapabilityUpdated(time.time(), "c1", '["doc", 42]', {"seen": True}))
    bus.emit(RegistrationChanged(time.time(), "greet", "uplink-7", True))
    for v in (sessions, caps, registry):
        v.refresh()
    assert "<mark>cart</mark> = [1, 2]" in sessions.table.value
    assert (
        'data-scope="[&quot;doc&quot;, 42]"' in caps.table.value
        and "{&#x27;seen&#x27;: True}" in caps.table.value
    )
    assert "greet" in registry.table.value and "uplink-7" in registry.table.value


def test_dashboard_has_the_five_tabs_and_two_dashboards_agree():
    bus = EventBus()
    feed = Feed(bus=bus)
    one, two = dashboard(feed), dashboard(feed)
    try:
        assert one.titles == ("Calls", "Sessions", "Capabilities", "Registry", "Tasks")
        bus.emit(started("c1"))
        for d in (one, two):
            d.children[0].refresh()
        assert one.children[0].table.value == two.children[0].table.value
        assert 'data-call="c1"' in one.children[0].table.value
    finally:
        one.close()  # their Tasks tabs stop the shared poller
        two.close()


# ---------------------------------------------------------------------------------------------
# Fed by real calls


def test_a_feed_on_a_client_sees_calls_sessions_and_capability_updates(connect):
    served = FunctionRegistry()

    def touch(cap):
        from anvil_nb import server

        server.session["touched"] = cap.scope[1]
        cap.send_update({"seen": True})
        print("touched", cap.scope)
        return "ok"

    served.register("mint", lambda: Capability(["doc", 7]))
    served.register("touch", touch)
    provider: Client = connect("server_module", served)
    provider.capture_output = True  # as in a kernel: what the call prints goes to its event
    caller: Client = connect("client_uplink")
    provider_feed, caller_feed = Feed(bus=provider.events), Feed(bus=caller.events)
    cap = caller.call("mint")
    capture.install()
    try:
        assert caller.call("touch", cap) == "ok"
    finally:
        capture.uninstall()

    served_rows = provider_feed.calls.rows(function="touch")
    assert served_rows[0].caller == "client_uplink" and served_rows[0].outcome == "ok"
    assert served_rows[0].output == "touched ['doc', 7]\n"
    made = caller_feed.calls.rows(function="touch")
    assert made[0].direction == "out" and made[0].outcome == "ok"
    assert provider_feed.sessions.sessions()[0].data == {"touched": "7"}
    assert provider_feed.capabilities.scopes()[0].aggregate == {"seen": True}
    received = caller_feed.capabilities.scopes()[0]
    assert received.scope_key == '["doc", 7]' and received.updates[0][2] == "received"


def test_a_widget_cannot_raise_into_the_call_path(connect):
    served = FunctionRegistry()
    served.register("ok", lambda: "fine")
    provider: Client = connect("server_module", served)
    provider.events.subscribe(lambda e: 1 / 0)  # a broken subscriber
    feed = Feed(bus=provider.events)
    feed.calls.subscribe(lambda: (_ for _ in ()).throw(RuntimeError("view broke")))
    assert connect().call("ok") == "fine"


@pytest.mark.parametrize("n", [1, 3])
def test_shared_feed_is_one_per_kernel(n):
    from anvil_nb.widgets import feed, shared_feed

    try:
        feeds = {id(shared_feed()) for _ in range(n)}
        assert len(feeds) == 1
    finally:  # later tests start without it (it listens to every client this process uses)
        if feed._feed is not None:
            feed._feed.unsubscribe()
            feed._feed = None


def test_widgets_keep_working_after_the_kernel_reconnects():
    from anvil_nb.client.client import functions
    from anvil_nb.jupyter import kernel

    h = NetHost()
    feed = Feed()  # on runtime.events, as the dashboard is
    try:
        kernel.join(h.url, KEYS.server_key)
        functions.register("ping", lambda: "pong")
        caller = h.client(KEYS.client_key)
        assert caller.call("ping") == "pong"
        assert [r.outcome for r in feed.calls.rows(function="ping")] == ["ok"]

        assert "ping" not in feed.registry.names()  # the host does not echo our own back to us
        back = threading.Event()
        h.host.events.subscribe(
            lambda e: back.set() if isinstance(e, RegistrationChanged) and e.added else None
        )
        h.ht.run(
            lambda: next(p for p in h.host.peers if p.kind == "server_module").close("dropped")
        )
        assert back.wait(WAIT)  # the kernel reconnected and registered again
        assert caller.call("ping") == "pong"
        assert [r.outcome for r in feed.calls.rows(function="ping")] == ["ok", "ok"]
        # the snapshot of the re-watch after reconnecting (it arrives on the I/O thread)
        assert wait_until(lambda: "ping" in feed.registry.names(), WAIT)
    finally:
        feed.unsubscribe()
        kernel.leave()
        h.stop()
