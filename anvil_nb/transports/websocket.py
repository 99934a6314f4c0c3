"""The client side of the uplink WebSocket: anvil_nb's own uplink connection.

:class:`WebSocketTransport` connects to a host's ``_/uplink`` with tornado on an I/O thread of
its own, sends the key, and then carries messages both ways (media in 64 KiB chunks, each
chunk header right before its binary frame). ``send`` is safe from any thread: frames are
queued to the I/O loop in order.

When the connection drops, calls in flight fail at once and the transport reconnects, after
1 s and then with backoff up to 10 s; the host's ``auth`` message on the new connection tells
the client to register its functions again. A fatal error (a wrong key) stops it for good.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import tornado.httpclient
import tornado.websocket

from anvil_nb import protocol
from anvil_nb.errors import ProtocolError
from anvil_nb.transports.base import MessageHandler, Transport

__all__ = ["WebSocketTransport"]

log = logging.getLogger("anvil_nb.transport")


class WebSocketTransport(Transport):
    """An uplink connection to ``url`` with ``key``.

    Parameters
    ----------
    url : str
        The host's uplink URL, e.g. ``ws://127.0.0.1:3030/_/uplink``.
    key : str
        The server key (a trusted uplink) or the client key (an untrusted one).
    kind : str, optional
        ``"server_module"`` to join as a kernel would (server key only).
    reconnect : bool
        Reconnect after the connection drops.
    extra_headers : dict, optional
        Added to the upgrade request.
    connect_timeout : float
        Seconds to wait for the first connection.
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        kind: str | None = None,
        reconnect: bool = True,
        extra_headers: Mapping[str, str] | None = None,
        connect_timeout: float = 20.0,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
    ):
        self.url = url
        self._hello: dict[str, Any] = {"key": key, "v": protocol.PROTOCOL_VERSION}
        if kind is not None:
            self._hello["kind"] = kind
        self.reconnect = reconnect
        self.extra_headers = dict(extra_headers or {})
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="anvil_nb-uplink", daemon=True)
        self._ws: tornado.websocket.WebSocketClientConnection | None = None
        self._on_message: MessageHandler | None = None
        self._on_close: Callable[[str], None] | None = None
        self._closing = False
        self._fatal = False
        self._reader: concurrent.futures.Future[None] | None = None

    @property
    def name(self) -> str:
        """The URL this transport connects to."""
        return self.url

    @property
    def connected(self) -> bool:
        """Whether a connection is up now."""
        return self._ws is not None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    # -- Transport ---------------------------------------------------------------------------
    def open(self, on_message: MessageHandler, on_close: Callable[[str], None]) -> None:
        """Connect (raising ``ConnectionError`` if the host cannot be reached) and start reading."""
        self._on_message, self._on_close = on_message, on_close
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)
        try:
            future.result(self.connect_timeout + 5)
        except (
            OSError,
            tornado.httpclient.HTTPClientError,
            concurrent.futures.TimeoutError,
        ) as exc:
            self._stop_loop()
            raise ConnectionError(f"Could not connect to {self.url}: {exc}") from exc
        self._reader = asyncio.run_coroutine_threadsafe(self._read_forever(), self._loop)

    def send(self, msg: dict[str, Any], media: Mapping[str, bytes] | None = None) -> None:
        """Queue a message (and its media) for the I/O thread, in order."""
        if self._ws is None or self._closing:
            raise ConnectionError(f"not connected to {self.url}")
        data = protocol.encode(msg)
        self._loop.call_soon_threadsafe(self._write, data, msg.get("id"), media)

    def close(self) -> None:
        """Close for good: no reconnection; ``on_close`` is called once."""
        if self._closing:
            return
        self._closing = True
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._stop_loop()

    # -- I/O thread --------------------------------------------------------------------------
    async def _connect(self) -> None:
        request = tornado.httpclient.HTTPRequest(
            self.url,
            headers=self.extra_headers,
            connect_timeout=self.connect_timeout,
            request_timeout=self.connect_timeout,
        )
        ws = await tornado.websocket.websocket_connect(
            request, max_message_size=self.max_frame_bytes
        )
        ws.protocol.set_nodelay(True)  # type: ignore[union-attr] # small frames: never wait on Nagle
        await ws.write_message(protocol.encode(self._hello))
        self._ws = ws

    def _write(self, data: bytes, request_id: Any, media: Mapping[str, bytes] | None) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            ws.write_message(data)
            if media:
                for header, chunk in protocol.chunk_media(request_id, media):
                    ws.write_message(protocol.encode(header))
                    ws.write_message(chunk, binary=True)
        except tornado.websocket.WebSocketClosedError:
            log.debug("write to %s dropped: connection closed", self.url)

    async def _read_forever(self) -> None:
        delay = 1.0
        while not self._closing:
            reason = await self._read_connection()
            self._ws = None
            if self._on_close is not None and not self._closing:
                self._on_close(reason)
            if self._closing or self._fatal or not self.reconnect:
                return
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                    delay = 1.0
                    log.info("reconnected to %s", self.url)
                    break
                except (OSError, tornado.httpclient.HTTPClientError, asyncio.TimeoutError) as exc:
                    log.info("reconnecting to %s failed: %s", self.url, exc)
                    delay = min(delay * 2, 10.0)

    async def _read_connection(self) -> str:
        ws = self._ws
        assert ws is not None
        assembler = protocol.MediaAssembler()
        while True:
            frame = await ws.read_message()
            if frame is None:
                reason = ws.close_reason or "connection closed"
                ws.close()  # release it on our side too (tornado warns otherwise)
                return reason
            try:
                if isinstance(frame, bytes):
                    done = assembler.chunk(frame)
                else:
                    msg = protocol.decode(frame)
                    kind = protocol.kind_of(msg)
                    if kind == "CHUNK_HEADER":
                        assembler.header(msg)
                        continue
                    if kind == "fatal":
                        self._fatal = True
                    done = assembler.message(msg)
            except ProtocolError as exc:
                log.warning("bad frame from %s: %s", self.url, exc)
                ws.close(1002, str(exc)[:120])
                return str(exc)
            for msg, media in done:
                if self._on_message is not None:
                    self._on_message(msg, media)

    async def _shutdown(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()
        if self._reader is not None:
            self._reader.cancel()
        if ws is not None and self._on_close is not None:
            self._on_close("closed by client")
            self._on_close = None

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(10)
