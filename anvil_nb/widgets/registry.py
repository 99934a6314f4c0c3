"""Registry: the names registered with the host and who provides them."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from anvil_nb import kernel, portable
from anvil_nb.client import functions
from anvil_nb.widgets import render
from anvil_nb.widgets.feed import Feed, shared_feed
from anvil_nb.widgets.view import LiveView

__all__ = ["Registry"]


class Registry(LiveView):
    """Callables and portable classes, with their providers: this kernel, other kernels, uplinks."""

    def __init__(self, feed: Feed | None = None, interval: float = 0.1, **kwargs: Any):
        self.table = W.HTML()
        super().__init__(
            (feed or shared_feed()).registry, interval, children=[self.table], **kwargs
        )
        self._stop_listening = functions.add_listener(lambda _name, _added: self.throttle.mark())
        self.refresh()

    def render(self) -> None:  # noqa: D102
        classes = sorted(set(portable.registered_names()) - {"anvil.server._LoadAppResponse"})
        self.table.value = render.registry_table(
            self.model.names(), sorted(functions.names()), classes, kernel.peer_name()
        )

    def close(self) -> None:  # noqa: D102
        self._stop_listening()
        super().close()
