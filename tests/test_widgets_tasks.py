"""The Tasks view: TaskMonitor's rows, progress bars and Kill button, its shared poller, the
Dashboard's Tasks tab, and ``%anvil tasks`` in a real kernel.

Tasks run on an in-process host (as in ``test_tasks.py``): a provider serves them, a trusted
launcher is the process's client (``runtime.set_client``), so ``server.*`` and the monitors use
it. Tasks synchronise with the test through a ``threading.Event`` and their ``task_state``;
every wait has a deadline.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from support.kernels import Kernels
from support.waiting import wait_until

from anvil_nb import runtime, server
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.widgets import TaskMonitor, dashboard
from anvil_nb.widgets.dashboard import TITLES
from anvil_nb.widgets.tasks import (
    NOT_CONNECTED,
    UNTRUSTED,
    TaskPoller,
    TaskView,
    format_elapsed,
    progress_of,
    shared_poller,
    tasks_text,
)

WAIT = 10.0


def tasks_registry(gate: threading.Event) -> FunctionRegistry:
    registry = FunctionRegistry()

    def count_to(n: int) -> int:
        for i in range(n):
            server.task_state["progress"] = (i + 1) / n
        return n

    def wait_for_gate(percent: int) -> str:
        server.task_state["progress"] = percent  # over 1: a percentage
        server.task_state["step"] = "waiting"
        assert gate.wait(WAIT)
        return "opened"

    def spin() -> None:
        i = 0
        while True:  # a busy Python loop: only a kill ends it
            i += 1
            server.task_state["progress"] = 0.5
            server.task_state["i"] = i

    def fail() -> None:
        server.task_state["before"] = "the error"
        raise ValueError("the task failed")

    for fn in (count_to, wait_for_gate, spin, fail):
        registry.register("task:" + fn.__name__, fn)
    return registry


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()  # a task still waiting ends


@pytest.fixture
def app(gate: threading.Event) -> Iterator[HostThread]:
    """A host with a provider of the tasks; the process's client is a trusted launcher."""
    ht = HostThread(Host)
    provider = Client(ht.connect("uplink"), functions=tasks_registry(gate)).start()
    launcher = Client(ht.connect("server_module"), functions=FunctionRegistry()).start()
    runtime.set_client(launcher)
    try:
        yield ht
    finally:
        runtime.disconnect()
        provider.close()
        ht.stop()


@pytest.fixture
def monitors() -> Iterator[list[TaskMonitor]]:
    """Monitors a test makes; each is closed at the end (its polling stops)."""
    made: list[TaskMonitor] = []
    yield made
    for m in made:
        m.close()


def finished(task: Any) -> bool:
    return task.get_termination_status() is not None


def by_name(monitor: TaskMonitor) -> dict[str, TaskView]:
    return {v.name: v for v in monitor.model.rows()}


# ---------------------------------------------------------------------------------------------
# Pieces


def test_progress_is_a_fraction_a_percentage_or_nothing():
    assert progress_of({"progress": 0.25}) == 0.25
    assert progress_of({"progress": 40}) == 0.4  # over 1: a percentage
    assert progress_of({"progress": 250}) == 1.0  # clamped
    assert progress_of({"progress": -3}) == 0.0
    assert progress_of({"progress": 1}) == 1.0
    for state in ({"progress": True}, {"progress": "50%"}, {"progress": float("nan")},
                  {"other": 1}, [0.5], None, 0.5):  # fmt: skip
        assert progress_of(state) is None


def test_elapsed_times_read_naturally():
    assert format_elapsed(None) == "—"
    assert format_elapsed(0.26) == "0.3 s"
    assert format_elapsed(125) == "2 min 05 s"
    assert format_elapsed(3720) == "1 h 02 min"
    assert format_elapsed(2 * 86400 + 3 * 3600 + 5) == "2 d 3 h"
    view = TaskView("t1", "job", "running", started=100.0)
    assert view.elapsed(now=102.5) == 2.5
    ended = TaskView("t1", "job", "completed", started=100.0, ended=101.0)
    assert ended.elapsed(now=500.0) == 1.0
    assert TaskView("t1", "job", "completed", started=100.0).elapsed() is None  # end unknown


# ---------------------------------------------------------------------------------------------
# Rows


