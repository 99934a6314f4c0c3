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
