"""Output printed inside a server function, captured per call.

In a kernel, ``sys.stdout`` belongs to whichever cell is running; a callable running on a
worker thread would print into that cell. :func:`install` wraps ``sys.stdout`` and
``sys.stderr`` so that writes made while a call is being served go to that call's buffer
(a ``contextvars`` variable, so it follows the call across threads it runs on and asyncio
tasks it starts), and every other write goes where it went before.
"""

from __future__ import annotations

import io
import sys
from contextvars import ContextVar
from typing import Any, TextIO

__all__ = ["install", "start_capture", "uninstall"]

_buffer: ContextVar[io.StringIO | None] = ContextVar("anvil_nb_call_output", default=None)


class _CallOutput(io.TextIOBase):
    """A stream that writes to the current call's buffer, or else to the stream it wraps."""

    def __init__(self, stream: TextIO):
        self.wrapped = stream

    def write(self, s: str) -> int:
        buffer = _buffer.get()
        if buffer is not None:
            return buffer.write(s)
        return self.wrapped.write(s)

    def flush(self) -> None:
        if _buffer.get() is None:
            self.wrapped.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def install() -> None:
    """Capture output of calls from now on (idempotent)."""
    if not isinstance(sys.stdout, _CallOutput):
        sys.stdout = _CallOutput(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, _CallOutput):
        sys.stderr = _CallOutput(sys.stderr)  # type: ignore[assignment]


def uninstall() -> None:
    """Put the original streams back."""
    if isinstance(sys.stdout, _CallOutput):
        sys.stdout = sys.stdout.wrapped  # type: ignore[assignment]
    if isinstance(sys.stderr, _CallOutput):
        sys.stderr = sys.stderr.wrapped  # type: ignore[assignment]


def start_capture() -> io.StringIO:
    """Send this context's output to a new buffer (call it in the call's own context)."""
    buffer = io.StringIO()
    _buffer.set(buffer)
    return buffer