def test_rows_show_completed_failed_and_running_tasks_with_progress(app, gate, monitors):
    done = server.launch_background_task("count_to", 10)
    failed = server.launch_background_task("fail")
    wait_until(lambda: finished(done) and finished(failed), WAIT, "two tasks to end")
    running = server.launch_background_task("wait_for_gate", 25)
    wait_until(lambda: running.get_state().get("step"), WAIT, "the third task's state")

    monitor = TaskMonitor(interval=0.1, poller=TaskPoller())
    monitors.append(monitor)
    wait_until(lambda: len(monitor.model.rows()) == 3, WAIT, "three rows")
    assert [v.name for v in monitor.model.rows()] == ["wait_for_gate", "fail", "count_to"]
    rows = by_name(monitor)
    assert rows["count_to"].status == "completed"
    assert rows["count_to"].state == "{'progress': 1.0}" and rows["count_to"].progress == 1.0
    assert rows["fail"].status == "failed"
    assert rows["fail"].error == "ValueError: the task failed"
    assert rows["fail"].state == "{'before': 'the error'}" and rows["fail"].progress is None
    assert rows["wait_for_gate"].status == "running"
    assert rows["wait_for_gate"].progress == 0.25  # 25 is a percentage
    # seen finished already, served elsewhere: the end (so the elapsed time) is not known
    assert format_elapsed(rows["count_to"].elapsed()) == "—"

    monitor.refresh()
    widgets = {v.name: monitor._rows[v.task_id] for v in monitor.model.rows()}
    bar = widgets["wait_for_gate"].progress
    assert (bar.value, bar.layout.visibility) == (0.25, "visible")
    assert widgets["count_to"].progress.value == 1.0
    assert widgets["fail"].progress.layout.visibility == "hidden"
    assert widgets["wait_for_gate"].kill.layout.visibility == "visible"
    assert widgets["count_to"].kill.layout.visibility == "hidden"
    assert "the task failed" in widgets["fail"].state.value
    assert "running" in widgets["wait_for_gate"].status.value

    line = repr(monitor)
    assert line.startswith("anvil_nb tasks: 3 tasks (1 running, 1 failed)"), line
    assert monitor._repr_mimebundle_()["text/plain"] == line

    gate.set()
    wait_until(lambda: by_name(monitor)["wait_for_gate"].status == "completed", WAIT, "completed")
    view = by_name(monitor)["wait_for_gate"]
    assert view.ended is not None  # seen running, then finished: elapsed stops there
    assert view.elapsed(now=view.ended + 100) == view.elapsed()
    monitor.refresh()
    assert monitor._rows[view.task_id].kill.layout.visibility == "hidden"


def test_the_kill_button_kills_a_running_task(app, monitors):
    task = server.launch_background_task("spin")
    wait_until(lambda: task.get_state().get("i", 0) > 100, WAIT, "the task to spin")
    monitor = TaskMonitor(interval=0.1, poller=TaskPoller())
    monitors.append(monitor)
    wait_until(lambda: "spin" in by_name(monitor), WAIT, "the task's row")
    task_id = by_name(monitor)["spin"].task_id
    assert by_name(monitor)["spin"].progress == 0.5
    monitor.refresh()
    button = monitor._rows[task_id].kill
    assert button.layout.visibility == "visible"

    button.click()
    wait_until(lambda: by_name(monitor)["spin"].status == "killed", WAIT, "the row to say killed")
    assert task.get_termination_status() == "killed"
    monitor.refresh()
    assert button.layout.visibility == "hidden"
    assert by_name(monitor)["spin"].ended is not None


def test_a_failing_kill_is_shown_in_its_row_and_never_raised(app, gate, monitors):
    server.launch_background_task("wait_for_gate", 10)
    poller = TaskPoller()
    monitor = TaskMonitor(interval=0.1, poller=poller)
    monitors.append(monitor)
    wait_until(lambda: "wait_for_gate" in by_name(monitor), WAIT, "the task's row")
    task_id = by_name(monitor)["wait_for_gate"].task_id

    class Refusing:
        def kill(self):
            raise PermissionError("not today")

    with poller._poll_lock:  # as if the last poll had read this object
        poller.model.update(task_id, task=Refusing())
    thread = poller.kill(task_id)
    assert thread is not None
    thread.join(WAIT)
    assert by_name(monitor)["wait_for_gate"].error == "kill failed: PermissionError: not today"
    assert by_name(monitor)["wait_for_gate"].status == "running"
    assert poller.kill("t-no-such-task") is None


# ---------------------------------------------------------------------------------------------
# Polling


def test_one_poller_serves_every_monitor_at_most_once_per_interval_and_stops_with_the_last(app):
    poller = TaskPoller()
    made = [TaskMonitor(interval=0.2, poller=poller) for _ in range(3)]
    try:
        assert poller.running
        assert len([t for t in threading.enumerate() if t.name == "anvil_nb-taskmonitor"]) >= 1
        start = poller.model.polls
        wait_until(lambda: poller.model.polls >= start + 4, WAIT, "four more polls")
        times = list(poller.model.poll_times)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert gaps and min(gaps) >= 0.2, gaps  # three monitors, one poll per interval
        for m in made[:-1]:
            m.close()
        assert poller.running
    finally:
        for m in made:
            m.close()
    wait_until(lambda: not poller.running, WAIT, "the poller to stop with its last monitor")
    polls = poller.model.polls
    assert poller.model.polls == polls  # nothing polls any more
    # a new monitor starts it again
    again = TaskMonitor(interval=0.1, poller=poller)
    try:
        assert poller.running
    finally:
        again.close()
    wait_until(lambda: not poller.running, WAIT, "the poller to stop again")


