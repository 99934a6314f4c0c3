"""The host service: the one way every placement runs a host (keys, host, housekeeping, listener)."""

from __future__ import annotations

import urllib.request

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.config import Keys
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.web.service import listen_embedded

KEYS = Keys("server-key-for-service-tests", "client-key-for-service-tests")


def test_a_service_listens_keeps_house_and_stops(tmp_path):
    ht = HostThread(lambda: Host(data_dir=tmp_path))
    try:
        service = listen_embedded(ht, KEYS)
        port = service.port
        assert service.host is ht.host and ht.host.origin == f"http://127.0.0.1:{port}"
        assert ht.run(service._housekeeping.is_running)
        assert ht.host.client_key == KEYS.client_key
        registry = FunctionRegistry()
        registry.register("ping", lambda: "pong")
        url = f"ws://127.0.0.1:{port}/_/uplink"
        provider = Client(WebSocketTransport(url, KEYS.server_key), functions=registry).start()
        caller = Client(WebSocketTransport(url, KEYS.client_key), functions=FunctionRegistry())
        try:
            assert caller.start().call("ping") == "pong"
            with urllib.request.urlopen(ht.host.origin + "/", timeout=10) as page:
                assert "<code>ping</code>" in page.read().decode()  # the front door
        finally:
            caller.close()
            provider.close()
    finally:
        ht.stop()
    assert service._housekeeping is None  # stopped with the host
