"""anvil_nb: Anvil-style server functions, served from Jupyter.

A notebook becomes the server side of an app. Functions become callables, classes become
portable classes, and browsers, HTTP clients and other Python processes (including scripts
that use the real ``anvil-uplink`` client) call them through a host.

The public API lives in :mod:`anvil_nb.server` (it mirrors ``anvil.server``) and
:mod:`anvil_nb.media`. This module only holds the version and the discovery hooks, and
imports nothing heavy, so ``import anvil_nb`` in a kernel stays cheap.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("anvil_nb")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]


def _jupyter_server_extension_points() -> list[dict[str, object]]:
    """The server extension ``anvil_nb`` (imported only when Jupyter asks)."""
    from anvil_nb.jupyter.serverext import AnvilNB  # noqa: PLC0415 - keep `import anvil_nb` light

    return [{"module": "anvil_nb.jupyter.serverext", "app": AnvilNB}]


def load_ipython_extension(ipython: object) -> None:
    """``%load_ext anvil_nb``: join a host (or start one in the kernel) and add the magics."""
    from anvil_nb.jupyter.magics import load  # noqa: PLC0415

    load(ipython)


def unload_ipython_extension(ipython: object) -> None:
    """``%unload_ext anvil_nb``: leave the host; this kernel's registrations go with it."""
    from anvil_nb.jupyter.magics import unload  # noqa: PLC0415

    unload(ipython)
