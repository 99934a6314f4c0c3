"""The widgets outside ``%load_ext`` too, readable call logs, and saved notebooks.

* A plain Python process (no IPython shell, no ``%load_ext``) that uses ``anvil_nb.server``
  sees its calls, sessions and registrations in a dashboard: through the embedded host its
  first ``server.call`` starts, and through ``server.connect`` to a real host listening on
  127.0.0.1 (a separate process, so nothing of this test process's state helps).
* The process's bus follows whichever client ``anvil_nb.runtime`` holds, including a kernel's
  after it joins another host.
* Portable objects without a ``__repr__`` of their own read as ``Person(name='Ann', age=3)``;
  a traceback in the details shows each frame's source line where this process has the file,
  and never reads a file a remote trace merely names.
* Views and the dashboard have a one-line ``text/plain`` (what a saved notebook shows without
  widgets), and in a real kernel they render as each cell ends, so a notebook executed by
  nbclient stores the final state. In JupyterLab, the committed tutorial reads as that line
  while untrusted and shows its saved widget state once trusted; a live call log with long
  arguments fits a 1400 px window instead of running off it.

Real parts: in-process hosts (``HostThread``) with their real listener, a real subprocess, a
real ipykernel driven by jupyter_client, a real JupyterLab in Debian's Chromium (the set-up of
tests/test_browser.py, in support/browser.py). Nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import html
import json
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, expect
from support.browser import START_WAIT, JupyterLab, chromium, open_and_run_notebook
from support.kernels import Kernel, Kernels
from support.nethost import KEYS, NetHost

from anvil_nb import runtime, server
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.core.events import CallFinished, CallStarted, EventBus
from anvil_nb.host.inprocess import HostThread
from anvil_nb.jupyter import kernel
from anvil_nb.web.service import listen_embedded
from anvil_nb.web.uplink import Keys
from anvil_nb.widgets import CallLog, CapabilityStream, Feed, Registry, SessionInspector, dashboard
from anvil_nb.widgets.models import short_repr
from anvil_nb.widgets.throttle import Throttle
from anvil_nb.widgets.view import LIVE

WAIT = 20.0

# ---------------------------------------------------------------------------------------------
# A plain process


PLAIN_PROCESS = textwrap.dedent(
    """
    import json, sys, threading, time
    import IPython
    from anvil_nb import server
    from anvil_nb.client.client import Client, FunctionRegistry
    from anvil_nb.client.websocket import WebSocketTransport
    from anvil_nb.widgets import dashboard

    URL, KEY = sys.argv[1], sys.argv[2]
    assert IPython.get_ipython() is None  # a plain process: no shell, no %load_ext

    def wait(predicate, what):
        deadline = time.monotonic() + 20
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit("timed out waiting for " + what)
            threading.Event().wait(0.01)

    @server.portable_class
    class Person:
        def __init__(self, name, age):
            self.name, self.age = name, age

    @server.callable
    def greet(who):
        server.session["greeted"] = getattr(who, "name", who)
        return "hi " + getattr(who, "name", str(who))

    server.call("greet", "before")  # the process's client exists before any widget

    board = dashboard()
    log, registry = board.children[0], board.feed.registry

    def rows():
        return [[r.function, r.direction, r.caller, r.args, r.outcome] for r in log.model.rows()]

    out = {}
    server.call("greet", Person("Ann", 3))
    out["embedded"] = rows()
    out["embedded_registry"] = registry.names()
    out["sessions"] = [s.data for s in board.feed.sessions.sessions()]

    server.disconnect()  # the embedded host goes; the dashboard stays
    server.connect(KEY, url=URL, quiet=True)
    server.call("greet", "net")
    out["connected"] = rows()

    extra = FunctionRegistry()
    extra.register("extra", lambda: 1)
    other = Client(WebSocketTransport(URL, KEY), functions=extra).start()
    wait(lambda: "extra" in registry.names(), "the host to push the registration of extra")
    out["connected_registry"] = registry.names()
    out["text"] = board._repr_mimebundle_()["text/plain"]
    board.children[3].refresh()
    out["registry_html"] = board.children[3].table.value
    other.close()
    server.disconnect()
    print("@@" + json.dumps(out), flush=True)
    """
)


def test_a_plain_process_sees_its_calls_through_the_embedded_host_and_server_connect(tmp_path):
    keys = Keys.generate()
    ht = HostThread()
    try:
        port = listen_embedded(ht, keys).port
        url = f"ws://127.0.0.1:{port}/_/uplink"
        run = subprocess.run(
            [sys.executable, "-c", PLAIN_PROCESS, url, keys.server_key],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=tmp_path,
        )
    finally:
        ht.stop()
    lines = [line for line in run.stdout.splitlines() if line.startswith("@@")]
    assert run.returncode == 0 and lines, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    out = json.loads(lines[0][2:])

    # Embedded: the call served by this process, and the same call made from it (newest first).
    # The call made before the dashboard existed is not there (the feed records from then on).
    person = "Person(name='Ann', age=3)"
    assert out["embedded"] == [
        ["greet", "in", "server_module", person, "ok"],
        ["greet", "out", "this process", person, "ok"],
    ]
    assert out["embedded_registry"] == {"greet": [out["embedded_registry"]["greet"][0]]}
    assert out["sessions"] == [{"greeted": "'Ann'"}]

    # server.connect: a new client, the same dashboard; calls through the real listener.
    assert out["connected"][:2] == [
        ["greet", "in", "uplink", "'net'", "ok"],
        ["greet", "out", "this process", "'net'", "ok"],
    ]
    assert out["connected"][2:] == out["embedded"]
    # The registry tab: the host's registrations, and a later one by another connection.
    assert set(out["connected_registry"]) == {"greet", "extra"}
    assert "<td>greet</td><td>this process</td>" in out["registry_html"]
    assert "Portable classes of this process: __main__.Person" in out["registry_html"]
    assert out["text"] == f"anvil_nb dashboard: 4 calls, 2 sessions, 2 functions {LIVE}"


def test_the_process_bus_follows_the_default_client(host_thread: HostThread):
    """Whatever client the process uses feeds ``runtime.events``, one at a time."""
    feed = Feed()  # on the process's bus, as the dashboard is
    try:
        registry = FunctionRegistry()
        registry.register("ping", lambda: "pong")
        first = Client(host_thread.connect("server_module"), functions=registry).start()
        runtime.set_client(first)
        assert server.call("ping") == "pong"
        assert [r.direction for r in feed.calls.rows()] == ["in", "out"]
        assert "ping" in feed.registry.names()  # watched: someone listens to the bus

        second = Client(host_thread.connect("server_module"), functions=registry).start()
        runtime.set_client(second)  # closes the first
        assert second.call("ping") == "pong"
        assert len(feed.calls.rows()) == 4
        assert not first.events.active  # no longer followed

        runtime.set_client(None)  # closes the second
        third = Client(host_thread.connect("server_module"), functions=registry).start()
        assert third.call("ping") == "pong"  # not the process's client: not in the feed
        third.close()
        assert len(feed.calls.rows()) == 4
    finally:
        feed.unsubscribe()


def test_a_kernel_that_joins_another_host_keeps_feeding_the_widgets():
    """``kernel.join`` (``%load_ext``, ``%anvil connect``) goes through the same follower."""
    from anvil_nb.client.client import functions

    one, two = NetHost(), NetHost()
    feed = Feed()
    try:
        kernel.join(one.url, KEYS.server_key)
        functions.register("ping", lambda: "pong")
        assert one.client(KEYS.client_key).call("ping") == "pong"
        kernel.join(two.url, KEYS.server_key)  # %anvil connect
        assert two.client(KEYS.client_key).call("ping") == "pong"
        assert [r.caller for r in feed.calls.rows(function="ping")] == ["client_uplink"] * 2
        assert runtime.connection().peer_name is not None
        assert "ping" in feed.registry.names()  # the snapshot the second host sent at the join
    finally:
        feed.unsubscribe()
        kernel.leave()
        one.stop()
        two.stop()


# ---------------------------------------------------------------------------------------------
# A readable call log


class Person:
    def __init__(self, name, age):
        self.name, self.age = name, age


class Tagged:
    def __init__(self):
        self.tag = "t"

    def __repr__(self):
        return "<Tagged t>"


def test_objects_without_a_repr_show_their_class_and_fields():
    assert short_repr(Person("Ann", 3)) == "Person(name='Ann', age=3)"
    assert short_repr(Tagged()) == "<Tagged t>"  # an own __repr__ is used as it is
    nested = Person("Bo", [Person("Cy", 1)] * 20)
    text = short_repr(nested)
    assert text.startswith("Person(name='Bo', age=[Person(name='Cy', age=1), ") and len(text) <= 200
    loop = Person("Di", None)
    loop.age = loop
    assert short_repr(loop).count("Person(") <= 5  # bounded depth, no recursion error
    assert short_repr(Person("x" * 5000, 1), limit=60).endswith("…")


def test_portable_objects_in_a_real_call_read_as_class_and_fields():
    feed = Feed()
    try:

        @server.portable_class
        class Pet:
            def __init__(self, name, age):
                self.name, self.age = name, age

        @server.callable
        def older(pet):
            pet.age += 1
            return pet

        assert server.call("older", Pet("Rex", 3)).age == 4
        served, made = feed.calls.rows(function="older")
        assert made.direction == "out" and served.direction == "in"
        for row in (made, served):
            assert (row.args, row.result) == ("Pet(name='Rex', age=3)", "Pet(name='Rex', age=4)")
        view = CallLog(feed)
        assert "Pet(name=&#x27;Rex&#x27;, age=3)" in view.table.value
    finally:
        feed.unsubscribe()


def boom(n):
    raise ValueError(f"kaboom {n}")  # the line the details show


def test_a_traceback_frame_shows_its_source_line():
    feed = Feed()
    try:
        server.callable(boom)
        with pytest.raises(ValueError):
            server.call("boom", 1)
        view = CallLog(feed)
        line = html.escape('raise ValueError(f"kaboom {n}")  # the line the details show')
        for row in feed.calls.rows(function="boom"):  # served here, and made from here
            view.choice.value = row.call_id
            detail = view.detail.value
            assert f"File &quot;{__file__}&quot;, line" in detail, detail
            assert line in detail, (row.direction, detail)
            assert "ValueError: kaboom 1" in detail
    finally:
        feed.unsubscribe()


def test_a_remote_trace_never_reads_a_file_it_merely_names(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    bus = EventBus()
    feed = Feed(bus=bus)
    view = CallLog(feed)
    for call_id, direction in (("c1", "out"), ("c2", "in")):
        bus.emit(CallStarted(time.time(), call_id, "f", None, (), True, None, direction=direction))
        bus.emit(
            CallFinished(
                time.time(), call_id, "f", 0.001, False, "ValueError", "no",
                direction=direction, trace=([str(secret), 1], "junk", [1]),
            )
        )  # fmt: skip
    view.refresh()
    view.choice.value = "c1"  # a remote trace: the file is not one this process runs
    assert f"{secret}&quot;, line 1" in view.detail.value
    assert "the secret" not in view.detail.value
    view.choice.value = "c2"  # a trace of this process: its files are this process's own
    assert "the secret" in view.detail.value


def test_the_call_log_wraps_long_text():
    bus = EventBus()
    feed = Feed(bus=bus)
    view = CallLog(feed)
    bus.emit(CallStarted(time.time(), "c1", "f", None, (), True, None, args=("x" * 5000,)))
    bus.emit(CallFinished(time.time(), "c1", "f", 0.001, True, result="y" * 5000))
    view.refresh()
    table = view.table.value
    assert "overflow-wrap:anywhere" in table
    # The long columns (call, client, task, outcome, output) may wrap; the short ones do not.
    assert table.count('<td class="wrap') == 5 and table.count('<td class="wrap wide">') == 2


# ---------------------------------------------------------------------------------------------
# Saved notebooks


def test_views_and_the_dashboard_read_as_one_line_without_widgets():
    bus = EventBus()
    feed = Feed(bus=bus)
    board = dashboard(feed)
    views = {
        "calls": CallLog(feed),
        "sessions": SessionInspector(feed),
        "caps": CapabilityStream(feed),
        "registry": Registry(feed),
    }
    bus.emit(CallStarted(time.time(), "c1", "f", None, (), True, "s1"))
    bus.emit(CallFinished(time.time(), "c1", "f", 0.001, False, "ValueError", "no"))
    bus.emit(CallStarted(time.time(), "c2", "g", None, (), True, "s1"))
    bundle = board._repr_mimebundle_()
    assert bundle["text/plain"] == (
        f"anvil_nb dashboard: 2 calls (1 error, 1 running), 0 sessions, 0 functions {LIVE}"
    )
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert repr(board) == bundle["text/plain"]
    texts = {name: v._repr_mimebundle_()["text/plain"] for name, v in views.items()}
    assert texts == {
        "calls": f"anvil_nb call log: 2 calls (1 error, 1 running) {LIVE}",
        "sessions": f"anvil_nb sessions: 0 sessions {LIVE}",
        "caps": f"anvil_nb capability updates: 0 updates in 0 scopes {LIVE}",
        "registry": f"anvil_nb registry: 0 functions, 0 portable classes {LIVE}",
    }


def test_flush_renders_pending_changes_at_once_and_only_once():
    renders = []
    throttle = Throttle(lambda: renders.append(1), interval=60)  # the timer would come late
    assert throttle.flush() is False  # nothing pending
    throttle.mark()
    throttle.mark()
    assert throttle.flush() is True and renders == [1]
    assert throttle.flush() is False and renders == [1]
    done = threading.Event()
    fast = Throttle(done.set, interval=0.01)
    fast.mark()
    assert done.wait(WAIT)  # after a flush the timer still serves the next change


def test_in_a_kernel_views_render_as_each_cell_ends(kernels: Kernels):
    """What nbclient stores as widget state: the updates a cell's run sent, with that cell."""
    k: Kernel = kernels.start("flush")
    k.run_ok("%load_ext anvil_nb")
    shown = k.run_ok("from anvil_nb.widgets import CallLog\nlog = CallLog(interval=600)\nlog")
    assert shown.displays[0]["text/plain"] == f"anvil_nb call log: 0 calls {LIVE}"
    model_id = shown.displays[0]["application/vnd.jupyter.widget-view+json"]["model_id"]
    table_id = k.value("result = log.table.model_id")
    assert model_id != table_id
    msg_id = k.send(
        "from anvil_nb import server\n"
        "server.callable('greet')(lambda who: 'hi ' + who)\n"
        "server.call('greet', 'ann')"
    )
    k.result(msg_id)
    updates = [
        m["content"]["data"]["state"]["value"]
        for m in k._iopub[msg_id]
        if m["msg_type"] == "comm_msg"
        and m["content"]["comm_id"] == table_id
        and "value" in m["content"]["data"].get("state", {})
    ]
    assert updates and 'data-function="greet"' in updates[-1]
    assert k.value("result = repr(log)") == f"anvil_nb call log: 2 calls {LIVE}"


