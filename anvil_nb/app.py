"""The routes of a host, in one table, for every placement.

The same routes serve the standalone host (prefix ``/``) and the Jupyter server extension
(prefix ``{base_url}anvil/``); each placement picks the handler classes, which decide who may
use a route:

==================  ==============================================================
``_/uplink``        uplink WebSocket; the uplink key authenticates, any Origin
``_/ws``            browser WebSocket (untrusted)
``_/api/<path>``    HTTP endpoints
``_/admin/state``   registrations and peers (server key standalone, Jupyter auth in Jupyter)
==================  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tornado.web

from anvil_nb.handlers import AdminStateHandler, ApiHandler
from anvil_nb.host import Host
from anvil_nb.protocol import DEFAULT_MAX_FRAME_BYTES
from anvil_nb.transports.uplink_ws import BrowserHandler, Keys, UplinkHandler

__all__ = ["Handlers", "make_app", "routes"]


@dataclass(frozen=True)
class Handlers:
    """The handler class of each route (the Jupyter extension swaps in authenticated ones)."""

    uplink: type = UplinkHandler
    browser: type = BrowserHandler
    api: type = ApiHandler
    admin_state: type = AdminStateHandler


def _join(prefix: str, path: str) -> str:
    return prefix.rstrip("/") + "/" + path


def routes(
    host: Host, keys: Keys, prefix: str = "/", handlers: Handlers = Handlers(), public: bool = True
) -> list[tuple[str, type, dict[str, Any]]]:
    """The host's routes under *prefix*."""
    kwargs = {"host": host, "keys": keys, "public": public}
    return [
        (_join(prefix, "_/uplink"), handlers.uplink, kwargs),
        (_join(prefix, "_/ws"), handlers.browser, kwargs),
        (_join(prefix, "_/api/(.*)"), handlers.api, kwargs),
        (_join(prefix, "_/admin/state"), handlers.admin_state, kwargs),
    ]


def make_app(
    host: Host, keys: Keys, prefix: str = "/", max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tornado.web.Application:
    """A tornado application serving *host* under *prefix* (the standalone placement).

    Frames larger than *max_frame_bytes* close the connection (larger data goes as Media).
    WebSocket pings every 25 s find dead peers; the real client answers them.
    """
    return tornado.web.Application(
        routes(host, keys, prefix),
        websocket_max_message_size=max_frame_bytes,
        websocket_ping_interval=25,
        websocket_ping_timeout=25,
    )
