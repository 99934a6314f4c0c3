"""TaskMonitor: the app's background tasks, live: name, status, elapsed time and ``task_state``
(with a progress bar when it holds a numeric ``progress``), and a Kill button for running tasks.

The host does not push task state, so tasks are **polled**: one daemon thread per process
(:func:`shared_poller`) lists the app's tasks every ``interval`` seconds while at least one
monitor is open, however many there are, and stops when the last one is closed. A poll reads
what it does not know yet: a finished task is final, so it is read once; a running one costs
two calls (its status and its state) per poll, and only the newest :data:`MAX_ROWS` are read.
Only a trusted connection (a kernel after ``%load_ext anvil_nb``, a script with the server key,
the embedded host's own client) may list tasks; with no connection, or an untrusted one, the
monitor shows a one-line note and nothing is polled.

Elapsed time runs from the task's start to now, or to its end once it finished. The host's
task objects do not give the end time: it is the end of the call when this process served the
task (its call log has it), else the first poll that saw the task finished after seeing it run;
a task that had already finished when first seen shows ``—``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ipywidgets as W

from anvil_nb import runtime
from anvil_nb.client.client import Client
from anvil_nb.core.events import Event
from anvil_nb.widgets import feed as feed_module
from anvil_nb.widgets import render
from anvil_nb.widgets.models import Model, short_repr
from anvil_nb.widgets.view import LiveView

__all__ = [
    "DEFAULT_INTERVAL",
    "MAX_ROWS",
    "TaskModel",
    "TaskMonitor",
    "TaskPoller",
    "TaskView",
    "format_elapsed",
    "progress_of",
    "shared_poller",
    "tasks_summary",
    "tasks_text",
]

log = logging.getLogger("anvil_nb.widgets")

#: Seconds between two polls (the default of ``TaskMonitor(interval=...)``).
DEFAULT_INTERVAL = 0.5
#: The shortest interval a monitor may ask for.
MIN_INTERVAL = 0.05
#: How many tasks (the newest) a poll reads and a monitor shows.
MAX_ROWS = 50
#: How long a new monitor waits for the first poll of a poller it started, at most.
FIRST_POLL_WAIT = 1.0
#: The longest repr of a task's state.
STATE_REPR = 120

LIST = "anvil.private.background_tasks.list"
#: Caller types that may list background tasks.
_TRUSTED = frozenset({"server_module", "uplink"})

NOT_CONNECTED = "not connected to a host: no background tasks to show"
UNTRUSTED = "this connection is not trusted (a client key): it may not list background tasks"
RECONNECTING = "reconnecting to the host…"


# ---------------------------------------------------------------------------------------------
# What is shown, as plain data


@dataclass(frozen=True)
class TaskView:
    """One task as the monitor shows it (reprs, never the values themselves)."""

    task_id: str
    name: str
    #: ``running``, ``completed``, ``failed``, ``killed`` or ``missing``.
    status: str
    #: Wall-clock times (``time.time()``); ``ended`` is None while running or when unknown.
    started: float | None
    ended: float | None = None
    state: str = ""
    #: 0..1 when the state has a numeric ``progress``, else None.
    progress: float | None = None
    #: A failed task's error, or what went wrong killing or reading it.
    error: str = ""
    #: Whether a poll saw it running (then its end is the first poll that saw it finished).
    seen_running: bool = False
    #: The task's live object (for ``kill``).
    task: Any = field(default=None, repr=False, compare=False)

    @property
    def running(self) -> bool:
        """Whether the task has not ended."""
        return self.status == "running"

    def elapsed(self, now: float | None = None) -> float | None:
        """Seconds from its start to *now* (running) or to its end; None when not known."""
        if self.started is None:
            return None
        end = (time.time() if now is None else now) if self.running else self.ended
        return None if end is None else max(0.0, end - self.started)


def progress_of(state: Any) -> float | None:
    """The ``progress`` of a task state as 0..1 (a value over 1 is a percentage), or None."""
    value = state.get("progress") if isinstance(state, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    if value > 1.0:
        value /= 100.0
    return min(1.0, max(0.0, value))


def format_elapsed(seconds: float | None) -> str:
    """``0.3 s``, ``2 min 05 s``, ``1 h 02 min``, ``3 d 4 h``; ``—`` when not known."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


