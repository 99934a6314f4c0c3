"""CallLog: a live table of the calls served by and made from this kernel (or process), and of
the other calls of its app that the host reports (shown with ``·``).

Each row: time, direction, function and arguments, caller type, trusted or not, client (type,
IP, location), session, background task, duration, outcome (result or exception) and captured
output. Filter by function and outcome; choose a call to see its full CallContext, arguments,
result or traceback, and output.
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb.widgets import render
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.view import LiveView

__all__ = ["CallLog"]


class CallLog(LiveView):
    """The call log widget.

    Parameters
    ----------
    feed : Feed, optional
        Where the calls come from (default: this process's, :func:`shared_feed`).
    limit : int
        How many rows the table shows (the model keeps more; see ``Feed(maxlen=...)``).
    interval : float
        The shortest time between two renders, in seconds.
    """

    def __init__(
        self, feed: Feed | None = None, limit: int = 200, interval: float = 0.1, **kwargs: Any
    ):
        feed = feed or shared_feed()
        self.limit = limit
        self.function = W.Dropdown(
            options=[("all functions", "")], value="", description="Function"
        )
        self.outcome = W.ToggleButtons(
            options=[("all", ""), ("ok", "ok"), ("error", "error"), ("running", "running")],
            value="",
        )
        self.table = W.HTML()
        self.choice = W.Dropdown(options=[("(choose a call)", "")], value="", description="Details")
        self.detail = W.HTML()
        super().__init__(
            feed.calls,
            interval,
            children=[W.HBox([self.function, self.outcome]), self.table, self.choice, self.detail],
            **kwargs,
        )
        for control in (self.function, self.outcome):
            control.observe(lambda _change: self.refresh(), names="value")
        self.choice.observe(lambda _change: self._show_detail(), names="value")
        self.refresh()

    def render(self) -> None:
        """Rebuild the table and the choices from the model."""
        model = self.model
        rows = model.rows(self.function.value or None, self.outcome.value or None)[: self.limit]
        self.table.value = render.call_table(rows, model.total)
        functions = [("all functions", "")] + [(f, f) for f in model.functions()]
        if list(self.function.options) != functions:
            keep = self.function.value
            self.function.options = functions
            self.function.value = keep if keep in dict(functions).values() else ""
        choices = [("(choose a call)", "")] + [
            (f"{render._clock(c.time)} {c.function} {c.caller} {c.outcome}", c.call_id)
            for c in rows[:50]
        ]
        keep = self.choice.value
        self.choice.options = choices
        self.choice.value = keep if keep in dict(choices).values() else ""
        self._show_detail()

    def summary(self) -> str:
        """``anvil_nb call log: 3 calls (1 error)``."""
        return f"anvil_nb call log: {render.call_summary(self.model)}"

    def _show_detail(self) -> None:
        call_id = self.choice.value
        self.detail.value = render.call_detail(self.model.get(call_id)) if call_id else ""
