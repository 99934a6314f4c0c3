"""The host service: one host as every placement runs it.

The three placements (``anvil-nb serve``, the Jupyter server extension, the host embedded in a
kernel) all run a :class:`HostService`: the app keys (a :class:`~anvil_nb.config.KeyRing`), the
:class:`~anvil_nb.host.dispatcher.Host` with its :class:`~anvil_nb.core.limits.Limits`, its housekeeping
(expired sessions purged every minute) and, for the standalone and embedded placements, an HTTP
listener serving the host's routes. The Jupyter extension mounts the same routes on Jupyter's
own application instead (:meth:`HostService.routes`). Every method runs on the host's loop.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import tornado.ioloop
import tornado.netutil

from anvil_nb.config import KeyRing, Keys
from anvil_nb.core.limits import DEFAULT_LIMITS, Limits
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.web.listener import HTTPServer
from anvil_nb.web.routes import Handlers, make_app, routes

__all__ = ["HOUSEKEEPING_INTERVAL", "HostService", "listen_embedded"]

log = logging.getLogger("anvil_nb.web.service")

#: Seconds between two housekeeping rounds (expired sessions purged, idle clocks persisted).
HOUSEKEEPING_INTERVAL = 60.0


class HostService:
    """A host, its keys, its housekeeping and (optionally) its own HTTP listener.

    Parameters
    ----------
    keyring : KeyRing
        The keys of the host's apps (the uplink key selects the app).
    host : Host, optional
        The host to run (default: one made from *data_dir*, *limits* and *call_timeout*).
    data_dir, limits, call_timeout :
        How to make the host when none is given (see :class:`~anvil_nb.host.dispatcher.Host`).
    """

    def __init__(
        self,
        keyring: KeyRing,
        host: Host | None = None,
        *,
        data_dir: str | Path | None = None,
        limits: Limits = DEFAULT_LIMITS,
        call_timeout: float | None = None,
    ):
        self.keyring = keyring
        self.host = host or Host(data_dir=data_dir, limits=limits, call_timeout=call_timeout)
        self.host.client_key = keyring.default.client_key
        self._housekeeping: tornado.ioloop.PeriodicCallback | None = None
        self._http: HTTPServer | None = None
        #: The port :meth:`listen` bound (None until then).
        self.port: int | None = None

    @property
    def limits(self) -> Limits:
        """The host's bounds."""
        return self.host.limits

    def routes(
        self, prefix: str, handlers: Handlers, public: bool
    ) -> list[tuple[str, type, dict[str, Any]]]:
        """The host's routes under *prefix*, for an application of someone else's (Jupyter)."""
        return routes(self.host, self.keyring, prefix, handlers, public=public)

    def listen(self, address: str = "127.0.0.1", port: int = 0, access_log: bool = True) -> int:
        """Serve the host's routes (and its front door) on *address*; return the bound port.

        The listener bounds what a connection may cost before the upgrade too (see
        :mod:`anvil_nb.web.listener`), and the host's origin becomes this address. Without
        *access_log* no request is logged (a kernel's host: its log is the notebook's output).
        """
        sockets = tornado.netutil.bind_sockets(port, address)
        self._http = HTTPServer(
            make_app(self.host, self.keyring, "/", access_log=access_log),
            limits=self.limits,
            max_body_size=self.limits.max_frame_bytes,
        )
        self._http.add_sockets(sockets)
        bound = self.port = int(sockets[0].getsockname()[1])
        shown = f"[{address}]" if ":" in address else address
        self.host.origin = f"http://{shown}:{bound}"
        return bound

    def start(self) -> None:
        """Start the housekeeping (on the running loop)."""
        if self._housekeeping is None:
            self._housekeeping = tornado.ioloop.PeriodicCallback(
                self.host.housekeeping, HOUSEKEEPING_INTERVAL * 1000
            )
            self._housekeeping.start()

    def stop(self) -> None:
        """Stop: no new connections, calls in flight fail, peers are closed, sessions kept."""
        if self._housekeeping is not None:
            self._housekeeping.stop()
            self._housekeeping = None
        if self._http is not None:
            self._http.stop()
        self.host.close()

    async def close_connections(self, timeout: float = 3.0) -> None:
        """Wait (at most *timeout* seconds) for the listener's connections to close."""
        if self._http is None:
            return
        try:
            await asyncio.wait_for(self._http.close_all_connections(), timeout=timeout)
        except asyncio.TimeoutError:
            log.warning("some connections did not close in time")


def listen_embedded(
    host_thread: HostThread, keys: Keys, address: str = "127.0.0.1", port: int = 0
) -> HostService:
    """Put a host running in this process on the network (the embedded placement).

    Uplinks then reach it at ``ws://address:port/_/uplink`` with *keys*; the listener applies
    the host's limits before the upgrade too. Stopping the thread stops the service. Returns
    the service (``service.port`` is the bound port, an ephemeral one by default).
    """

    def start() -> HostService:
        service = HostService(KeyRing.of(keys), host_thread.host)
        service.listen(address, port, access_log=False)
        service.start()
        host_thread.on_stop = service.stop
        return service

    return host_thread.run(start)
