"""Shared scaffolding of the test suite: one module per concept, imported by tests and conftest.

* ``waiting``: ``wait_until``, the one bounded poll.
* ``factories``: ``stopping_each``, the body of a fixture that makes things and stops them.
* ``processes``: subprocesses (``Lines``, ``stop_process``, ``start_piped``/``close_piped``,
  ``tail``, ``free_port``) and ``ServeProc``, a real ``anvil-nb serve``.
* ``ws``: ``RawWS``, a raw WebSocket peer.
* ``uplink``: ``install_anvil_uplink``, the real anvil-uplink out of the venv.
* ``wire``: ``assert_same`` and ``cross`` for the wire tests.
* ``nethost``: ``NetHost``, an in-process host behind a real listener, and its ``KEYS``.
* ``kernels``: ``Kernel``/``Kernels``, real ipykernels driven over ZMQ.
* ``jupyter``: ``JupyterProcess``, a Jupyter server application as a subprocess.
* ``browser``: ``JupyterLab``, Debian's Chromium (``chromium``), ``open_and_run_notebook``.
* ``peers``: ``ProviderProc`` and ``CallLoop``, a real host's peers for the reliability suite.

Tests import from those modules (``from support.processes import ServeProc``). The few names
below are re-exported for brevity; the modules that need Jupyter, Playwright or a kernel are
never imported from here, so importing ``support`` stays light.
"""

from support.processes import Lines, ServeProc, free_port, stop_process, tail
from support.uplink import install_anvil_uplink
from support.waiting import wait_until
from support.ws import RawWS

__all__ = [
    "Lines",
    "RawWS",
    "ServeProc",
    "free_port",
    "install_anvil_uplink",
    "stop_process",
    "tail",
    "wait_until",
]