class TaskModel(Model):
    """The tasks of the app, newest first, as the last poll saw them, and a note (why there
    are none to show: no connection, an untrusted one, an error). Filled by a :class:`TaskPoller`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._views: list[TaskView] = []
        self.note = ""
        #: How many tasks the host listed (more than are shown when over :data:`MAX_ROWS`).
        self.total = 0
        self.polls = 0
        #: When the last polls started (``time.monotonic()``).
        self.poll_times: deque[float] = deque(maxlen=100)

    def _apply(self, event: Event) -> bool:  # noqa: ARG002 - polled, not fed by events
        return False

    def load(self, views: list[TaskView], total: int, note: str = "") -> None:
        """Replace the tasks (listeners hear of it when something changed or one runs)."""
        with self._lock:
            same = (views, total, note) == (self._views, self.total, self.note)
            self._views, self.total, self.note = list(views), total, note
            if not same or any(v.running for v in views):  # a running task's elapsed time moves
                self._changed()

    def set_note(self, note: str) -> None:
        """Say *note*, keeping the tasks shown."""
        with self._lock:
            if note != self.note:
                self.note = note
                self._changed()

    def update(self, task_id: str, **changes: Any) -> TaskView | None:
        """Change fields of one task's view (after a kill); the new view, or None if gone."""
        with self._lock:
            for i, view in enumerate(self._views):
                if view.task_id == task_id:
                    self._views[i] = new = dataclasses.replace(view, **changes)
                    self._changed()
                    return new
        return None

    def rows(self) -> list[TaskView]:
        """The tasks, newest first."""
        with self._lock:
            return list(self._views)

    def get(self, task_id: str) -> TaskView | None:
        """One task by id."""
        with self._lock:
            return next((v for v in self._views if v.task_id == task_id), None)


def tasks_summary(model: TaskModel) -> str:
    """``3 tasks (1 running, 1 failed)``, or the model's note when it shows no tasks."""
    rows = model.rows()
    if model.note and not rows:
        return model.note
    counts: dict[str, int] = {}
    for v in rows:
        if v.status != "completed":
            counts[v.status] = counts.get(v.status, 0) + 1
    detail = ", ".join(f"{n} {status}" for status, n in counts.items())
    return render.plural(model.total, "task") + (f" ({detail})" if detail else "")


# ---------------------------------------------------------------------------------------------
# Polling


def _timestamp(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, dt.datetime) else None


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:299] + "…"


def _served_end(task_id: str) -> float | None:
    """When this process finished serving *task_id*, from its call log (None if it did not)."""
    feed = feed_module._feed  # only if the process has one: never made just for this
    if feed is None:
        return None
    for call in feed.calls.rows():
        if call.task_id == task_id and call.direction == "in" and call.duration is not None:
            return call.time + call.duration
    return None


