"""The feed: one set of models per kernel, fed by :data:`anvil_nb.kernel.events`.

Every view of a kernel renders from the same models, so several dashboards in one notebook
always agree. The feed subscribes once, to the kernel's bus, which outlives reconnections and
``%anvil connect``: the views keep working whichever host the kernel is joined to.
"""

from __future__ import annotations

import threading

from anvil_nb import kernel
from anvil_nb.events import Event, EventBus, RegistrySnapshot
from anvil_nb.widgets.models import CallLogModel, CapabilityModel, RegistryModel, SessionModel

__all__ = ["Feed", "shared_feed"]


class Feed:
    """The models the widgets show, and the subscription that fills them.

    Parameters
    ----------
    bus : EventBus, optional
        Where events come from (default: the kernel's bus).
    maxlen : int
        How many calls the call log keeps.
    """

    def __init__(self, bus: EventBus | None = None, maxlen: int = 500):
        self.calls = CallLogModel(maxlen)
        self.sessions = SessionModel()
        self.capabilities = CapabilityModel()
        self.registry = RegistryModel()
        self._models = (self.calls, self.sessions, self.capabilities, self.registry)
        self.unsubscribe = (bus or kernel.events).subscribe(self.apply)

    def apply(self, event: Event) -> None:
        """Give an event to every model (called on whichever thread emitted it)."""
        if isinstance(event, RegistrySnapshot):
            self.registry.load(event.registrations)
            return
        for model in self._models:
            model.apply(event)


_lock = threading.Lock()
_feed: Feed | None = None


def shared_feed() -> Feed:
    """The kernel's feed, created on first use (and seeded with the host's registrations)."""
    global _feed
    with _lock:
        if _feed is None:
            _feed = Feed()
            snapshot = kernel.registry_snapshot()
            if snapshot is not None:
                _feed.registry.load(snapshot)
        return _feed
