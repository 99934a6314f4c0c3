"""The process's default connection, behind ``anvil_nb.server``.

``server.call`` and friends use one :class:`~anvil_nb.client.Client` per process. When none is
connected, the first use starts an embedded host in this process (a
:class:`~anvil_nb.transports.inprocess.HostThread`) and connects to it as a trusted
``server_module``; ``server.connect`` or ``%load_ext anvil_nb`` replace it with a connection to
another host.
"""

from __future__ import annotations

import threading

from anvil_nb.client import Client
from anvil_nb.transports.inprocess import HostThread

__all__ = ["current_client", "disconnect", "embedded_host", "set_client"]

_lock = threading.RLock()
_client: Client | None = None
_embedded: HostThread | None = None


def embedded_host() -> HostThread:
    """The host running in this process, started on first use."""
    global _embedded
    with _lock:
        if _embedded is None:
            _embedded = HostThread()
        return _embedded


def current_client(start: bool = True) -> Client | None:
    """The default client; with *start*, connect to the embedded host if there is none."""
    global _client
    with _lock:
        if (_client is None or not _client.connected) and start:
            _client = Client(embedded_host().connect("server_module")).start()
        return _client


def set_client(client: Client | None) -> None:
    """Make *client* the default (closing the previous one)."""
    global _client
    with _lock:
        old, _client = _client, client
    if old is not None and old is not client:
        old.close()


def disconnect() -> None:
    """Close the default client and stop the embedded host, if they run."""
    global _embedded
    set_client(None)
    with _lock:
        host, _embedded = _embedded, None
    if host is not None:
        host.stop()
