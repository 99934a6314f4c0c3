"""The dashboard: the live views in tabs (``%anvil dashboard``)."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb.widgets import render
from anvil_nb.widgets.call_log import CallLog
from anvil_nb.widgets.capability_stream import CapabilityStream
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.registry import Registry, function_names
from anvil_nb.widgets.session_state import SessionInspector
from anvil_nb.widgets.tasks import TaskMonitor, tasks_summary
from anvil_nb.widgets.view import LIVE, plain_bundle

__all__ = ["TITLES", "Dashboard", "dashboard"]

TITLES = ("Calls", "Sessions", "Capabilities", "Registry", "Tasks")


class Dashboard(W.Tab):
    """Calls, sessions, capability streams and the registry of *feed*, and the app's
    background tasks, live, in tabs.

    Without a widget frontend it reads as one line, e.g. ``anvil_nb dashboard: 3 calls,
    1 session, 2 functions (live view: run the cell in a kernel)`` (and ``, 2 tasks
    (1 running)`` when the Tasks tab has seen some). :meth:`close` closes the tabs too (the
    Tasks tab stops polling).
    """

    def __init__(self, feed: Feed | None = None, **kwargs: Any):
        self.feed = feed or shared_feed()
        super().__init__(
            children=[
                CallLog(self.feed),
                SessionInspector(self.feed),
                CapabilityStream(self.feed),
                Registry(self.feed),
                TaskMonitor(),
            ],
            **kwargs,
        )
        self.titles = TITLES

    @property
    def tasks(self) -> TaskMonitor:
        """The Tasks tab."""
        return self.children[TITLES.index("Tasks")]

    def summary(self) -> str:
        """``anvil_nb dashboard: 3 calls, 1 session, 2 functions`` (``, 2 tasks`` if any)."""
        feed = self.feed
        tasks = self.tasks.model  # what the last poll saw: no call here
        return (
            f"anvil_nb dashboard: {render.call_summary(feed.calls)}, "
            f"{render.plural(len(feed.sessions.sessions()), 'session')}, "
            f"{render.plural(len(function_names(feed)), 'function')}"
            + (f", {tasks_summary(tasks)}" if tasks.total else "")
        )

    def close(self) -> None:
        """Close the dashboard and its tabs (the Tasks tab stops polling)."""
        for child in self.children:
            child.close()
        super().close()

    def __repr__(self) -> str:
        try:
            return f"{self.summary()} {LIVE}"
        except Exception:  # a repr must not raise
            return f"anvil_nb dashboard {LIVE}"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return plain_bundle(self, repr(self), **kwargs)


def dashboard(feed: Feed | None = None) -> Dashboard:
    """Calls, sessions, capability streams, the registry and background tasks, live, in one
    Tab widget.
    """
    return Dashboard(feed)
