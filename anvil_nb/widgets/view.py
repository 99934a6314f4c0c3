"""The base of the live widgets: a box that re-renders from its model, throttled.

A view subscribes to its model; each change only marks it dirty, and a render happens at most
every ``interval`` seconds (see :class:`~anvil_nb.widgets.throttle.Throttle`), with the widget
changes of one render sent together (``hold_sync``). In an IPython kernel, views with changes
pending also render as each cell finishes (:func:`flush`), so what a cell did is in view when it
is done, and a notebook executed by nbclient/nbconvert stores it with the widget state.

Saved without a widget frontend (a notebook on GitHub, in a terminal, ``nbconvert --to
markdown``), a view reads as a one-line summary instead of its widget tree.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any

import ipywidgets as W

from anvil_nb.widgets.models import Model
from anvil_nb.widgets.throttle import Throttle

__all__ = ["LIVE", "LiveView", "flush", "plain_bundle"]

#: Said after a summary: a saved output is a snapshot, the widget lives in a kernel.
LIVE = "(live view: run the cell in a kernel)"

_views: weakref.WeakSet[LiveView] = weakref.WeakSet()
_hook_lock = threading.Lock()


def plain_bundle(widget: W.Widget, text: str, **kwargs: Any) -> Any:
    """*widget*'s mime bundle with *text* as its ``text/plain`` (what shows without widgets)."""
    bundle = W.DOMWidget._repr_mimebundle_(widget, **kwargs)
    if isinstance(bundle, dict):
        bundle["text/plain"] = text
    return bundle


class LiveView(W.VBox):
    """A VBox that renders *model* now, and again after changes (at most every *interval* s)."""

    def __init__(self, model: Model, interval: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.model = model
        self.throttle = Throttle(self.refresh, interval)
        self._render_lock = threading.RLock()
        model.subscribe(self.throttle.mark)
        _views.add(self)
        _hook_ipython()

    def refresh(self) -> None:
        """Render now (the throttle calls this; so does :func:`flush`)."""
        with self._render_lock, self.hold_sync():
            self.render()

    def render(self) -> None:  # pragma: no cover - overridden
        """Update the child widgets from the model."""
        raise NotImplementedError

    def summary(self) -> str:  # pragma: no cover - overridden
        """One line: what the view shows now."""
        raise NotImplementedError

    def __repr__(self) -> str:
        try:
            return f"{self.summary()} {LIVE}"
        except Exception:  # a repr must not raise
            return f"{type(self).__name__} {LIVE}"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return plain_bundle(self, repr(self), **kwargs)


def flush() -> int:
    """Render every view that has changes pending, now; how many rendered."""
    done = 0
    for view in list(_views):
        if view.throttle.flush():
            done += 1
    return done


def _post_run_cell(*_args: Any) -> None:
    flush()  # throttle.flush logs a failing render; nothing reaches the cell


def _hook_ipython() -> None:
    """Flush after every cell of the IPython shell running here (once per shell)."""
    ipython: Any = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:
        return
    with _hook_lock:
        if _post_run_cell not in shell.events.callbacks.get("post_run_cell", ()):
            shell.events.register("post_run_cell", _post_run_cell)
