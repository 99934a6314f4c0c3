"""CapabilityStream: per capability scope, each update sent or received, and the aggregate."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb.widgets import render
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.view import LiveView

__all__ = ["CapabilityStream"]


class CapabilityStream(LiveView):
    """Updates by scope: time, call, direction (↑ sent back, ↓ received), payload, and the
    value they aggregate to under the default rule (dicts merge, anything else replaces).
    """

    def __init__(self, feed: Feed | None = None, interval: float = 0.1, **kwargs: Any):
        self.table = W.HTML()
        super().__init__(
            (feed or shared_feed()).capabilities, interval, children=[self.table], **kwargs
        )
        self.refresh()

    def render(self) -> None:  # noqa: D102
        self.table.value = render.capability_list(self.model.scopes())

    def summary(self) -> str:
        """``anvil_nb capability updates: 5 updates in 2 scopes``."""
        scopes = self.model.scopes()
        updates = render.plural(sum(v.count for v in scopes), "update")
        return f"anvil_nb capability updates: {updates} in {render.plural(len(scopes), 'scope')}"
