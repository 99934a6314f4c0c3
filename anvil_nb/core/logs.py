"""Logging what peers send without letting them write into the log: clipped text, rate limits.

Every string that came from a peer goes through :func:`clip` before it is logged, and warnings
a peer can trigger at will go through a :class:`RateLimiter`, so a flood of bad frames costs one
line per interval, not one per frame.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_LOGGED_CHARS", "RateLimiter", "clip"]

#: The most characters of peer-supplied text that ever reach the log.
MAX_LOGGED_CHARS = 200


def clip(value: Any, limit: int = MAX_LOGGED_CHARS) -> str:
    """*value* as text of at most *limit* characters (``repr`` for non-strings), marked if cut."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}… ({len(text)} chars)"


class RateLimiter:
    """Logs each kind of message at most once per *interval*, then how many were held back.

    ``limiter.warning(logger, key, fmt, *args)`` logs at once the first time *key* is seen in an
    interval; later ones in the same interval are counted, and the next one logged says how many
    were suppressed. At most *max_keys* keys are remembered (a peer cannot grow it).
    """

    def __init__(
        self,
        interval: float = 10.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """``None`` to stay quiet, else how many messages of *key* were suppressed before this."""
        now = self.clock()
        with self._lock:
            last, held = self._seen.get(key, (float("-inf"), 0))
            if now - last < self.interval:
                self._seen[key] = (last, held + 1)
                return None
            if key not in self._seen and len(self._seen) >= self.max_keys:
                self._seen.pop(next(iter(self._seen)))
            self._seen[key] = (now, 0)
            return held

    def log(self, logger: logging.Logger, level: int, key: str, fmt: str, *args: Any) -> None:
        """Log ``fmt % args`` at *level* unless *key* was logged within the interval."""
        held = self.allow(key)
        if held is None:
            return
        if held:
            fmt += " (%d more like this suppressed)"
            args = (*args, held)
        logger.log(level, fmt, *args)

    def warning(self, logger: logging.Logger, key: str, fmt: str, *args: Any) -> None:
        """:meth:`log` at WARNING."""
        self.log(logger, logging.WARNING, key, fmt, *args)
