"""The client side of the uplink WebSocket: anvil_nb's own uplink connection.

:class:`WebSocketTransport` connects to a host's ``_/uplink`` with tornado on an I/O thread of
its own, sends the key, and then carries messages both ways (media in 64 KiB chunks, each
chunk header right before its binary frame). ``send`` is safe from any thread: frames are
queued to the I/O loop in order.

When a connection ends, for whatever reason (the host stopped or crashed, the network
dropped, the host sent a fatal error and closed it, a frame from the host was malformed), the
client is told at once (its calls in flight fail) and the transport connects again: after
1 s, then doubling up to 10 s between attempts, until a connection gets the host's ``auth``
(which resets the delay to 1 s and tells the client to register its functions again). The
one exception is a refused key (:data:`~anvil_nb.core.transport.KEY_REFUSALS`): trying again
cannot help, so the transport stops for good and :attr:`WebSocketTransport.refused` says why.

Backpressure: the bytes sent but not yet written to the socket are counted; a thread that sends
while more than ``max_queued_bytes`` wait (a provider answering faster than the host reads)
blocks until half of them are written or the connection ends, so a process never buffers
without bound. The I/O thread itself never blocks.

Cost per message: frames are handled as tornado parses them (a message callback, no queue of
futures in between), and messages sent from other threads wait in one outbox that the I/O loop
drains, so a burst of answers wakes the loop once, not once per answer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

import tornado.httpclient
import tornado.websocket

from anvil_nb.core import protocol
from anvil_nb.core.errors import ProtocolError
from anvil_nb.core.logs import RateLimiter, clip
from anvil_nb.core.transport import KEY_REFUSALS, MessageHandler, Transport, retrieve

__all__ = ["FIRST_RETRY_DELAY", "MAX_RETRY_DELAY", "WebSocketTransport"]

log = logging.getLogger("anvil_nb.transport")

#: Seconds before the first attempt to reconnect; each failed attempt doubles it ...
FIRST_RETRY_DELAY = 1.0
#: ... up to this many seconds.
MAX_RETRY_DELAY = 10.0

_CONNECT_ERRORS = (
    OSError,
    tornado.httpclient.HTTPClientError,
    tornado.websocket.WebSocketError,
    asyncio.TimeoutError,
    concurrent.futures.TimeoutError,
)

_quiet = RateLimiter()


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
    app : str, optional
        The app to join with the host's own server key (a kernel joins its notebook's app).
    reconnect : bool
        Reconnect after the connection drops (unless the host refused the key).
    extra_headers : dict, optional
        Added to the upgrade request.
    connect_timeout : float
        Seconds to wait for the first connection (and for each later attempt).
    max_queued_bytes : int
        Bytes sent but not yet written past which a sending thread waits (see above).
    """

    def __init__(
        self,
        url: str,
        key: str,
        *,
        kind: str | None = None,
        app: str | None = None,
        reconnect: bool = True,
        extra_headers: Mapping[str, str] | None = None,
        connect_timeout: float = 20.0,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
        max_queued_bytes: int = 32 * 1024 * 1024,
    ):
        self.url = url
        self.max_queued_bytes = max_queued_bytes
        self._queued = 0
        self._drained = threading.Condition()
        self._hello = protocol.hello(key, kind, app)
        #: The key this transport says hello with.
        self.key = key
        self.reconnect = reconnect
        self.extra_headers = dict(extra_headers or {})
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        #: The host's fatal error when it refused the key; no more reconnections then.
        self.refused: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="anvil_nb-uplink", daemon=True)
        self._ws: tornado.websocket.WebSocketClientConnection | None = None
        self._on_message: MessageHandler | None = None
        self._on_close: Callable[[str], None] | None = None
        self._closing = False
        self._delay = FIRST_RETRY_DELAY
        self._reader: concurrent.futures.Future[None] | None = None
        #: Messages sent from other threads, in order, for the I/O loop to write (guarded by
        #: ``_drained``); ``_flushing`` says a drain is already scheduled.
        self._outbox: collections.deque[tuple[bytes, Any, Mapping[str, bytes] | None, int]] = (
            collections.deque()
        )
        self._flushing = False
        #: The frames of the current connection, as tornado parses them.
        self._frames: _Frames | None = None

    @property
    def name(self) -> str:
        """The URL this transport connects to."""
        return self.url

    @property
    def connected(self) -> bool:
        """Whether a connection is up now."""
        return self._ws is not None

    @property
    def reconnects(self) -> bool:
        """Whether a lost connection will be re-established (False once closed or refused)."""
        return self.reconnect and self.refused is None and not self._closing

    @property
    def reading(self) -> bool:
        """Whether the I/O thread still reads or reconnects (False once it gave up for good)."""
        return self._reader is not None and not self._reader.done()

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
        except _CONNECT_ERRORS as exc:
            future.cancel()
            self._stop_loop()
            raise ConnectionError(f"Could not connect to {self.url}: {exc}") from exc
        self._reader = asyncio.run_coroutine_threadsafe(self._read_forever(), self._loop)

    def send(self, msg: dict[str, Any], media: Mapping[str, bytes] | None = None) -> None:
        """Queue a message (and its media) for the I/O thread, in order.

        Raises ``ConnectionError`` when no connection is up now (nothing was sent).
        """
        if self._ws is None or self._closing:
            raise ConnectionError(f"not connected to {self.url}")
        data = protocol.encode(msg)
        size = len(data) + (sum(len(m) for m in media.values()) if media else 0)
        with self._drained:
            if threading.current_thread() is not self._thread:
                while self._queued > self.max_queued_bytes and self._ws is not None:
                    self._drained.wait(1.0)  # woken as writes complete or the connection ends
            if self._ws is None or self._closing:  # it ended while we waited
                raise ConnectionError(f"not connected to {self.url}")
            self._queued += size
            self._outbox.append((data, msg.get("id"), media, size))
            if self._flushing:
                return  # a drain is scheduled: it will write this too, in order
            self._flushing = True
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop was closed meanwhile: the transport is closed
            with self._drained:
                self._outbox.clear()
                self._flushing = False
            self._written(size)
            raise ConnectionError(f"not connected to {self.url}") from None

    def close(self) -> None:
        """Close for good: no reconnection; ``on_close`` is called once if a connection was up."""
        if self._closing:
            return
        self._closing = True
        if self._thread.is_alive():
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
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
        frames = _Frames(self)
        ws = await tornado.websocket.websocket_connect(
            request, max_message_size=self.max_frame_bytes, on_message_callback=frames.arrived
        )
        try:
            ws.protocol.set_nodelay(True)  # type: ignore[union-attr] # small frames: never wait on Nagle
            await ws.write_message(protocol.encode(self._hello))
        except BaseException:
            ws.close()
            raise
        if self._closing:
            ws.close()
            raise ConnectionError("the transport was closed while connecting")
        self._ws = ws
        self._frames = frames

    def _flush(self) -> None:
        """Write everything in the outbox (on the I/O thread)."""
        with self._drained:
            items = list(self._outbox)
            self._outbox.clear()
            self._flushing = False
        for item in items:
            self._write(*item)

    def _write(
        self, data: bytes, request_id: Any, media: Mapping[str, bytes] | None, size: int
    ) -> None:
        ws = self._ws
        if ws is None:
            self._written(size)
            return
        try:
            last = ws.write_message(data)
            if media:
                for header, chunk in protocol.chunk_media(request_id, media):
                    retrieve(ws.write_message(protocol.encode(header)))
                    retrieve(last)
                    last = ws.write_message(chunk, binary=True)
        except tornado.websocket.WebSocketClosedError:
            log.debug("write to %s dropped: connection closed", self.url)
            self._written(size)
            return
        if last.done():  # written straight to the socket: the usual case
            retrieve(last)
            self._written(size)
        else:  # writes complete in order: the last one says the whole message is out
            last.add_done_callback(lambda f: (retrieve(f), self._written(size)))

    def _written(self, size: int) -> None:
        with self._drained:
            self._queued -= size
            if self._queued <= self.max_queued_bytes // 2:
                self._drained.notify_all()

    async def _read_forever(self) -> None:
        """Read each connection until it ends, then connect again (see the module docstring)."""
        while not self._closing:
            try:
                reason = await self._read_connection()
            except Exception as exc:  # never let the reader die: that would end reconnection
                log.exception("reading from %s failed", self.url)
                reason = f"internal error while reading: {type(exc).__name__}"
                ws = self._ws
                if ws is not None:
                    ws.close()
            self._ws = None
            with self._drained:
                self._drained.notify_all()  # senders waiting on a full queue: it is gone
            if self._on_close is not None and not self._closing:
                self._on_close(reason)
            if not self.reconnects:
                if self.refused is not None:
                    log.error(
                        "%s refused this connection (%s): not reconnecting",
                        self.url,
                        clip(self.refused),
                    )
                return
            await self._reconnect()

    async def _reconnect(self) -> None:
        """Try to connect until it works (or the transport is closed), backing off."""
        while not self._closing:
            delay = self._delay
            self._delay = min(delay * 2, MAX_RETRY_DELAY)
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self._connect()
            except (*_CONNECT_ERRORS, ConnectionError) as exc:
                _quiet.log(
                    log, logging.INFO, "reconnect:" + self.url,
                    "reconnecting to %s failed: %s (next attempt in %g s)",
                    self.url, clip(str(exc)), self._delay,
                )  # fmt: skip
                continue
            log.debug("connected to %s again; waiting for its answer to the key", self.url)
            return

    async def _read_connection(self) -> str:
        frames = self._frames
        assert frames is not None, "a connection is up"
        return await frames.start()

    def _take(
        self, frame: str | bytes, assembler: protocol.MediaAssembler
    ) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        """The messages a frame completes (noting a new connection's ``auth`` or a refusal)."""
        if isinstance(frame, bytes):
            return assembler.chunk(frame)
        msg = protocol.decode(frame)
        kind = protocol.kind_of(msg)
        if kind == "CHUNK_HEADER":
            assembler.header(msg)
            return []
        if kind == "auth":
            self._delay = FIRST_RETRY_DELAY  # a working connection: back off anew
        elif kind == "fatal" and msg.get("error") in KEY_REFUSALS:
            self.refused = str(msg.get("error"))
        return assembler.message(msg)

    def _deliver(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        if self._on_message is not None:
            try:
                self._on_message(msg, media)
            except Exception:  # a handler's bug must not end the connection's reader
                log.exception("handling a message from %s failed", self.url)

    async def _shutdown(self) -> None:
        ws, self._ws = self._ws, None
        with self._drained:
            self._drained.notify_all()
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


class _Frames:
    """The frames of one connection, handled as tornado parses them (its message callback).

    Frames that arrive before the transport takes the connection (the host's ``auth`` can come
    while the hello is still being written) wait, in order, until :meth:`start`. :meth:`start`
    returns when the connection ends, with the reason.
    """

    def __init__(self, transport: WebSocketTransport):
        self.transport = transport
        self.assembler = protocol.MediaAssembler()
        self.early: list[str | bytes | None] | None = []
        self.ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def arrived(self, frame: str | bytes | None) -> None:
        if self.early is not None:
            self.early.append(frame)
        elif not self.ended.done():
            self._handle(frame)

    async def start(self) -> str:
        early, self.early = self.early or [], None
        for frame in early:
            if self.ended.done():
                break
            self._handle(frame)
        return await self.ended

    def _handle(self, frame: str | bytes | None) -> None:
        t = self.transport
        ws = t._ws
        if frame is None:
            reason = (ws.close_reason if ws is not None else None) or "connection closed"
            if ws is not None:
                ws.close()  # release it on our side too (tornado warns otherwise)
            self.ended.set_result(reason)
            return
        try:
            done = t._take(frame, self.assembler)
        except ProtocolError as exc:
            _quiet.warning(
                log, "bad-frame:" + t.url, "bad frame from %s: %s", t.url, clip(str(exc))
            )
            if ws is not None:
                ws.close(1002, protocol.close_reason(str(exc)))
            self.ended.set_result(str(exc))
            return
        for msg, media in done:
            t._deliver(msg, media)
