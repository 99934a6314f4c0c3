"""A server function that blocks until the test lets it go: a call held "in flight".

``gate = Gate("late")`` is a callable to register; a call to it sets ``gate.started`` and waits
(at most ``timeout`` seconds) for ``gate.release``, then returns *result*. Tests wait on
``gate.started`` instead of sleeping, and always ``release`` it at the end.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["Gate"]


class Gate:
    """A blocking server function (see the module docstring)."""

    def __init__(self, result: Any = None, timeout: float = 10.0):
        self.result = result
        self.timeout = timeout
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> Any:
        self.started.set()
        self.release.wait(self.timeout)
        return self.result
