"""An in-process host serving the uplink route on 127.0.0.1, for clients over the network.

:class:`NetHost` runs a real :class:`~anvil_nb.host.dispatcher.Host` on a loop thread
(``HostThread``) behind a real tornado listener on an ephemeral port, with the fixed test keys
``KEYS``; ``client()`` and ``provider()`` join it with anvil_nb's own client over
``WebSocketTransport``, and ``stop()`` closes them and the listener. The ``net`` fixture gives
one per test.
"""

from __future__ import annotations

from typing import Any

import tornado.httpserver
import tornado.netutil

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.endpoints import make_endpoint
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.core.limits import Limits
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.web.routes import make_app
from anvil_nb.web.uplink import Keys
from support.waiting import wait_until

__all__ = ["KEYS", "NetHost"]

KEYS = Keys("server-key-for-tests", "client-key-for-tests")


class NetHost:
    """A host serving the uplink route on 127.0.0.1, on a loop thread."""

    def __init__(self, **limits: Any):
        self.ht = HostThread(lambda: Host(limits=Limits(**limits)))
        self.host = self.ht.host

        def listen() -> int:
            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            self.server = tornado.httpserver.HTTPServer(make_app(self.host, KEYS, "/"))
            self.server.add_sockets(sockets)
            port = sockets[0].getsockname()[1]
            self.host.origin = f"http://127.0.0.1:{port}"
            return port

        self.port = self.ht.run(listen)
        self.url = f"ws://127.0.0.1:{self.port}/_/uplink"
        #: Where the app ``default``'s HTTP endpoints are.
        self.api = f"http://127.0.0.1:{self.port}/_/api"
        self.clients: list[Client] = []

    def client(
        self, key: str = KEYS.server_key, registry: FunctionRegistry | None = None, **kw: Any
    ) -> Client:
        client = Client(
            WebSocketTransport(self.url, key, **kw), functions=registry or FunctionRegistry()
        ).start()
        self.clients.append(client)
        return client

    def provider(self, **fns: Any) -> Client:
        registry = FunctionRegistry()
        for name, fn in fns.items():
            registry.register(name, fn)
        return self.client(KEYS.server_key, registry)

    def serve_endpoints(self, *endpoints: tuple[Any, str, dict[str, Any]]) -> Client:
        """A provider serving HTTP *endpoints* (``(fn, path, options)``, made as
        ``@server.http_endpoint`` makes them), once the host routes every one of them.
        """
        registry = FunctionRegistry()
        for fn, path, options in endpoints:
            name, wrapper = make_endpoint(fn, path, **options)
            registry.register(name, wrapper)
        client = self.client(registry=registry)
        for _, path, _ in endpoints:
            probe = path.replace(":", "")  # any value matches a parameter's group
            wait_until(
                lambda probe=probe: self.ht.run(self.host.endpoint_command, "default", probe),
                10.0,
                f"the host to route {path}",
            )
        return client

    def stop(self) -> None:
        for c in self.clients:
            c.close()
        self.ht.run(self.server.stop)
        self.ht.stop()
