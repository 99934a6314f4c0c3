"""The dashboard: the four live views in tabs (``%anvil dashboard``)."""

from __future__ import annotations

import ipywidgets as W

from anvil_nb.widgets.call_log import CallLog
from anvil_nb.widgets.capability_stream import CapabilityStream
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.registry import Registry
from anvil_nb.widgets.session_state import SessionInspector

__all__ = ["TITLES", "dashboard"]

TITLES = ("Calls", "Sessions", "Capabilities", "Registry")


def dashboard(feed: Feed | None = None) -> W.Tab:
    """Calls, sessions, capability streams and the registry, live, in one Tab widget."""
    feed = feed or shared_feed()
    tab = W.Tab(
        children=[CallLog(feed), SessionInspector(feed), CapabilityStream(feed), Registry(feed)]
    )
    tab.titles = TITLES
    return tab
