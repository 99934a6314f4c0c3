"""Render at most every *interval* seconds, however many changes arrive.

The first change after a render schedules the next render *interval* later; changes until then
only mark the view dirty. Bursts of a thousand calls a second therefore cost ten renders a
second, and a lone change is shown within *interval*. :meth:`Throttle.flush` renders pending
changes at once (the views do at the end of each notebook cell).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["Throttle"]

log = logging.getLogger("anvil_nb.widgets")


class Throttle:
    """Coalesces calls to :meth:`mark` into calls of *render*, at most one per *interval*."""

    def __init__(self, render: Callable[[], None], interval: float = 0.1):
        self.render = render
        self.interval = interval
        self.renders = 0
        self._pending = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def mark(self) -> None:
        """Something changed: render within *interval* (once, for all changes until then)."""
        with self._lock:
            if self._pending:
                return
            self._pending = True
            timer = self._timer = threading.Timer(self.interval, self._fire)
            timer.daemon = True
        timer.start()

    def flush(self) -> bool:
        """Render now if something changed since the last render; whether it did."""
        with self._lock:
            if not self._pending:
                return False
            self._pending = False
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._render()
        return True

    def _fire(self) -> None:
        with self._lock:
            if not self._pending:
                return  # flushed meanwhile
            self._pending = False
            self._timer = None
        self._render()

    def _render(self) -> None:
        try:
            self.render()
            self.renders += 1
        except Exception:  # a failing render must not stop later ones, nor reach the call path
            log.exception("anvil_nb widget render failed")
