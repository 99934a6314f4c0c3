"""The client side of the uplink WebSocket: anvil_nb's own uplink connection.

:class:`WebSocketTransport` connects to a host's ``_/uplink`` with the ``websockets`` library
on an asyncio loop in an I/O thread of its own, sends the key, and then carries messages both ways (media in 64 KiB chunks, each
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

Cost per message: ``websockets`` parses frames with less work per frame than tornado's client
(the hot path of a provider and of every caller), and messages sent from other threads wait in
one outbox that the I/O loop drains in one task, so a burst of answers wakes the loop once, not
once per answer. Proxies from the environment are not used (as before): a host is reached
directly.
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

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.protocol import State

from anvil_nb.core import protocol
from anvil_nb.core.errors import ProtocolError
from anvil_nb.core.logs import RateLimiter, clip
from anvil_nb.core.transport import KEY_REFUSALS, MessageHandler, Transport

__all__ = ["FIRST_RETRY_DELAY", "MAX_RETRY_DELAY", "WebSocketTransport"]

log = logging.getLogger("anvil_nb.transport")

#: Seconds before the first attempt to reconnect; each failed attempt doubles it ...
FIRST_RETRY_DELAY = 1.0
#: ... up to this many seconds.
MAX_RETRY_DELAY = 10.0
#: Seconds a closing connection waits for the host's answer to its close frame.
CLOSE_TIMEOUT = 2.0
#: Bytes waiting in a connection's write buffer past which writes wait for it to drain
#: (``websockets``' own default high-water mark).
WRITE_LIMIT = 32 * 1024

_CONNECT_ERRORS = (
    OSError,
    websockets.exceptions.InvalidHandshake,
    websockets.exceptions.InvalidURI,
    asyncio.TimeoutError,
    concurrent.futures.TimeoutError,
)

_quiet = RateLimiter()

_Item = tuple[bytes, Any, "Mapping[str, bytes] | None", int]


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
    label : str, optional
        What this connection is, for people (a notebook's path, a script's name): the host
        shows it beside the connection's name.
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
        label: str | None = None,
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
        self._hello = protocol.hello(key, kind, app, label)
        #: The key this transport says hello with.
        self.key = key
        self.reconnect = reconnect
        self.extra_headers = dict(extra_headers or {})
        self.connect_timeout = connect_timeout
        self.max_frame_bytes = max_frame_bytes
        #: The host's fatal error when it refused the key; no more reconnections then.
        self.refused: str | None = None
        self._loop, self._thread = _io_loop()
        self._ws: ClientConnection | None = None
        self._on_message: MessageHandler | None = None
        self._on_close: Callable[[str], None] | None = None
        self._closing = False
        self._delay = FIRST_RETRY_DELAY
        self._reader: asyncio.Task[None] | None = None
        #: Messages sent from other threads, in order, for the I/O loop to write (guarded by
        #: ``_drained``); ``_flushing`` says a writer task has them in hand.
        self._outbox: collections.deque[_Item] = collections.deque()
        self._flushing = False
        self._writer: asyncio.Task[None] | None = None

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

    # -- Transport ---------------------------------------------------------------------------
    def open(self, on_message: MessageHandler, on_close: Callable[[str], None]) -> None:
        """Connect (raising ``ConnectionError`` if the host cannot be reached) and start reading."""
        self._on_message, self._on_close = on_message, on_close
        future = asyncio.run_coroutine_threadsafe(self._connect(), self._loop)
        try:
            future.result(self.connect_timeout + 5)
        except _CONNECT_ERRORS as exc:
            future.cancel()
            self._closing = True
            raise ConnectionError(f"Could not connect to {self.url}: {exc}") from exc
        self._reader = asyncio.run_coroutine_threadsafe(self._start_reading(), self._loop).result(5)

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
                return  # the writer has the outbox in hand: it writes this too, in order
            self._flushing = True
        try:
            self._loop.call_soon_threadsafe(self._start_writer)
        except RuntimeError:  # the loop was closed meanwhile: the transport is closed
            self._drop_outbox()
            raise ConnectionError(f"not connected to {self.url}") from None

    def close(self) -> None:
        """Close for good: no reconnection; ``on_close`` is called once if a connection was up."""
        if self._closing:
            return
        self._closing = True
        done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        if threading.current_thread() is not self._thread:
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                done.result(10)

    # -- I/O thread --------------------------------------------------------------------------
    async def _connect(self) -> None:
        ws = await connect(
            self.url,
            additional_headers=self.extra_headers,
            open_timeout=self.connect_timeout,
            max_size=self.max_frame_bytes,
            compression=None,
            proxy=None,
            ping_interval=None,  # the host pings: its keep-alive finds a dead connection
            close_timeout=CLOSE_TIMEOUT,
            write_limit=WRITE_LIMIT,
            max_queue=None,  # the client reads as fast as frames come; it bounds what it sends
        )
        try:
            await ws.send(protocol.encode(self._hello), text=True)
        except BaseException:
            await _close(ws)
            raise
        if self._closing:
            await _close(ws)
            raise ConnectionError("the transport was closed while connecting")
        self._ws = ws

    async def _start_reading(self) -> asyncio.Task[None]:
        return self._loop.create_task(self._read_forever())

    def _start_writer(self) -> None:
        """Write the outbox: at once while the connection takes it (the usual case: no task,
        no waiting), the rest (media, or a connection whose buffer is full) in a task that
        waits for the socket to drain.
        """
        ws = self._ws
        while True:
            with self._drained:
                if not self._outbox:
                    self._flushing = False
                    return
                data, _, media, size = self._outbox[0]
                if media or not _takes_more(ws):
                    break
                self._outbox.popleft()
            try:
                ws.protocol.send_text(data)  # type: ignore[union-attr]
                ws.send_data()  # type: ignore[union-attr]
            except (websockets.exceptions.WebSocketException, OSError) as exc:
                log.debug("write to %s dropped: %s", self.url, exc)
            self._written(size)
        self._writer = self._loop.create_task(self._write_outbox())

    async def _write_outbox(self) -> None:
        """Write the outbox until it is empty (one task per burst of sends)."""
        while True:
            with self._drained:
                if not self._outbox:
                    self._flushing = False
                    return
                item = self._outbox.popleft()
            await self._write(*item)

    async def _write(
        self, data: bytes, request_id: Any, media: Mapping[str, bytes] | None, size: int
    ) -> None:
        ws = self._ws
        try:
            if ws is not None:
                await ws.send(data, text=True)
                if media:
                    for header, chunk in protocol.chunk_media(request_id, media):
                        await ws.send(protocol.encode(header), text=True)
                        await ws.send(chunk)
        except websockets.exceptions.ConnectionClosed:
            log.debug("write to %s dropped: connection closed", self.url)
        finally:
            self._written(size)

    def _written(self, size: int) -> None:
        with self._drained:
            self._queued -= size
            if self._queued <= self.max_queued_bytes // 2:
                self._drained.notify_all()

    def _drop_outbox(self) -> None:
        with self._drained:
            dropped = sum(item[3] for item in self._outbox)
            self._outbox.clear()
            self._flushing = False
            self._queued -= dropped
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
                    await _close(ws)
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
        ws = self._ws
        assert ws is not None, "a connection is up"
        assembler = protocol.MediaAssembler()
        try:
            async for frame in ws:
                try:
                    done = self._take(frame, assembler)
                except ProtocolError as exc:
                    _quiet.warning(
                        log, "bad-frame:" + self.url, "bad frame from %s: %s", self.url,
                        clip(str(exc)),
                    )  # fmt: skip
                    await _close(ws, 1002, protocol.close_reason(str(exc)))
                    return str(exc)
                for msg, media in done:
                    self._deliver(msg, media)
        except websockets.exceptions.ConnectionClosed:
            pass
        return ws.close_reason or "connection closed"

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
        self._drop_outbox()
        tasks = [t for t in (self._writer, self._reader) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if ws is not None:
            await _close(ws)
        if ws is not None and self._on_close is not None:
            self._on_close("closed by client")
            self._on_close = None
        for task in tasks:  # let them end before the loop stops
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


_io_lock = threading.Lock()
_io: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None


def _io_loop() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """The I/O loop of this process's uplink connections, and its thread (started on first use).

    One loop serves every connection: a process with many clients has one I/O thread, not one
    per connection, so their frames are read in one pass and their writes share its wake-ups.
    Nothing on it blocks: incoming calls go to each client's worker pool.
    """
    global _io
    with _io_lock:
        if _io is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(
                target=_run_loop, args=(loop,), name="anvil_nb-uplink", daemon=True
            )
            thread.start()
            _io = (loop, thread)
        return _io


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _takes_more(ws: ClientConnection | None) -> bool:
    """Whether *ws* is open and its write buffer below the limit (a write would not wait)."""
    return (
        ws is not None
        and ws.protocol.state is State.OPEN
        and ws.transport.get_write_buffer_size() < WRITE_LIMIT
    )


async def _close(ws: ClientConnection, code: int = 1000, reason: str = "") -> None:
    """Close *ws*, at most :data:`CLOSE_TIMEOUT` seconds: a host that reads nothing (its
    buffers full) cannot take the close frame, so then the connection is dropped.
    """
    try:
        await asyncio.wait_for(ws.close(code, reason), CLOSE_TIMEOUT)
    except (asyncio.TimeoutError, OSError):
        ws.transport.abort()
