"""Shared fixtures: every test starts with no connection, no embedded host and no leftovers.

``host`` gives a real host on its own loop thread; ``connect(kind)`` joins it as a peer of that
caller type (a trusted ``server_module`` by default, or ``client_uplink``/``browser`` to play an
untrusted client) with its own function registry, and closes everything at the end.
``serve_proc(*flags, **env)`` starts a real ``anvil-nb serve`` subprocess and ``raw_ws(url)`` a
raw WebSocket peer, stopped at the end of the test; ``net`` is a host behind a real listener on
127.0.0.1. ``kernels`` starts real ipykernels (``kernelspecs``: this venv's Python), ``lab`` a
real JupyterLab and ``browser`` Debian's Chromium, each stopped at the end.

The helpers behind them are in the ``support`` package (``support/processes.py``,
``support/ws.py``, ...), which tests import from its modules. ``tests/`` has no
``__init__.py``, so pytest (import mode ``prepend``) puts this folder at the front of
``sys.path`` when it loads this conftest, before any test module: ``support`` imports the same
way from ``tests/reliability/``.
"""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir
from jupyter_client.kernelspec import KernelSpecManager
from playwright.sync_api import BrowserContext
from support.browser import JupyterLab, chromium, require_chromium
from support.factories import stopping_each
from support.kernels import Kernels, kernels_in, write_kernelspec
from support.nethost import NetHost
from support.processes import ServeProc
from support.uplink import install_anvil_uplink
from support.ws import RawWS

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
    """The real anvil-uplink, installed out of the venv (see ``support/uplink.py``)."""
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

    def make(kind: str = "server_module", registry: FunctionRegistry | None = None) -> Client:
        return Client(host_thread.connect(kind), functions=registry or FunctionRegistry()).start()

    yield from stopping_each(make, Client.close)


@pytest.fixture
def serve_proc(tmp_path: Path) -> Iterator[Callable[..., ServeProc]]:
    """``serve_proc(*flags, **env) -> ServeProc``; every host started is stopped at the end."""
    n = itertools.count()

    def start(*flags: str, **env: str) -> ServeProc:
        return ServeProc(tmp_path / f"serve-{next(n)}", flags, **env)

    yield from stopping_each(start, ServeProc.stop)


@pytest.fixture
def raw_ws() -> Iterator[Callable[..., RawWS]]:
    """``raw_ws(url, **kw) -> RawWS``, closed at the end of the test."""
    yield from stopping_each(RawWS, RawWS.close)


@pytest.fixture
def net() -> Iterator[NetHost]:
    """A host serving the uplink route on 127.0.0.1 (``KEYS``), stopped at the end."""
    h = NetHost()
    yield h
    h.stop()


@pytest.fixture(scope="module")
def kernelspecs(tmp_path_factory: pytest.TempPathFactory) -> KernelSpecManager:
    """The ``anvil-nb-test`` kernelspec (this venv's Python), for the kernels of one module."""
    return write_kernelspec(tmp_path_factory.mktemp("kernelspecs"))


@pytest.fixture
def kernels(kernelspecs: KernelSpecManager, tmp_path: Path) -> Iterator[Kernels]:
    """Kernels for one test (shut down after it)."""
    ks = kernels_in(kernelspecs, tmp_path)
    yield ks
    ks.shutdown_all()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[JupyterLab]:
    """A real JupyterLab (only where Chromium can show it), stopped at the end."""
    require_chromium()
    server = JupyterLab(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh user-data-dir."""
    with chromium(tmp_path / "chromium-profile") as context:
        yield context
