"""The process's default connection, behind ``anvil_nb.server``.

``server.call`` and friends use one :class:`~anvil_nb.client.client.Client` per process.

* A process that never joined a host: the first use starts an embedded host in this process
  (a :class:`~anvil_nb.host.inprocess.HostThread`) and connects to it as a trusted
  ``server_module``.
* A process that joined a host (``server.connect``, or a kernel whose ``%load_ext anvil_nb``
  or ``%anvil connect`` reached a host; :func:`set_client` with ``remote=``) stays with that
  host. It **never** falls back to an embedded host: while the connection is down, calls wait
  for it to come back (up to the client's ``offline_wait``) and then fail with
  ``AppOfflineError``; if the host refused the key, every call says so.

:func:`disconnect` (``server.disconnect()``) ends all of it and returns the process to the
state it started in.

:func:`on_client_change` lets others follow whichever client is the default (the widgets' event
feed subscribes to it, in a kernel or any other process).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from anvil_nb.client.client import Client
from anvil_nb.core.errors import AppOfflineError
from anvil_nb.host.inprocess import HostThread

__all__ = [
    "current_client",
    "disconnect",
    "embedded_host",
    "joined_url",
    "on_client_change",
    "set_client",
]

log = logging.getLogger("anvil_nb.runtime")

_lock = threading.RLock()
_client: Client | None = None
_embedded: HostThread | None = None
#: The host this process joined (its URL), or None while it never joined one.
_remote: str | None = None
#: Called with the default client (or None) whenever it changes; see :func:`on_client_change`.
_listeners: tuple[Callable[[Client | None], None], ...] = ()
#: Serialises the calls to listeners, so the last one always sees the latest client.
_notify_lock = threading.Lock()


def on_client_change(listener: Callable[[Client | None], None]) -> Callable[[], None]:
    """Call *listener* with the default client now, and again whenever it changes.

    The client is the one :func:`current_client` would return without starting one (``None``
    when there is none): it changes with :func:`set_client`, :func:`disconnect`, and when
    :func:`current_client` connects to the embedded host. Listeners run on the thread that made
    the change, one change at a time, outside this module's lock; an exception in one is logged.
    Returns a function that removes *listener*.
    """
    global _listeners
    with _lock:
        _listeners = (*_listeners, listener)
    with _notify_lock:
        _call(listener, _client)

    def remove() -> None:
        global _listeners
        with _lock:
            _listeners = tuple(x for x in _listeners if x is not listener)

    return remove


def _call(listener: Callable[[Client | None], None], client: Client | None) -> None:
    try:
        listener(client)
    except Exception:
        log.exception("anvil_nb: a client-change listener failed")


def _client_changed() -> None:
    with _notify_lock:
        client = _client  # the latest, whichever change this notification was for
        for listener in _listeners:
            _call(listener, client)


def embedded_host() -> HostThread:
    """The host running in this process, started on first use."""
    global _embedded
    with _lock:
        if _embedded is None:
            _embedded = HostThread()
        return _embedded


def joined_url() -> str | None:
    """The URL of the host this process joined, or ``None`` if it never joined one."""
    return _remote


def current_client(start: bool = True) -> Client | None:
    """The default client.

    With *start*, a process that never joined a host gets a connection to the embedded host
    when it has none (or its connection ended). A process that joined a host always gets its
    client, connected or not (its calls wait for the reconnection).

    Raises
    ------
    AppOfflineError
        With *start*: the process tried to join a host (``server.connect``) and failed, so it
        has no connection at all.
    """
    global _client
    with _lock:
        if _remote is not None:
            if _client is None and start:
                raise AppOfflineError(
                    f"Not connected: joining the host at {_remote} failed; call "
                    "server.connect(...) again (or server.disconnect() to use an embedded host)"
                )
            return _client
        if not ((_client is None or not _client.connected) and start):
            return _client
        client = _client = Client(embedded_host().connect("server_module")).start()
    if _listeners:
        _client_changed()
    return client


def set_client(client: Client | None, remote: str | None = None) -> None:
    """Make *client* the default (closing the previous one).

    *remote* is the URL of the host *client* joined: from then on the process never falls
    back to an embedded host (``remote`` with no client: joining failed, and calls say so).
    """
    global _client, _remote
    with _lock:
        old, _client = _client, client
        _remote = remote
    if old is not None and old is not client:
        old.close()
    if _listeners:
        _client_changed()


def disconnect() -> None:
    """Close the default client, stop the embedded host, and forget any host joined."""
    global _embedded
    set_client(None)
    with _lock:
        host, _embedded = _embedded, None
    if host is not None:
        host.stop()