# ---------------------------------------------------------------------------------------------
# In JupyterLab, in Debian's Chromium (the set-up is support/browser.py's)

TUTORIAL = Path(__file__).resolve().parents[1] / "notebooks" / "01-getting-started.ipynb"
REGENERATE = (
    "re-execute the tutorial with its widget state: cd notebooks && jupyter nbconvert --to "
    "notebook --execute --ExecutePreprocessor.store_widget_state=True --inplace " + TUTORIAL.name
)


@pytest.fixture
def wide_browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """Chromium as for test_browser, with a 1400 px wide window (and the Lab sidebar open)."""
    with chromium(tmp_path / "chromium-wide", width=1400, timeout=WAIT) as context:
        yield context


def test_in_jupyterlab_a_saved_tutorial_reads_and_the_call_log_fits(
    lab: JupyterLab,
    wide_browser: BrowserContext,
    tmp_path: Path,
):
    # The committed tutorial, reopened: untrusted, Lab shows the text/plain summary ...
    shutil.copy(TUTORIAL, lab.root / "untrusted.ipynb")
    shutil.copy(TUTORIAL, lab.root / "trusted.ipynb")
    page = wide_browser.new_page()
    try:
        page.goto(f"{lab.base}lab/tree/untrusted.ipynb?token={lab.token}")
        summary = page.locator(".jp-OutputArea-output", has_text="anvil_nb dashboard:")
        expect(summary).to_have_count(1, timeout=START_WAIT * 1000)
        expect(summary).to_contain_text(LIVE)
        expect(page.locator(".jp-OutputArea-output", has_text="Tab(children=")).to_have_count(0)

        # ... and trusted (as after "Trust Notebook"), the widget state saved with it.
        subprocess.run(
            [sys.executable, "-m", "jupyter", "trust", str(lab.root / "trusted.ipynb")],
            env=lab.env,
            capture_output=True,
            timeout=WAIT,
            check=True,
        )
        saved = wide_browser.new_page()
        saved.goto(f"{lab.base}lab/tree/trusted.ipynb?token={lab.token}")
        table = saved.locator("table.anvil-nb-calllog")
        try:
            expect(table).to_have_count(1, timeout=START_WAIT * 1000)
        except AssertionError as exc:
            raise AssertionError(f"no saved call log in {TUTORIAL.name}: {REGENERATE}") from exc
        expect(table.locator('tr.anvil-nb-call[data-function="greet"]')).to_have_count(2)
        expect(table).to_contain_text("birthday(Person(name='Ann', age=30))")
        saved.close()

        # Live, with long arguments and results: the call log wraps instead of running off.
        cells = [
            "%load_ext anvil_nb",
            "%anvil dashboard",
            '%%callable\ndef echo(*args):\n    return " ".join(str(a) for a in args) * 3',
            "from anvil_nb import server\n"
            "for i in range(3):\n"
            '    server.call("echo", "word " * 60, "x" * 400, list(range(50)))',
        ]
        page = wide_browser.new_page()
        open_and_run_notebook(page, lab, cells)
        rows = page.locator('tr.anvil-nb-call[data-function="echo"]')
        expect(rows).to_have_count(6)
        fit = page.evaluate(
            """() => {
              const table = document.querySelector('table.anvil-nb-calllog');
              const box = table.closest('.anvil-nb');
              const last = table.querySelector('tr th:last-child').getBoundingClientRect();
              return {scroll: box.scrollWidth, client: box.clientWidth,
                      last: last.right, right: box.getBoundingClientRect().right};
            }"""
        )
        assert fit["scroll"] <= fit["client"] + 1 and fit["last"] <= fit["right"] + 1, fit
        expect(rows.first).to_contain_text("echo('word word")
    except BaseException:
        with contextlib.suppress(Exception):  # kept out of the checkout
            page.screenshot(path=str(tmp_path / "failure.png"), timeout=5000)
        print(f"screenshot: {tmp_path / 'failure.png'}; jupyter lab log tail:\n{lab.log(3000)}")
        raise
    assert lab.stop() == 0, f"jupyter lab did not stop cleanly on SIGTERM:\n{lab.log()}"
