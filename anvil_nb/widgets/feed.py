"""The feed: one set of models per process, fed by the process's bus (:data:`anvil_nb.runtime.events`).

Every view of a process renders from the same models, so several dashboards in one notebook
always agree. The feed subscribes once, to the process's bus, which carries the host's stream of
the app (what other connections did) and what this process's own client did, whichever client
the process uses: a kernel's (``%load_ext``, across reconnections and ``%anvil connect``),
``server.connect``'s, or the embedded host's of a plain script. The views keep working
whichever host that is.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from anvil_nb import runtime
from anvil_nb.core.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    Event,
    EventBus,
    RegistrationChanged,
    RegistrySnapshot,
    SessionChanged,
)
from anvil_nb.widgets.models import (
    CallLogModel,
    CapabilityModel,
    Model,
    RegistryModel,
    SessionModel,
)

__all__ = ["Feed", "shared_feed"]


class Feed:
    """The models the widgets show, and the subscription that fills them.

    Parameters
    ----------
    bus : EventBus, optional
        Where events come from (default: the process's bus, :data:`anvil_nb.runtime.events`).
    maxlen : int
        How many calls the call log keeps.
    me : str
        How the views name this process: "this kernel" (the default) or "this process".
    """

    def __init__(self, bus: EventBus | None = None, maxlen: int = 500, me: str = "this kernel"):
        self.me = me
        self.calls = CallLogModel(maxlen, me=me)
        self.sessions = SessionModel()
        self.capabilities = CapabilityModel()
        self.registry = RegistryModel()
        #: Which model takes each kind of event (the others would only ignore it).
        self._models: dict[type[Event], Model] = {
            CallStarted: self.calls,
            CallFinished: self.calls,
            SessionChanged: self.sessions,
            CapabilityUpdated: self.capabilities,
            RegistrationChanged: self.registry,
        }
        self.unsubscribe = (bus or runtime.events).subscribe(self.apply)

    def apply(self, event: Event) -> None:
        """Give an event to the model it concerns (called on whichever thread emitted it)."""
        model = self._models.get(type(event))
        if model is not None:
            model.apply(event)
        elif isinstance(event, RegistrySnapshot):
            self.registry.load(event.registrations)


_lock = threading.Lock()
_feed: Feed | None = None


def _in_kernel() -> bool:
    """Whether this process is an IPython kernel (without importing IPython when it is not)."""
    ipython: Any = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def shared_feed() -> Feed:
    """The process's feed, created on first use (and seeded with the host's registrations).

    Under ``%load_ext anvil_nb`` it is created as the kernel joins, so it holds everything
    since then; in any other process it records from its first use on.
    """
    global _feed
    with _lock:
        if _feed is None:
            _feed = Feed(me="this kernel" if _in_kernel() else "this process")
            runtime.watch()  # someone listens now: the host pushes the app's events
            snapshot = runtime.registrations()
            if snapshot is not None:
                _feed.registry.load(snapshot)
        return _feed
