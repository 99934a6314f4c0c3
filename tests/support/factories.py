"""Factory fixtures: a test makes as many things as it wants, and every one is stopped after it.

``yield from stopping_each(make, stop)`` is the body of such a fixture: the test gets a callable
that passes its arguments to *make* and keeps what it returns; at teardown each kept thing is
given to *stop*, in the order made.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

__all__ = ["stopping_each"]

T = TypeVar("T")


def stopping_each(
    make: Callable[..., T], stop: Callable[[T], object]
) -> Iterator[Callable[..., T]]:
    """Yield a callable like *make* that keeps what it makes; then *stop* each of those."""
    made: list[T] = []

    def keep(*args: Any, **kw: Any) -> T:
        thing = make(*args, **kw)
        made.append(thing)
        return thing

    yield keep
    for thing in made:
        stop(thing)
