"""The process runtime: this process's one connection to a host, and its event bus.

This is the one place that says where the process is connected (:func:`connection`), whoever
made the connection: ``%load_ext anvil_nb`` or ``%anvil connect`` in a kernel
(:mod:`anvil_nb.jupyter.kernel`), ``server.connect`` in a script, or the first
``server.call`` of a process that never joined a host.

* A process that never joined a host: the first use starts an embedded host in this process
  (a :class:`~anvil_nb.host.inprocess.HostThread`) and connects to it as a trusted
  ``server_module``.
* A process that joined a host (:func:`set_connection` or :func:`set_client` with
  ``remote=``) stays with that host. It **never** falls back to an embedded host: while the
  connection is down, calls wait for it to come back (up to the client's ``offline_wait``) and
  then fail with ``AppOfflineError``; if the host refused the key, every call says so.

:data:`events` is the process's bus: the host's stream of the app (what other connections did,
pushed once someone listens, see :func:`watch`) and what this process's own client did, from
whichever client is the default now. Widgets subscribe to it once.

:func:`disconnect` (``server.disconnect()``) ends all of it and returns the process to the
state it started in. This module stands on both ``host`` and ``client`` (it is what joins
them in one process); neither of them imports it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anvil_nb.client.client import Client
from anvil_nb.config import DEFAULT_APP
from anvil_nb.core.errors import AppOfflineError
from anvil_nb.core.events import EventBus
from anvil_nb.host.inprocess import HostThread

__all__ = [
    "Connection",
    "connection",
    "current_client",
    "disconnect",
    "embedded_host",
    "events",
    "joined_url",
    "on_client_change",
    "registrations",
    "set_client",
    "set_connection",
    "watch",
]

log = logging.getLogger("anvil_nb.runtime")

#: Caller types that may watch the app's events.
_TRUSTED = frozenset({"server_module", "uplink"})


@dataclass
class Connection:
    """Where this process is connected, and what it knows of that host."""

    client: Client
    #: The uplink URL other processes reach the host at (``None``: not reachable from outside).
    url: str | None = None
    #: Whether the host runs in this process.
    embedded: bool = False
    #: The app this connection serves.
    app: str = DEFAULT_APP
    server_key: str | None = None
    client_key: str | None = None
    #: Made by a kernel (``%load_ext``, ``%anvil connect``), not by a script.
    by_kernel: bool = False
    #: Once watching: the app's state then (``registrations``, ``you``...).
    watched: dict[str, Any] = field(default_factory=dict)

    @property
    def peer_name(self) -> str | None:
        """The name the host knows this connection by (once it watches the app's events)."""
        you = self.watched.get("you")
        return you if isinstance(you, str) else None


#: The process's bus (see the module docstring).
events = EventBus()

_lock = threading.RLock()
_conn: Connection | None = None
_embedded: HostThread | None = None
#: The host this process joined (its URL), or None while it never joined one.
_remote: str | None = None
#: Called with the default client (or None) whenever it changes; see :func:`on_client_change`.
_listeners: tuple[Callable[[Client | None], None], ...] = ()
#: Serialises the notifications, so the last one always sees the latest client.
_notify_lock = threading.Lock()
#: The client whose events feed :data:`events`, and how to stop that.
_followed: Client | None = None
_unfollow: Callable[[], None] | None = None


def connection() -> Connection | None:
    """Where this process is connected now (``None``: nowhere yet, or joining failed)."""
    return _conn


def on_client_change(listener: Callable[[Client | None], None]) -> Callable[[], None]:
    """Call *listener* with the default client now, and again whenever it changes.

    The client is the one :func:`current_client` would return without starting one (``None``
    when there is none). Listeners run on the thread that made the change, one change at a
    time, outside this module's lock; an exception in one is logged. Returns a function that
    removes *listener*.
    """
    global _listeners
    with _lock:
        _listeners = (*_listeners, listener)
    with _notify_lock:
        _call(listener, _conn.client if _conn is not None else None)

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


def _changed() -> None:
    with _notify_lock:
        conn = _conn  # the latest, whichever change this notification was for
        client = conn.client if conn is not None else None
        _follow(client)
        if conn is not None and events.active:
            watch(conn)
        for listener in _listeners:
            _call(listener, client)


def _follow(client: Client | None) -> None:
    """Feed *client*'s events into :data:`events`, instead of the previous client's."""
    global _followed, _unfollow
    if client is _followed:
        return
    if _unfollow is not None:
        _unfollow()
    _followed = client
    _unfollow = client.events.subscribe(events.emit) if client is not None else None


def watch(conn: Connection | None = None) -> dict[str, Any] | None:
    """Have the host push *conn*'s app events onto :data:`events` (default: the current
    connection); the app's state when it started (``registrations``, ``you``), or ``None``
    for a connection that may not watch (an untrusted one) or is down.

    Once per connection: its client renews the watch after a reconnection.
    """
    conn = conn if conn is not None else _conn
    if conn is None:
        return None
    client = conn.client
    if conn.watched:
        return conn.watched
    if client.own_type not in _TRUSTED or not client.connected:
        return None
    try:
        state = client.watch_events()
    except Exception as exc:  # an older host: views show only what this process knows
        log.info("anvil_nb: the host does not push its events (%s)", exc)
        return None
    if isinstance(state, dict):
        conn.watched = state
        return state
    return None


def registrations() -> dict[str, list[str]] | None:
    """The host's registrations for this process's app, now (``None``: no trusted connection)."""
    conn = _conn
    if conn is None or conn.client.own_type not in _TRUSTED:
        return None
    try:
        state = conn.client.call("anvil.private.host_state")
    except Exception:  # gone meanwhile: what the watch said last will do
        return dict(conn.watched.get("registrations") or {}) if conn.watched else None
    return dict(state.get("registrations") or {})


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
    global _conn
    with _lock:
        conn = _conn
        if _remote is not None:
            if conn is None and start:
                raise AppOfflineError(
                    f"Not connected: joining the host at {_remote} failed; call "
                    "server.connect(...) again (or server.disconnect() to use an embedded host)"
                )
            return conn.client if conn is not None else None
        if not ((conn is None or not conn.client.connected) and start):
            return conn.client if conn is not None else None
        client = Client(embedded_host().connect("server_module")).start()
        _conn = Connection(client, embedded=True)
    _changed()
    return client


def set_connection(conn: Connection | None, remote: str | None = None) -> None:
    """Make *conn* this process's connection (closing the previous one's client).

    *remote* is the URL of the host *conn* joined: from then on the process never falls back
    to an embedded host (``remote`` with no connection: joining failed, and calls say so).
    """
    global _conn, _remote
    with _lock:
        old, _conn = _conn, conn
        _remote = remote
    if old is not None and (conn is None or old.client is not conn.client):
        old.client.close()
    _changed()


def set_client(client: Client | None, remote: str | None = None) -> None:
    """:func:`set_connection` for a bare client (a script's ``server.connect``, tests)."""
    set_connection(Connection(client, url=remote) if client is not None else None, remote)


def disconnect() -> None:
    """Close the default client, stop the embedded host, and forget any host joined."""
    global _embedded
    set_connection(None)
    with _lock:
        host, _embedded = _embedded, None
    if host is not None:
        host.stop()