class TaskPoller:
    """Reads the app's tasks into :attr:`model`: on a daemon thread while monitors are
    attached (at most once per the smallest interval they ask for), or once with :meth:`poll`.

    Parameters
    ----------
    client : callable, optional
        Returns the connection to read through, or None (default: this process's, never
        starting an embedded host).
    limit : int
        How many tasks (the newest) a poll reads.
    """

    def __init__(self, client: Callable[[], Client | None] | None = None, limit: int = MAX_ROWS):
        self.model = TaskModel()
        self.limit = limit
        self._client = client or (lambda: runtime.current_client(start=False))
        self._monitors: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._polled = threading.Condition()
        self._poll_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._for: weakref.ref[Client] | None = None
        self._known: dict[str, TaskView] = {}

    # -- the thread ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether the polling thread runs."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def attach(self, monitor: Any) -> bool:
        """Poll for *monitor* (its ``poll_interval``) until :meth:`detach`; whether this started
        the thread.
        """
        with self._lock:
            self._monitors.add(monitor)
            self._wake.notify_all()  # a shorter interval applies from now on
            if self._thread is not None:
                return False
            thread = self._thread = threading.Thread(
                target=self._run, name="anvil_nb-taskmonitor", daemon=True
            )
        thread.start()
        return True

    def detach(self, monitor: Any) -> None:
        """Stop polling for *monitor*; the thread ends with the last one."""
        with self._lock:
            self._monitors.discard(monitor)
            self._wake.notify_all()

    def wait_for_poll(self, after: int, timeout: float) -> bool:
        """Wait until more than *after* polls are done, at most *timeout* s; whether they are."""
        with self._polled:
            return self._polled.wait_for(lambda: self.model.polls > after, timeout)

    def _interval(self) -> float:
        intervals = [getattr(m, "poll_interval", DEFAULT_INTERVAL) for m in self._monitors]
        return max(MIN_INTERVAL, min(intervals, default=DEFAULT_INTERVAL))

    def _run(self) -> None:
        last: float | None = None
        while True:
            with self._lock:
                while True:
                    if not self._monitors:
                        self._thread = None
                        return
                    if last is None:
                        break
                    wait = last + self._interval() - time.monotonic()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
            last = time.monotonic()
            self.poll(last)

    # -- one poll ------------------------------------------------------------------------------
    def poll(self, started: float | None = None) -> None:
        """Read the tasks now (never raises: what goes wrong is the model's note).

        *started*: when the poll was due to start (``time.monotonic()``; default: now).
        """
        with self._poll_lock:
            self.model.poll_times.append(time.monotonic() if started is None else started)
            try:
                self._poll()
            except Exception as exc:  # the host went away mid-poll, refused, ...
                log.debug("anvil_nb: polling background tasks failed", exc_info=True)
                self.model.set_note(f"could not read the tasks: {_error_text(exc)}")
            with self._polled:
                self.model.polls += 1
                self._polled.notify_all()

    def _poll(self) -> None:
        client = self._client()
        if client is None or self._for is None or self._for() is not client:
            self._known = {}  # another connection (maybe another host): start afresh
            self._for = weakref.ref(client) if client is not None else None
        if client is None or client.closed:
            self.model.load([], 0, NOT_CONNECTED)
            return
        if client.own_type not in _TRUSTED:
            self.model.load([], 0, UNTRUSTED)
            return
        if not client.connected:
            self.model.set_note(RECONNECTING)
            return
        tasks = list(client.call(LIST) or [])
        views = []
        for task in tasks[: self.limit]:
            view = self._read(task)
            if view is not None:
                views.append(view)
        self._known = {v.task_id: v for v in views}
        self.model.load(views, len(tasks), "")

    def _read(self, task: Any) -> TaskView | None:
        """What *task* is now: only what can still change is asked for."""
        try:
            task_id = str(task.get_id())
        except Exception:  # not a task object after all
            return None
        old = self._known.get(task_id)
        if old is not None and not old.running:
            return old  # finished: final
        try:
            view = old or TaskView(
                task_id, str(task.get_task_name()), "running", _timestamp(task.get_start_time())
            )
            status = task.get_termination_status()
            state = task.get_state()
        except Exception as exc:  # gone meanwhile (pruned), or its provider does not answer
            return dataclasses.replace(old, error=_error_text(exc)) if old is not None else None
        view = dataclasses.replace(
            view,
            task=task,
            state=short_repr(state, STATE_REPR),
            progress=progress_of(state),
            status=status or "running",
            seen_running=view.seen_running or status is None,
        )
        return self._finished(view, task) if status is not None else view

    def _finished(self, view: TaskView, task: Any) -> TaskView:
        ended = _served_end(view.task_id)
        if ended is None and view.seen_running:
            ended = time.time()  # first seen finished now: elapsed stops here
        error = view.error
        if view.status == "failed":
            try:
                task.get_error()  # a failed task's error is raised by it
            except Exception as exc:
                error = _error_text(exc)
        return dataclasses.replace(view, ended=ended, error=error)

    # -- kill ----------------------------------------------------------------------------------
    def kill(self, task_id: str) -> threading.Thread | None:
        """Kill a running task on a thread of its own (returned); its row says how it went."""
        view = self.model.get(task_id)
        if view is None or view.task is None or not view.running:
            return None
        thread = threading.Thread(
            target=self._kill, args=(view,), name="anvil_nb-taskmonitor-kill", daemon=True
        )
        thread.start()
        return thread

    def _kill(self, view: TaskView) -> None:
        try:
            view.task.kill()
            status = view.task.get_termination_status() or "running"
            changes: dict[str, Any] = {"status": status, "error": ""}
            if status != "running":
                changes["ended"] = _served_end(view.task_id) or time.time()
        except Exception as exc:  # untrusted, gone, disconnected: said in the row
            changes = {"error": f"kill failed: {_error_text(exc)}"}
        with self._poll_lock:  # not overwritten by a poll that read the task before the kill
            new = self.model.update(view.task_id, **changes)
            if new is not None and view.task_id in self._known:
                self._known[view.task_id] = new


