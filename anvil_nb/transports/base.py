"""The client side's view of a transport: open, send, close.

A :class:`Transport` carries decoded messages between a :class:`~anvil_nb.client.Client` and
a host. It calls back ``on_message(msg, media)`` for every message that arrives (media are the
bytes of the message's DataMedia entries, by id) and ``on_close(reason)`` once when the
connection ends. Implementations: :mod:`anvil_nb.transports.inprocess` (a host in the same
process); the WebSocket transport speaks the same messages over the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MessageHandler", "Transport"]

MessageHandler = Callable[[dict[str, Any], Mapping[str, bytes]], None]


class Transport(ABC):
    """One connection from a client to a host."""

    @abstractmethod
    def open(self, on_message: MessageHandler, on_close: Callable[[str], None]) -> None:
        """Connect, and deliver what arrives to the callbacks (from any thread)."""

    @abstractmethod
    def send(self, msg: dict[str, Any], media: Mapping[str, bytes] | None = None) -> None:
        """Send one message with the bytes of its media; safe to call from any thread."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection; ``on_close`` is called once."""
