"""The client side's view of a transport: open, send, close.

A :class:`Transport` carries decoded messages between a :class:`~anvil_nb.client.client.Client` and
a host. It calls back ``on_message(msg, media)`` for every message that arrives (media are the
bytes of the message's DataMedia entries, by id) and ``on_close(reason)`` each time a
connection ends. Implementations: :mod:`anvil_nb.host.inprocess` (a host in the same
process; it never reconnects); :mod:`anvil_nb.client.websocket` speaks the same messages
over the network and reconnects after any loss, except when the host refused the key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from anvil_nb.core import protocol

__all__ = [
    "KEY_REFUSALS",
    "MessageHandler",
    "Transport",
    "retrieve",
]

MessageHandler = Callable[[dict[str, Any], Mapping[str, bytes]], None]

#: The fatal errors that mean the host refused this connection's key (or protocol version):
#: trying again cannot help, so a client stops reconnecting and every call says so. Any other
#: fatal error ends one connection only.
KEY_REFUSALS = frozenset({protocol.BAD_KEY, protocol.OUTDATED_CLIENT})


class Transport(ABC):
    """One connection from a client to a host."""

    @property
    def name(self) -> str:
        """What errors and logs call the host this transport reaches (e.g. its URL)."""
        return type(self).__name__

    @property
    def reconnects(self) -> bool:
        """Whether a lost connection will be re-established by the transport itself.

        A client waits for the reconnection (up to its ``offline_wait``) before it fails a
        call; for a transport that does not reconnect it fails the call at once.
        """
        return False

    @abstractmethod
    def open(self, on_message: MessageHandler, on_close: Callable[[str], None]) -> None:
        """Connect, and deliver what arrives to the callbacks (from any thread)."""

    @abstractmethod
    def send(self, msg: dict[str, Any], media: Mapping[str, bytes] | None = None) -> None:
        """Send one message with the bytes of its media; safe to call from any thread.

        Raises ``ConnectionError`` when no connection is up (the message was not sent).
        """

    @abstractmethod
    def close(self) -> None:
        """Close the connection for good; ``on_close`` is called once more if it was up."""


def retrieve(future: Any) -> None:
    """Mark a write's outcome as seen, now or when it is done (a write to a closed connection
    fails its future; the connection's reader handles the close, so nothing else needs it).
    """
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.add_done_callback(retrieve)
