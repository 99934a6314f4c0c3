"""Registry: the names registered with the host and who provides them."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb import runtime
from anvil_nb.client.client import functions
from anvil_nb.core import portable
from anvil_nb.widgets import render
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.view import LiveView

__all__ = ["Registry", "function_names"]

_BUILTIN_CLASSES = frozenset({"anvil.server._LoadAppResponse"})


def function_names(feed: Feed) -> list[str]:
    """Every name registered with the host (as far as *feed* knows) or in this process."""
    return sorted(set(feed.registry.names()) | set(functions.names()))


def _peer_name() -> str | None:
    """The name the host knows this process's connection by (to mark its registrations)."""
    conn = runtime.connection()
    return conn.peer_name if conn is not None else None


class Registry(LiveView):
    """Callables and portable classes, with their providers: this kernel, other kernels, uplinks."""

    def __init__(self, feed: Feed | None = None, interval: float = 0.1, **kwargs: Any):
        self.feed = feed or shared_feed()
        self.table = W.HTML()
        super().__init__(self.feed.registry, interval, children=[self.table], **kwargs)
        self._stop_listening = functions.add_listener(lambda _name, _added: self.throttle.mark())
        self.refresh()

    def _classes(self) -> list[str]:
        return sorted(set(portable.registered_names()) - _BUILTIN_CLASSES)

    def render(self) -> None:  # noqa: D102
        self.table.value = render.registry_table(
            self.model.names(),
            sorted(functions.names()),
            self._classes(),
            _peer_name(),
            self.feed.me,
        )

    def summary(self) -> str:
        """``anvil_nb registry: 2 functions, 1 portable class``."""
        names = render.plural(len(function_names(self.feed)), "function")
        classes = render.plural(len(self._classes()), "portable class", "portable classes")
        return f"anvil_nb registry: {names}, {classes}"

    def close(self) -> None:  # noqa: D102
        self._stop_listening()
        super().close()
