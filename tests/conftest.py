"""Shared fixtures: every test starts with no connection, no embedded host and no leftovers.

``host`` gives a real host on its own loop thread; ``connect(kind)`` joins it as a peer of that
caller type (a trusted ``server_module`` by default, or ``client_uplink``/``browser`` to play an
untrusted client) with its own function registry, and closes everything at the end.
``serve_proc(*flags, **env)`` starts a real ``anvil-nb serve`` subprocess and ``raw_ws(url)`` a
raw WebSocket peer (both in ``support.py``), stopped at the end of the test.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir
from support import RawWS, ServeProc, install_anvil_uplink

from anvil_nb import runtime
from anvil_nb.client.client import Client, FunctionRegistry, functions
from anvil_nb.core import portable
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread

# Hypothesis keeps no example database and its caches in a temp dir: tests write nothing into
# the checkout.
settings.register_profile("anvil_nb", database=None)
settings.load_profile("anvil_nb")
_hypothesis_home = tempfile.mkdtemp(prefix="anvil_nb-hypothesis-")
set_hypothesis_home_dir(_hypothesis_home)
atexit.register(shutil.rmtree, _hypothesis_home, True)


@pytest.fixture(autouse=True)
def clean_runtime() -> Iterator[None]:
    names = set(functions.names())
    classes = portable.registered_names()
    yield
    runtime.disconnect()
    for name in set(functions.names()) - names:
        functions.unregister(name)
    for name in set(portable.registered_names()) - set(classes):
        portable.unregister(name)


@pytest.fixture(scope="session")
def anvil_uplink_dir() -> Path:
    """The real anvil-uplink, installed out of the venv (see ``support.install_anvil_uplink``)."""
    return install_anvil_uplink()


@pytest.fixture
def host_thread() -> Iterator[HostThread]:
    ht = HostThread()
    yield ht
    ht.stop()


@pytest.fixture
def host(host_thread: HostThread) -> Host:
    return host_thread.host


Connect = Callable[..., Client]


@pytest.fixture
def connect(host_thread: HostThread) -> Iterator[Connect]:
    """``connect(kind="server_module", functions=None) -> Client`` joined to ``host_thread``."""
    clients: list[Client] = []

    def make(kind: str = "server_module", registry: FunctionRegistry | None = None) -> Client:
        client = Client(host_thread.connect(kind), functions=registry or FunctionRegistry())
        clients.append(client.start())
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[Callable[..., ServeProc]]:
    """``serve_proc(*flags, **env) -> ServeProc``; every host started is stopped at the end."""
    started: list[ServeProc] = []

    def start(*flags: str, **env: str) -> ServeProc:
        proc = ServeProc(tmp_path / f"serve-{len(started)}", flags, **env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def raw_ws() -> Iterator[Callable[..., RawWS]]:
    """``raw_ws(url) -> RawWS``, closed at the end of the test."""
    opened: list[RawWS] = []

    def make(url: str, **kw: Any) -> RawWS:
        ws = RawWS(url, **kw)
        opened.append(ws)
        return ws

    yield make
    for ws in opened:
        ws.close()
