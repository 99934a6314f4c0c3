"""The HTTP listener of the standalone and embedded hosts: bounded in time and in accept errors.

:class:`HTTPServer` is tornado's, with two changes that keep unauthenticated connections from
costing the host more than :class:`~anvil_nb.core.limits.Limits` allows:

* a TCP connection that has not sent a complete HTTP request within ``handshake_timeout``
  seconds (idle sockets, half-sent headers, bodies that never finish) is closed. After the
  WebSocket upgrade, :class:`~anvil_nb.web.uplink.UplinkHandler` bounds the time to
  the hello with the same limit.
* accept errors do not spin. tornado's own accept loop lets ``accept()`` errors such as
  ``EMFILE`` (the process is out of file descriptors) escape; the listening socket stays
  readable, so the event loop calls it again at once and logs the error each time (100 % CPU,
  megabytes of log per second, and no time left for the connections already open). Here an
  accept error pauses accepting for ``accept_backoff`` seconds (the waiting connections stay
  in the kernel's backlog) and is logged at most once per ``log_interval``.

Inside ``jupyter server`` the listener is Jupyter's own (tornado's): these bounds then apply
from the WebSocket upgrade on, not before it.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any

import tornado.httpserver
from tornado.ioloop import IOLoop

from anvil_nb.core.limits import DEFAULT_LIMITS, Limits
from anvil_nb.core.logs import RateLimiter

__all__ = ["HTTPServer", "add_accept_handler"]

log = logging.getLogger("anvil_nb.listener")

#: Errors that mean "no resources for another connection now": accepting again at once would
#: fail the same way.
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

#: Connections accepted per readiness event at most (tornado's figure), so one busy listener
#: cannot starve the connections already open.
ACCEPTS_PER_EVENT = 128


def add_accept_handler(
    sock: socket.socket,
    callback: Callable[[socket.socket, Any], None],
    limits: Limits = DEFAULT_LIMITS,
    limiter: RateLimiter | None = None,
) -> Callable[[], None]:
    """Accept connections on the listening *sock* and pass each to ``callback(conn, address)``.

    Like :func:`tornado.netutil.add_accept_handler`, but an ``accept()`` error stops accepting
    for ``limits.accept_backoff`` seconds instead of escaping (and being retried at once by the
    event loop); errors are logged through *limiter*, one line per ``limits.log_interval``.
    Returns a function that stops accepting.
    """
    acceptor = _Acceptor(sock, callback, limits, limiter or RateLimiter(limits.log_interval))
    acceptor.listen()
    return acceptor.remove


class _Acceptor:
    """The accept loop of one listening socket, with its back-off (see add_accept_handler)."""

    def __init__(
        self,
        sock: socket.socket,
        callback: Callable[[socket.socket, Any], None],
        limits: Limits,
        quiet: RateLimiter,
    ):
        self.sock, self.callback, self.limits, self.quiet = sock, callback, limits, quiet
        self.io_loop = IOLoop.current()
        self.removed = False
        self.listening = False
        self.timer: Any = None

    def listen(self) -> None:
        self.listening = True
        self.io_loop.add_handler(self.sock, self.accept_ready, IOLoop.READ)

    def accept_ready(self, fd: Any, events: int) -> None:  # noqa: ARG002
        for _ in range(ACCEPTS_PER_EVENT):
            if self.removed:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return  # everything waiting has been accepted
            except ConnectionAbortedError:
                continue  # closed while still in the backlog
            except OSError as exc:
                self.pause(exc)
                return
            self.callback(connection, address)

    def pause(self, exc: OSError) -> None:
        backoff = max(self.limits.accept_backoff, 0.01)
        what = "out of resources" if exc.errno in RESOURCE_ERRORS else "accept error"
        self.quiet.warning(
            log,
            "accept",
            "cannot accept connections (%s: %s); not accepting for %g s",
            what,
            exc.strerror or exc,
            backoff,
        )
        self.io_loop.remove_handler(self.sock)
        self.listening = False
        self.timer = self.io_loop.call_later(backoff, self.resume)

    def resume(self) -> None:
        self.timer = None
        if not self.removed:
            self.listen()

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        if self.timer is not None:
            self.io_loop.remove_timeout(self.timer)
            self.timer = None
        if self.listening:
            self.io_loop.remove_handler(self.sock)
            self.listening = False


class HTTPServer(tornado.httpserver.HTTPServer):
    """tornado's HTTP server with the bounds of *limits* (see the module docstring).

    ``HTTPServer(app, limits=limits, **tornado_options)``: ``idle_connection_timeout`` and
    ``body_timeout`` default to ``limits.handshake_timeout``.
    """

    def initialize(  # type: ignore[override]  # noqa: D102
        self, request_callback: Any, limits: Limits = DEFAULT_LIMITS, **kwargs: Any
    ) -> None:
        timeout = limits.handshake_timeout if limits.handshake_timeout > 0 else None
        kwargs.setdefault("idle_connection_timeout", timeout)
        kwargs.setdefault("body_timeout", timeout)
        super().initialize(request_callback, **kwargs)
        self.limits = limits
        self._quiet = RateLimiter(limits.log_interval)

    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        """Start accepting on *sockets* with the bounded accept loop.

        (It fills the same tables as tornado's ``TCPServer.add_sockets``, so ``stop()`` works
        unchanged.)
        """
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = add_accept_handler(
                sock, self._handle_connection, self.limits, self._quiet
            )
