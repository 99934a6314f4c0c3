"""A host in this process, and the transport that connects a client to it.

:class:`HostThread` runs a :class:`~anvil_nb.host.dispatcher.Host` on its own asyncio loop in a daemon
thread; this is the embedded placement, and what ``server.call`` starts when there is no host.

:class:`InProcessTransport` encodes every message to JSON bytes and decodes it on the other
side, exactly as a WebSocket would, so the in-process path exercises the same protocol code and
nothing is shared between caller and callee. It can connect as any caller type, which is how
tests play a browser or a client uplink without a network.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from anvil_nb.core import protocol
from anvil_nb.core.errors import AnvilError
from anvil_nb.core.transport import MessageHandler, Transport
from anvil_nb.host.dispatcher import Host

__all__ = ["HostThread", "InProcessTransport"]

log = logging.getLogger("anvil_nb.transport")
T = TypeVar("T")


class HostThread:
    """A host running on an event loop in a background thread.

    Parameters
    ----------
    host : callable, optional
        Builds the host; called on the loop's thread (default: ``Host()``).
    """

    def __init__(self, host: Callable[[], Host] = Host):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="anvil_nb-host", daemon=True)
        self._thread.start()
        self.host: Host = self.run(host)
        #: Called on the host's thread by :meth:`stop` instead of ``host.close()`` (whoever put
        #: the host on the network sets it, so the listener stops too).
        self.on_stop: Callable[[], None] | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        """Run ``fn(*args)`` on the host's thread and return its result."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(call)
        return future.result(timeout)

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the host's thread soon, without waiting."""
        self.loop.call_soon_threadsafe(fn, *args)

    def connect(self, kind: str = "server_module", ip: str = "127.0.0.1") -> InProcessTransport:
        """A transport to this host, connecting as a peer of that caller type."""
        return InProcessTransport(self, kind=kind, ip=ip)

    def stop(self) -> None:
        """Disconnect every peer and stop the loop."""
        if not self.loop.is_closed() and self._thread.is_alive():
            self.run(self._close_all)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def _close_all(self) -> None:
        if self.on_stop is not None:
            self.on_stop()  # e.g. the listener and the housekeeping, then the host
        else:
            self.host.close()


class _Peer:
    """The host's side of an in-process connection."""

    #: Delivered at once: nothing waits to be read.
    queued_bytes = 0

    def __init__(self, transport: InProcessTransport, kind: str, ip: str):
        self.name = kind  # the host names it at attach
        self.kind = kind
        self.client: dict[str, Any] = {"type": kind, "ip": ip}
        self._transport = transport

    def send(
        self,
        data: bytes,
        media: Mapping[str, bytes] | None = None,
        request_id: Any = None,  # noqa: ARG002 - media travel beside the message here
    ) -> None:
        self._transport._deliver(data, media or {})

    def close(self, reason: str) -> None:
        self._transport._closed_by_host(reason)


class InProcessTransport(Transport):
    """Connects a client to a :class:`HostThread` in the same process."""

    def __init__(self, host_thread: HostThread, kind: str = "server_module", ip: str = "127.0.0.1"):
        self._ht = host_thread
        self._peer = _Peer(self, kind, ip)
        self._on_message: MessageHandler | None = None
        self._on_close: Callable[[str], None] | None = None
        self._open = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The peer name the host knows this connection by."""
        return self._peer.name

    def open(self, on_message: MessageHandler, on_close: Callable[[str], None]) -> None:  # noqa: D102
        self._on_message, self._on_close = on_message, on_close
        self._open = True
        self._ht.run(self._ht.host.attach, self._peer)

    def send(self, msg: dict[str, Any], media: Mapping[str, bytes] | None = None) -> None:  # noqa: D102
        if not self._open:
            raise ConnectionError("the connection to the in-process host is closed")
        data = protocol.encode(msg)
        self._ht.submit(self._receive_on_host, data, dict(media) if media else None)

    def _receive_on_host(self, data: bytes, media: dict[str, bytes] | None) -> None:
        if not self._open:
            return
        try:
            self._ht.host.receive(self._peer, protocol.decode(data), media)
        except AnvilError as exc:
            log.warning("%s: %s", self._peer.name, exc)
            self._peer.send(protocol.encode(protocol.fatal(str(exc))))
            self._closed_by_host(str(exc))

    def _deliver(self, data: bytes, media: Mapping[str, bytes]) -> None:
        handler = self._on_message
        if self._open and handler is not None:
            handler(protocol.decode(data), media)

    def _closed_by_host(self, reason: str) -> None:
        with self._lock:
            was_open, self._open = self._open, False
        if was_open:
            self._ht.submit(self._ht.host.detach, self._peer)
            if self._on_close is not None:
                self._on_close(reason)

    def close(self) -> None:  # noqa: D102
        self._closed_by_host("closed by client")
