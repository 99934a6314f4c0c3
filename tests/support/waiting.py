"""Waiting for a condition with a bound: the one way tests wait for what they cannot block on.

A test that sleeps to synchronise is a defect: where there is an event, a line or a future to
wait on, a test waits on that; where there is none (a host's state over HTTP, a file, another
thread's stack), it polls with :func:`wait_until`, which always has a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["wait_until"]


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str | None = None,
    *,
    interval: float = 0.02,
    retry: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll *predicate* until it returns something truthy, for at most *timeout* seconds.

    Returns that value. At the deadline it returns ``False`` if *what* is not given (for
    ``assert wait_until(...)`` and ``if wait_until(...)``), and raises ``AssertionError``
    ("timed out after … waiting for *what*", with the last value) if it is. Exceptions of the
    types in *retry* count as "not yet" (the last one is in the message); others propagate.
    *interval* is the pause between polls, not a synchronisation.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except retry as exc:
            last = exc
        if time.monotonic() >= deadline:
            if what is None:
                return False
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)
