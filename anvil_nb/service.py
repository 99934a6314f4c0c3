"""The host service: one host as every placement runs it.

The three placements (``anvil-nb serve``, the Jupyter server extension, the host embedded in a
kernel) all run a :class:`HostService`: the app keys (a :class:`~anvil_nb.apps.KeyRing`), the
:class:`~anvil_nb.host.Host` with its :class:`~anvil_nb.limits.Limits`, its housekeeping
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

from anvil_nb.app import Handlers, make_app, routes
from anvil_nb.apps import KeyRing
from anvil_nb.host import Host
from anvil_nb.limits import DEFAULT_LIMITS, Limits
from anvil_nb.transports.listener import HTTPServer

__all__ = ["HOUSEKEEPING_INTERVAL", "HostService"]

log = logging.getLogger("anvil_nb.service")

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
        How to make the host when none is given (see :class:`~anvil_nb.host.Host`).
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

    @property
    def limits(self) -> Limits:
        """The host's bounds."""
        return self.host.limits

    def routes(
        self, prefix: str, handlers: Handlers, public: bool
    ) -> list[tuple[str, type, dict[str, Any]]]:
        """The host's routes under *prefix*, for an application of someone else's (Jupyter)."""
        return routes(self.host, self.keyring, prefix, handlers, public=public)

    def listen(self, address: str = "127.0.0.1", port: int = 0) -> int:
        """Serve the host's routes (and its front door) on *address*; return the bound port.

        The listener bounds what a connection may cost before the upgrade too (see
        :mod:`anvil_nb.transports.listener`), and the host's origin becomes this address.
        """
        sockets = tornado.netutil.bind_sockets(port, address)
        self._http = HTTPServer(
            make_app(self.host, self.keyring, "/"),
            limits=self.limits,
            max_body_size=self.limits.max_frame_bytes,
        )
        self._http.add_sockets(sockets)
        bound = int(sockets[0].getsockname()[1])
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
