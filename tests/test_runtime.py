"""The process's one record of where it is connected (``anvil_nb.runtime.Connection``).

Whoever makes the connection (the first ``server.call``, ``server.connect``, ``%load_ext`` /
``%anvil connect`` through :func:`anvil_nb.jupyter.kernel.join`), :func:`runtime.connection`
says where the process is, and ``%anvil status`` reads it from there. Real hosts: the embedded
one and an ``anvil-nb serve`` subprocess.
"""

from __future__ import annotations

from anvil_nb import runtime, server
from anvil_nb.client.client import functions
from anvil_nb.jupyter import kernel


def test_every_way_of_connecting_leaves_one_record(serve_proc):
    host = serve_proc()
    assert runtime.connection() is None
    functions.register("here", lambda: "here")

    assert server.call("here") == "here"  # first use: a host in this process
    first = runtime.connection()
    assert first is not None and first.embedded and first.url is None and not first.by_kernel
    assert kernel.status() == {"connected": False, "functions": functions.names()}

    server.connect(host.server_key, url=host.url, quiet=True)  # a script joins a host
    joined = runtime.connection()
    assert joined is not None and joined is not first
    assert (joined.url, joined.embedded, joined.by_kernel) == (host.url, False, False)
    assert first.client.closed  # the embedded connection was let go
    assert kernel.status()["url"] == host.url  # %anvil status reads the same record

    kernel.join(host.url, host.server_key)  # %anvil connect
    mine = runtime.connection()
    assert mine is not None and mine.by_kernel and not mine.embedded
    assert (mine.app, mine.server_key, mine.client_key) == (
        "default", host.server_key, host.client_key
    )  # fmt: skip
    assert mine.peer_name and mine.peer_name.startswith("server_module-")  # it watches
    assert runtime.current_client(start=False) is mine.client
    assert kernel.status_json()["uplink_url"] == host.url

    server.disconnect()
    assert runtime.connection() is None and runtime.joined_url() is None
