"""Live widgets: what the server side of this notebook (or any process) is doing, as it happens.

* :class:`CallLog`: calls served by and made from this kernel, and (for a trusted connection)
  the other calls of its app, with their CallContext;
* :class:`SessionInspector`: the sessions served, with the keys each call changed;
* :class:`CapabilityStream`: capability updates by scope, and their aggregate;
* :class:`Registry`: registered names and who provides them;
* :class:`TaskMonitor`: the app's background tasks, their state and progress, with a Kill
  button (polled: the host does not push task state);
* :func:`dashboard`: all five in tabs (``%anvil dashboard``).

They are fed by the process's bus (:data:`anvil_nb.runtime.events`): the host's stream of the
app, completed by what the process's own client did (whichever it is: a kernel's after
``%load_ext``, ``server.connect``'s, or the embedded host's of a plain script), pushed, never
polled (background tasks excepted: the host does not push their state, so one thread per
process polls them, see :mod:`anvil_nb.widgets.tasks`); they render at most every 100 ms (and
as each cell ends in a kernel), keep bounded ring buffers, and share one set of models per
process, so several dashboards agree. Saved without a widget frontend, each reads as a
one-line summary. Nothing in a widget can raise into a call.
"""

from __future__ import annotations

from anvil_nb.widgets.call_log import CallLog
from anvil_nb.widgets.capability_stream import CapabilityStream
from anvil_nb.widgets.dashboard import Dashboard, dashboard
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.registry import Registry
from anvil_nb.widgets.session_state import SessionInspector
from anvil_nb.widgets.tasks import TaskMonitor
from anvil_nb.widgets.view import flush

__all__ = [
    "CallLog",
    "CapabilityStream",
    "Dashboard",
    "Feed",
    "Registry",
    "SessionInspector",
    "TaskMonitor",
    "dashboard",
    "flush",
    "shared_feed",
]
