"""Live widgets: what the server side of this notebook is doing, as it happens.

* :class:`CallLog`: calls served by and made from this kernel, with their CallContext;
* :class:`SessionInspector`: the sessions served, with the keys each call changed;
* :class:`CapabilityStream`: capability updates by scope, and their aggregate;
* :class:`Registry`: registered names and who provides them;
* :func:`dashboard`: all four in tabs (``%anvil dashboard``).

They are fed by the kernel's events (pushed, never polled), render at most every 100 ms, keep
bounded ring buffers, and share one set of models per kernel, so several dashboards agree.
Nothing in a widget can raise into a call.
"""

from __future__ import annotations

from anvil_nb.widgets.call_log import CallLog
from anvil_nb.widgets.capability_stream import CapabilityStream
from anvil_nb.widgets.dashboard import dashboard
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.registry import Registry
from anvil_nb.widgets.session_state import SessionInspector

__all__ = [
    "CallLog",
    "CapabilityStream",
    "Feed",
    "Registry",
    "SessionInspector",
    "dashboard",
    "shared_feed",
]