_lock = threading.Lock()
_poller: TaskPoller | None = None


def shared_poller() -> TaskPoller:
    """The process's poller (one thread, however many monitors), created on first use."""
    global _poller
    with _lock:
        if _poller is None:
            _poller = TaskPoller()
        return _poller


def tasks_text(poller: TaskPoller | None = None) -> str:
    """``%anvil tasks``: one line per task, ``NAME  STATUS  ELAPSED  STATE``, after one poll."""
    poller = poller or shared_poller()
    poller.poll()
    model = poller.model
    rows = model.rows()
    if model.note and not rows:
        return f"anvil_nb: {model.note}"
    if not rows:
        return "no background tasks"
    now = time.time()
    table = [
        (v.name, v.status, format_elapsed(v.elapsed(now)), v.state, f"  {v.error}" * bool(v.error))
        for v in rows
    ]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + f"  {r[3]}{r[4]}" for r in table]
    if model.total > len(rows):
        lines.append(f"… and {model.total - len(rows)} older (the newest {len(rows)} are shown)")
    if model.note:
        lines.append(f"anvil_nb: {model.note}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The widget

_STATUS_COLOURS = {
    "running": "#0b62a4",
    "completed": "#1a7f37",
    "failed": "#b00020",
    "killed": "#9a6700",
    "missing": "#9a6700",
}
_CELL = "font-size:12px;font-family:var(--jp-code-font-family,monospace);line-height:1.4"
_WIDTHS = {"name": "14em", "status": "7em", "elapsed": "7em", "progress": "10em", "kill": "5em"}
_HEADER = (
    ("task", _WIDTHS["name"]), ("status", _WIDTHS["status"]), ("elapsed", _WIDTHS["elapsed"]),
    ("progress", _WIDTHS["progress"]), ("task_state", "auto"),
)  # fmt: skip


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(text: str, cls: str = "", colour: str = "") -> str:
    style = _CELL + (f";color:{colour}" if colour else "")
    return f'<div class="anvil-nb {cls}" style="{style};overflow-wrap:anywhere">{text}</div>'


class _Row:
    """The widgets of one task's row."""

    def __init__(self, task_id: str, on_kill: Callable[[str], None]):
        self.task_id = task_id
        self.name = W.HTML(layout=W.Layout(width=_WIDTHS["name"]))
        self.status = W.HTML(layout=W.Layout(width=_WIDTHS["status"]))
        self.elapsed = W.HTML(layout=W.Layout(width=_WIDTHS["elapsed"]))
        self.progress = W.FloatProgress(
            value=0.0, min=0.0, max=1.0, layout=W.Layout(width=_WIDTHS["progress"])
        )
        self.state = W.HTML(layout=W.Layout(flex="1 1 auto", min_width="8em"))
        self.kill = W.Button(
            description="Kill",
            button_style="danger",
            tooltip="Kill this task",
            layout=W.Layout(width=_WIDTHS["kill"]),
        )
        self.kill.on_click(lambda _button: on_kill(task_id))
        self.box = W.HBox(
            [self.name, self.status, self.elapsed, self.progress, self.state, self.kill],
            layout=W.Layout(align_items="center", border_bottom="1px solid #ddd"),
        )
        self.box.add_class("anvil-nb-task")

    def show(self, view: TaskView, now: float) -> None:
        self.name.value = _cell(f"<b>{_e(view.name)}</b>", "anvil-nb-task-name")
        colour = _STATUS_COLOURS.get(view.status, "")
        self.status.value = _cell(_e(view.status), "anvil-nb-task-status", colour)
        self.elapsed.value = _cell(_e(format_elapsed(view.elapsed(now))))
        if view.progress is not None:
            self.progress.value = view.progress
        self.progress.layout.visibility = "visible" if view.progress is not None else "hidden"
        error = f'<br><span style="color:#b00020">{_e(view.error)}</span>' if view.error else ""
        self.state.value = _cell(_e(view.state) + error, "anvil-nb-task-state")
        self.kill.layout.visibility = "visible" if view.running else "hidden"
        if not view.running or view.error:
            self.kill.disabled, self.kill.description = False, "Kill"

    def killing(self) -> None:
        self.kill.disabled, self.kill.description = True, "Killing…"

    def close(self) -> None:
        for w in (self.name, self.status, self.elapsed, self.progress, self.state, self.kill):
            w.close()
        self.box.close()


class TaskMonitor(LiveView):
    """The app's background tasks, newest first: name, status, elapsed time, live
    ``task_state`` (a progress bar when it has a numeric ``progress``: 0..1, or a percentage
    when over 1), and a Kill button for running tasks.

    Parameters
    ----------
    interval : float
        Seconds between two polls of the host (one poller per process serves every monitor,
        at the smallest interval they ask for).
    limit : int
        How many tasks the monitor shows (the newest).
    poller : TaskPoller, optional
        Where the tasks come from (default: this process's, :func:`shared_poller`).

    Without a widget frontend it reads as one line, e.g. ``anvil_nb tasks: 3 tasks
    (1 running) (live view: run the cell in a kernel)``. :meth:`close` stops its polling.
    """

    def __init__(
        self,
        interval: float = DEFAULT_INTERVAL,
        limit: int = MAX_ROWS,
        poller: TaskPoller | None = None,
        **kwargs: Any,
    ):
        self.poller = poller or shared_poller()
        self.poll_interval = max(MIN_INTERVAL, float(interval))
        self.limit = limit
        self._closed = False
        self._rows: dict[str, _Row] = {}
        self.note = W.HTML()
        self.header = W.HBox(
            [
                W.HTML(_cell(f"<b>{_e(title)}</b>"), layout=W.Layout(width=width))
                for title, width in _HEADER
            ],
            layout=W.Layout(border_bottom="1px solid #aaa"),
        )
        self.table = W.VBox()
        super().__init__(self.poller.model, 0.1, children=[self.note, self.table], **kwargs)
        self.add_class("anvil-nb-tasks")
        polls = self.poller.model.polls
        if self.poller.attach(self):  # a fresh poller: its first look, if it is quick
            self.poller.wait_for_poll(polls, min(FIRST_POLL_WAIT, self.poll_interval * 2))
        self.refresh()

    def render(self) -> None:
        """Update the rows from the model (row widgets are kept per task, not remade)."""
        if self._closed:
            return
        model = self.model
        views = model.rows()[: self.limit]
        now = time.time()
        rows: dict[str, _Row] = {}
        for view in views:
            row = self._rows.get(view.task_id) or _Row(view.task_id, self._on_kill)
            row.show(view, now)
            rows[view.task_id] = row
        for task_id in self._rows.keys() - rows.keys():
            self._rows[task_id].close()
        self._rows = rows
        children = (self.header, *(r.box for r in rows.values())) if rows else ()
        if tuple(self.table.children) != children:
            self.table.children = children
        self.note.value = self._note(model, len(views))

    def _note(self, model: TaskModel, shown: int) -> str:
        if model.note:
            text = model.note
        elif not shown:
            text = "No background tasks." if model.polls else "Reading the tasks…"
        else:
            more = f", the newest {shown} shown" if model.total > shown else ""
            text = f"{tasks_summary(model)}{more}; polled every {self.poll_interval:g} s"
        return _cell(_e(text), "muted", "#888")

    def _on_kill(self, task_id: str) -> None:
        """The Kill button: kill on a thread of its own (never blocks, never raises)."""
        try:
            if self.poller.kill(task_id) is not None:
                row = self._rows.get(task_id)
                if row is not None:
                    row.killing()
        except Exception:  # pragma: no cover - kill() starts a thread and catches the rest
            log.exception("anvil_nb: killing task %s failed", task_id)

    def summary(self) -> str:
        """``anvil_nb tasks: 3 tasks (1 running)``."""
        return f"anvil_nb tasks: {tasks_summary(self.model)}"

    def close(self) -> None:
        """Close the widget and stop polling for it."""
        self._closed = True
        self.poller.detach(self)
        with self._render_lock:
            for row in self._rows.values():
                row.close()
            self._rows = {}
        for w in (*self.header.children, self.header, self.note, self.table):
            w.close()
        super().close()
