"""SessionInspector: the sessions this kernel has served, live, with the changed keys highlighted."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb.widgets import render
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.view import LiveView

__all__ = ["SessionInspector"]


class SessionInspector(LiveView):
    """Each session's contents after the last call in it; reset sessions are shown as such."""

    def __init__(self, feed: Feed | None = None, interval: float = 0.1, **kwargs: Any):
        self.table = W.HTML()
        super().__init__(
            (feed or shared_feed()).sessions, interval, children=[self.table], **kwargs
        )
        self.refresh()

    def render(self) -> None:  # noqa: D102
        self.table.value = render.session_list(self.model.sessions())

    def summary(self) -> str:
        """``anvil_nb sessions: 2 sessions``."""
        return f"anvil_nb sessions: {render.plural(len(self.model.sessions()), 'session')}"
