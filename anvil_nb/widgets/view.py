"""The base of the live widgets: a box that re-renders from its model, throttled.

A view subscribes to its model; each change only marks it dirty, and a render happens at most
every ``interval`` seconds (see :class:`~anvil_nb.widgets.throttle.Throttle`), with the widget
changes of one render sent together (``hold_sync``).
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb.widgets.models import Model
from anvil_nb.widgets.throttle import Throttle

__all__ = ["LiveView"]


class LiveView(W.VBox):
    """A VBox that renders *model* now, and again after changes (at most every *interval* s)."""

    def __init__(self, model: Model, interval: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        self.throttle = Throttle(self.refresh, interval)
        model.subscribe(self.throttle.mark)

    def refresh(self) -> None:
        """Render now (the throttle calls this)."""
        with self.hold_sync():
            self.render()

    def render(self) -> None:  # pragma: no cover - overridden
        """Update the child widgets from the model."""
        raise NotImplementedError
