"""The routes of a host, in one table, for every placement.

The same handlers serve the standalone host (prefix ``/``) and the Jupyter server extension
(prefix ``{base_url}anvil/``): ``_/uplink`` is the uplink WebSocket.
"""

from __future__ import annotations

from typing import Any

import tornado.web

from anvil_nb.host import Host
from anvil_nb.protocol import DEFAULT_MAX_FRAME_BYTES
from anvil_nb.transports.uplink_ws import Keys, UplinkHandler

__all__ = ["make_app", "routes"]


def _join(prefix: str, path: str) -> str:
    return prefix.rstrip("/") + "/" + path


def routes(host: Host, keys: Keys, prefix: str = "/") -> list[tuple[str, type, dict[str, Any]]]:
    """The host's routes under *prefix*."""
    return [(_join(prefix, "_/uplink"), UplinkHandler, {"host": host, "keys": keys})]


def make_app(
    host: Host, keys: Keys, prefix: str = "/", max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> tornado.web.Application:
    """A tornado application serving *host* under *prefix*.

    Frames larger than *max_frame_bytes* close the connection (larger data goes as Media).
    WebSocket pings every 25 s find dead peers; the real client answers them.
    """
    return tornado.web.Application(
        routes(host, keys, prefix),
        websocket_max_message_size=max_frame_bytes,
        websocket_ping_interval=25,
        websocket_ping_timeout=25,
    )