def test_monitors_share_the_process_s_poller_and_its_model():
    one, two = TaskMonitor(), TaskMonitor()
    try:
        assert one.poller is two.poller is shared_poller()
        assert one.model is two.model
    finally:
        one.close()
        two.close()


def test_without_a_connection_nothing_is_polled_and_a_note_says_so(monitors):
    runtime.disconnect()
    monitor = TaskMonitor(poller=TaskPoller())
    monitors.append(monitor)
    assert runtime.current_client(start=False) is None  # no embedded host was started for it
    assert monitor.model.note == NOT_CONNECTED
    assert NOT_CONNECTED in monitor.note.value
    assert repr(monitor).startswith(f"anvil_nb tasks: {NOT_CONNECTED} (live view")
    assert tasks_text(monitor.poller) == f"anvil_nb: {NOT_CONNECTED}"


def test_an_untrusted_connection_is_not_polled(gate):
    ht = HostThread(Host)
    browser = Client(ht.connect("browser"), functions=FunctionRegistry()).start()
    calls: list[str] = []
    real_call = browser.call

    def counting(command, *args, **kwargs):
        calls.append(command)
        return real_call(command, *args, **kwargs)

    browser.call = counting  # type: ignore[method-assign]
    poller = TaskPoller(client=lambda: browser)
    monitor = TaskMonitor(interval=0.05, poller=poller)
    try:
        start = poller.model.polls
        wait_until(lambda: poller.model.polls >= start + 2, WAIT, "two polls")
        assert poller.model.note == UNTRUSTED
        assert calls == []  # it did not even ask
        assert "not trusted" in monitor.summary()
    finally:
        monitor.close()
        browser.close()
        ht.stop()


def test_tasks_text_prints_one_line_per_task(app):
    poller = TaskPoller()
    assert tasks_text(poller) == "no background tasks"
    task = server.launch_background_task("count_to", 4)
    wait_until(lambda: finished(task), WAIT, "the task to end")
    failed = server.launch_background_task("fail")
    wait_until(lambda: finished(failed), WAIT, "the task to fail")
    lines = tasks_text(poller).splitlines()
    assert lines == [
        "fail      failed     —  {'before': 'the error'}  ValueError: the task failed",
        "count_to  completed  —  {'progress': 1.0}",
    ]


# ---------------------------------------------------------------------------------------------
# The dashboard


def test_the_dashboard_has_a_tasks_tab_that_stops_polling_when_it_closes(app):
    board = dashboard()
    try:
        assert board.titles == TITLES and TITLES[-1] == "Tasks"
        assert isinstance(board.tasks, TaskMonitor)
        assert board.tasks.poller is shared_poller()
        assert shared_poller().running
        task = server.launch_background_task("count_to", 2)
        wait_until(lambda: finished(task), WAIT, "the task to end")
        wait_until(lambda: board.tasks.model.total == 1, WAIT, "the Tasks tab to see it")
        assert ", 1 task (live view" in repr(board)
    finally:
        board.close()
    assert board.tasks._closed
    assert board.tasks not in shared_poller()._monitors


# ---------------------------------------------------------------------------------------------
# %anvil tasks in a real kernel

TASK_CELL = """%%callable
from anvil_nb import server

@server.background_task
def k_count_to(n):
    for i in range(n):
        server.task_state["progress"] = (i + 1) / n
    return n
"""


def test_anvil_tasks_in_a_kernel(kernels: Kernels):
    kernel = kernels.start("tasks")
    kernel.load()
    assert kernel.run_ok("%anvil tasks").stdout == "no background tasks\n"
    kernel.run_ok(TASK_CELL)
    status = kernel.value(
        "import time\n"
        "t = server.launch_background_task('k_count_to', 3)\n"
        "deadline = time.monotonic() + 10\n"
        "while t.get_termination_status() is None:\n"
        "    assert time.monotonic() < deadline\n"
        "    time.sleep(0.02)\n"
        "result = t.get_termination_status()"
    )
    assert status == "completed"
    out = kernel.run_ok("%anvil tasks").stdout
    # served by this kernel: its call log knows when the task ended
    assert re.fullmatch(r"k_count_to  completed  \d+\.\d s  \{'progress': 1\.0\}\n", out), out
    # an unknown subcommand still says what the choices are
    res = kernel.run("%anvil nonsense")
    assert res.status == "error" and "'tasks'" in res.stderr, res
