"""The uplink WebSocket (``_/uplink``): the Anvil uplink protocol over tornado, in front of a host.

The handler only translates: it decodes frames, reassembles media, authenticates the first
frame's key, and hands each complete message to :meth:`Host.receive`; the host's messages go
out through :class:`WebSocketPeer`. The key authenticates, not the ``Origin`` header: the real
client's Origin never matches tornado's default check when the URL has no explicit port
(PROTOCOL.md §1).

Bad input never reaches other connections: a malformed frame, an unknown message type, a chunk
for unknown media or too much buffered media ends *this* connection with a fatal error that
says what was wrong. While the peer is not reading what we send it, ``on_message`` returns a
future that tornado waits for before it reads the next frame: we stop reading from that peer
(backpressure instead of unbounded buffers). What one connection may cost (frame size, time to
say hello, keep-alive, unread bytes) comes from the host's :class:`~anvil_nb.core.limits.Limits`;
peer-supplied text reaches the log clipped, and warnings a peer can trigger at will are
rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import traceback
import weakref
from collections.abc import Awaitable, Mapping
from typing import Any

import tornado.web
import tornado.websocket
from tornado.ioloop import IOLoop

from anvil_nb.config import DEFAULT_APP, KeyRing, Keys, app_name
from anvil_nb.core import protocol
from anvil_nb.core.errors import ProtocolError
from anvil_nb.core.logs import RateLimiter, clip
from anvil_nb.core.transport import retrieve
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.endpoints import cookie_name, door_of
from anvil_nb.web.api import app_exists, app_root

__all__ = ["BrowserHandler", "Keys", "UplinkHandler", "WebSocketPeer"]

log = logging.getLogger("anvil_nb.uplink")

#: Unflushed writes to a peer after which we stop reading from it until they drain.
MAX_UNFLUSHED_WRITES = 256
#: Seconds a connection we closed has to answer the close handshake before its socket goes.
CLOSE_GRACE = 1.0
#: Characters of a fatal error's text sent to the peer at most.
MAX_FATAL_CHARS = 500

_limiters: weakref.WeakKeyDictionary[Host, RateLimiter] = weakref.WeakKeyDictionary()


def _quiet(host: Host) -> RateLimiter:
    """The transport's rate limiter for warnings about *host*'s connections."""
    limiter = _limiters.get(host)
    if limiter is None:
        limiter = _limiters[host] = RateLimiter(host.limits.log_interval)
    return limiter


class WebSocketPeer:
    """The host's handle on one uplink WebSocket.

    It counts the bytes written that the peer has not read yet (:attr:`queued_bytes`: tornado's
    write futures resolve once their bytes are handed to the kernel, so this is what waits in
    the host's own memory). While that is over the host's bound (or too many writes wait), the
    handler stops reading from the peer, and the host refuses its new calls and fails responses
    that would queue more.
    """

    def __init__(self, handler: UplinkHandler, kind: str, ip: str | None):
        self.name = kind  # the host names it at attach
        self.kind = kind
        #: What the connection says it is (a notebook's path, a script's name), or None.
        self.label: str | None = None
        self.client: dict[str, Any] = {"type": kind, "ip": ip or ""}
        self._handler = handler
        #: Bytes written and not yet flushed to the socket, and how many writes.
        self.queued_bytes = 0
        self.unflushed = 0
        #: Bytes flushed so far (the keep-alive's evidence that a busy peer is reading).
        self.flushed_bytes = 0
        self._blocked = False
        self._waiter: asyncio.Future[None] | None = None

    def send(
        self, data: bytes, media: Mapping[str, bytes] | None = None, request_id: Any = None
    ) -> None:
        """Write an encoded message, then its media, each chunk header right before its chunk."""
        try:
            self._write(data)
            if media:
                for header, chunk in protocol.chunk_media(request_id, media):
                    self._write(protocol.encode(header))
                    self._write(chunk, binary=True)
        except tornado.websocket.WebSocketClosedError:
            log.debug("%s: message dropped, the connection is closed", self.name)

    def _write(self, data: bytes, binary: bool = False) -> None:
        handler = self._handler
        future = handler.write_message(data, binary=binary)
        size = len(data)
        stream = handler.ws_connection.stream if handler.ws_connection else None
        if stream is not None and not stream.writing():
            # Handed to the kernel at once, the usual case: nothing waits in the host, so
            # there is nothing to count (and no callback to run when tornado's task ends).
            self.flushed_bytes += size
            return
        self.unflushed += 1
        self.queued_bytes += size
        if self.unflushed >= MAX_UNFLUSHED_WRITES or self.over_bound():
            self._blocked = True
        future.add_done_callback(functools.partial(self._flushed, size))

    def _flushed(self, size: int, future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # retrieve it: a closed connection is handled by on_close
        self.unflushed -= 1
        self.queued_bytes -= size
        self.flushed_bytes += size
        drained = self.unflushed < MAX_UNFLUSHED_WRITES // 2 and not self.over_bound(half=True)
        if self._blocked and drained:
            self.unblock()

    def over_bound(self, half: bool = False) -> bool:
        """Whether the unread bytes are over the host's bound (or half of it)."""
        bound = self._handler.host.limits.max_queued_bytes
        return self.queued_bytes > (bound // 2 if half else bound)

    @property
    def blocked(self) -> bool:
        """Whether reading from this peer should pause until it has read what it was sent."""
        return self._blocked

    def drained(self) -> asyncio.Future[None]:
        """A future that resolves once the peer has read most of what was written to it (or
        the connection has ended).

        A plain future, not a task: at shutdown nothing cancels it under tornado's read loop.
        """
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
            if not self._blocked:
                self._waiter.set_result(None)
        return self._waiter

    def unblock(self) -> None:
        """Let reading resume (the peer drained, or the connection is gone)."""
        self._blocked = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self, reason: str) -> None:
        """Close the connection (after a fatal error has been sent)."""
        self._handler.close_after_fatal(reason)


def _describe(msg: dict[str, Any]) -> str:
    """A short description of a message for errors and logs (never its whole content)."""
    keys = ", ".join(clip(k, 30) for k in list(msg)[:8])
    more = f" and {len(msg) - 8} more" if len(msg) > 8 else ""
    return f"type {clip(msg.get('type'), 40)}, keys {keys}{more}"


class UplinkHandler(tornado.websocket.WebSocketHandler):
    """``_/uplink``: one connection of an uplink (real ``anvil-uplink`` client or anvil_nb's).

    What one connection may cost is bounded by the host's :class:`~anvil_nb.core.limits.Limits`,
    read here rather than from tornado's application settings (so every placement, Jupyter's
    too, applies the same ones):

    * ``max_frame_bytes``: a larger frame closes the connection (tornado's message limit);
    * ``handshake_timeout``: a connection without a valid hello by then gets a fatal error and
      is closed;
    * ``ping_interval`` / ``ping_timeout``: the keep-alive. A ping goes out ``ping_interval``
      seconds after the last answer; a peer that within ``ping_timeout`` neither answers it
      (pong), nor sends a frame, nor reads any of what is waiting for it, is declared lost at
      once: it is detached (its callers get ``UplinkDisconnectedError``) and its socket
      closed. A frozen peer is thus found within ``ping_interval + ping_timeout`` seconds.
      (tornado's own pinging caps the timeout at the interval and detaches only after a
      further 5 s wait for a close handshake that a frozen peer never answers: not used.)
    * ``max_queued_bytes``: see :class:`WebSocketPeer`.
    """

    def initialize(self, host: Host, keys: Keys | KeyRing, public: bool = False) -> None:  # noqa: D102
        self.host = host
        #: The keys of every app of the host; the key a peer says hello with selects its app.
        self.keyring = KeyRing.of(keys)
        self.keys = self.keyring.default
        self.public = public
        self.peer: WebSocketPeer | None = None
        self.assembler = protocol.MediaAssembler()
        self._closed = False
        self._timers: list[object] = []
        self._keep_alive_task: asyncio.Task[None] | None = None
        self._pong: asyncio.Future[None] | None = None
        self._stream: Any = None
        self._received_bytes = 0

    @property
    def max_message_size(self) -> int:  # type: ignore[override]
        """The host's frame limit (larger frames close the connection)."""
        return self.host.limits.max_frame_bytes

    @property
    def ping_interval(self) -> float | None:  # type: ignore[override]
        """0: tornado sends no pings; this handler's own keep-alive does (see the class)."""
        return 0

    @property
    def ping_timeout(self) -> float | None:  # type: ignore[override]  # noqa: D102
        return 0

    def open(self) -> None:  # noqa: D102
        self.set_nodelay(True)  # small frames, request/response: never wait on Nagle
        # Kept to drop the socket at once: handler.close() forgets the connection, and tornado
        # then waits 5 s for the peer's half of the close handshake.
        self._stream = self.ws_connection.stream  # type: ignore[union-attr]
        limits = self.host.limits
        if self.peer is None and limits.handshake_timeout > 0:
            self._later(limits.handshake_timeout, self._handshake_expired)
        if limits.ping_interval > 0:
            self._keep_alive_task = asyncio.ensure_future(self._keep_alive())

    def _later(self, delay: float, callback: Any) -> None:
        self._timers.append(IOLoop.current().call_later(delay, callback))

    def check_origin(self, origin: str) -> bool:  # noqa: ARG002
        """Accept any Origin: the uplink key authenticates."""
        return True

    def get_compression_options(self) -> None:
        """No compression (the real client supports none)."""

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:
        """Handle one frame; while the peer is not reading, return a future to pause reading.

        A plain method, not a coroutine: tornado then makes no task per frame, and it still
        waits for what we return before it reads the next frame.
        """
        if self._closed:
            return None
        self._received_bytes += len(message)
        try:
            self._handle(message)
        except ProtocolError as exc:
            self.fatal(str(exc), key="protocol")
        except Exception as exc:
            self._internal_error(exc)
        peer = self.peer
        if peer is not None and peer.blocked and not self._closed:
            return peer.drained()
        return None

    def _internal_error(self, exc: Exception) -> None:
        error_id = secrets.token_hex(4)
        if _quiet(self.host).allow("internal") is not None:
            trace = "".join(traceback.format_tb(exc.__traceback__))
            log.error(
                "%s: internal error %s: %s\n%s", self._who(), error_id, clip(repr(exc)), trace
            )
        self.fatal(f"Internal error in the host ({error_id}): {type(exc).__name__}", key="internal")

    def _who(self) -> str:
        return self.peer.name if self.peer else f"uplink from {self.request.remote_ip}"

    def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            done = self.assembler.chunk(message)
        else:
            msg = protocol.decode(message)
            if self.peer is None:
                self._handshake(msg)
                return
            kind = protocol.kind_of(msg)
            if kind == "CHUNK_HEADER":
                self.assembler.header(msg)
                return
            if kind == "MEDIA_ERROR":
                self._media_error(msg)
                return
            if msg.get("type") == "LOG" and self.peer.kind == "browser":  # console output: ignored
                return
            if msg.get("type") == "REGISTER_LIVE_OBJECT_BACKEND":  # refused, as by the App Server
                raise ProtocolError("Cannot register live-object backends the uplink.")
            if kind in ("unknown", "auth", "fatal", "output", "LAUNCH_BACKGROUND"):
                raise ProtocolError(f"unexpected message from an uplink ({_describe(msg)})")
            done = self.assembler.message(msg)
        for msg, media in done:
            self.host.receive(self.peer, msg, media)  # type: ignore[arg-type]

    def _handshake(self, msg: dict[str, Any]) -> None:
        version = msg.get("v")
        if not isinstance(version, int) or version < protocol.MIN_PROTOCOL_VERSION:
            self.fatal(protocol.OUTDATED_CLIENT, key="handshake")
            return
        found = self.keyring.identify(msg.get("key"))
        if found is None:
            self.fatal(protocol.BAD_KEY, key="handshake")
            return
        app, kind = found
        # anvil_nb's kernels join as server modules; only a server key may ask for it. The
        # host's own server key (default's) may join any app by name, made on first use.
        if kind == "uplink" and msg.get("kind") == "server_module":
            kind = "server_module"
        wanted = msg.get("app")
        if wanted is not None and kind != "client_uplink" and app == DEFAULT_APP:
            try:
                app = app_name(wanted) if isinstance(wanted, str) else app_name("")
            except ValueError as exc:
                self.fatal(f"Invalid app name: {exc}", key="handshake")
                return
            self.keyring.keys(app)  # the app exists from now on, with keys of its own
        keys, state = self.keyring.keys(app), self.host.app(app)
        state.server_key, state.client_key = keys.server_key, keys.client_key
        self.peer = WebSocketPeer(self, kind, self.request.remote_ip)
        self.peer.label = protocol.peer_label(msg.get("label"))
        self.host.attach(self.peer, app=app)

    def _handshake_expired(self) -> None:
        if self.peer is not None or self._closed:
            return
        timeout = self.host.limits.handshake_timeout
        self.fatal(f"No valid hello (uplink key) within {timeout:g} s", key="handshake-timeout")
        self._abort()  # it never spoke: nothing it sends now matters

    def _media_error(self, msg: dict[str, Any]) -> None:
        held = self.assembler.failed(msg)
        if held is None:
            return
        cause = msg.get("cause") if isinstance(msg.get("cause"), dict) else {}
        error = protocol.wire_error(
            {
                "type": cause.get("type", "anvil.server.InternalError"),
                "message": cause.get("message", "Media transfer failed"),
            }
        )
        if protocol.kind_of(held) == "CALL":
            self.peer.send(protocol.encode(protocol.error_message(held.get("id"), error)))  # type: ignore[union-attr]
        else:
            self.host.receive(self.peer, protocol.error_message(held.get("id"), error), {})  # type: ignore[arg-type]

    def fatal(self, text: str, key: str = "fatal") -> None:
        """Send a fatal error (no ``id``) and close this connection.

        Logged clipped and rate-limited per *key* (a peer can trigger these at will).
        """
        _quiet(self.host).warning(log, "fatal:" + key, "%s: %s", self._who(), clip(text))
        if self._closed:
            return
        text = clip(text, MAX_FATAL_CHARS)
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            retrieve(self.write_message(protocol.encode(protocol.fatal(text))))
        self.close_after_fatal(text)

    def close_after_fatal(self, reason: str) -> None:
        """Close with *reason*; the socket goes after a short grace for the close handshake."""
        self._closed = True
        self._stop_keep_alive()
        if self.peer is not None:
            self.peer.unblock()
        self.close(1008, protocol.close_reason(reason))
        self._later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        """Close the socket now (no close handshake)."""
        self._closed = True
        if self.peer is not None:
            self.peer.unblock()
        if self._stream is not None:
            self._stream.close()  # tornado's read loop ends, then on_close runs

    # -----------------------------------------------------------------------------------------
    # Keep-alive

    def on_pong(self, data: bytes) -> None:  # noqa: ARG002, D102
        if self._pong is not None and not self._pong.done():
            self._pong.set_result(None)

    async def _keep_alive(self) -> None:
        limits = self.host.limits
        interval, timeout = limits.ping_interval, limits.ping_timeout
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(interval)
            peer = self.peer
            received = self._received_bytes
            backlog = peer.queued_bytes if peer is not None else 0
            flushed = peer.flushed_bytes if peer is not None else 0
            self._pong = pong = loop.create_future()
            try:
                self.ping()
            except tornado.websocket.WebSocketClosedError:
                return
            if timeout <= 0:
                continue
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(pong, timeout)
                continue
            # Its pong may wait behind frames we have not read yet: frames read since the ping
            # show it is alive, and so do bytes it read of a backlog (we pause reading while
            # it is behind, so then its frames and pongs wait).
            if self._received_bytes > received:
                continue
            peer = self.peer
            if peer is not None and peer.flushed_bytes > flushed and (backlog or peer.blocked):
                continue
            self._lost(f"no answer to a ping within {timeout:g} s")
            return

    def _lost(self, reason: str) -> None:
        """Declare the peer lost now: detach it (its callers fail at once) and drop the socket."""
        if self._closed:
            return
        _quiet(self.host).warning(log, "lost", "%s: %s; connection closed", self._who(), reason)
        self._closed = True
        self._stop_keep_alive()
        if self.peer is not None:
            self.host.detach(self.peer)
        with contextlib.suppress(Exception):
            self.close(1001, protocol.close_reason(reason))
        self._abort()

    def _stop_keep_alive(self) -> None:
        task, self._keep_alive_task = self._keep_alive_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def on_close(self) -> None:  # noqa: D102
        self._closed = True
        loop = IOLoop.current()
        for timer in self._timers:
            loop.remove_timeout(timer)
        self._timers.clear()
        self._stop_keep_alive()
        if self.peer is not None:
            self.peer.unblock()
            self.host.detach(self.peer)


class BrowserHandler(UplinkHandler):
    """``_/ws``: a browser's connection. Untrusted; no key and no handshake (PROTOCOL.md §11).

    Where it may be reached from, and by whom, is the placement's decision: standalone it is
    public; inside Jupyter it needs Jupyter's auth unless ``AnvilNB.public`` is set.
    """

    def prepare(self) -> Awaitable[None] | None:
        """A 404 before the upgrade for an app route naming an app the host does not have;
        then the browser's cookie session (a new one, and its cookie, if it has none).
        """
        app = self.path_args[0] if self.path_args else DEFAULT_APP
        if not app_exists(self.host, self.keyring, app):
            raise tornado.web.HTTPError(404, f"no app named {app!r}")
        client = {"type": "browser", "ip": self.request.remote_ip or ""}
        record, cookie = door_of(self.host).browser_session(
            app, self.get_cookie(cookie_name(app)), client
        )
        self._session_id = record.id
        if cookie is not None:  # sent with the 101 response
            self.set_cookie(
                cookie_name(app), cookie, path=app_root(self.request.path, "_/ws"),
                httponly=True, samesite="Lax", secure=self.request.protocol == "https",
            )  # fmt: skip
        return super().prepare()  # Jupyter's handlers authenticate here

    def check_origin(self, origin: str) -> bool:
        """Only pages of the host's own origin (the App Server answers others 403): the
        connection carries the browser's cookie session.
        """
        return tornado.websocket.WebSocketHandler.check_origin(self, origin)

    def open(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102, ARG002
        self.peer = WebSocketPeer(self, "browser", self.request.remote_ip)  # no hello to wait for
        super().open()
        app = args[0] if args else DEFAULT_APP
        self.host.attach(self.peer, greet=False, app=app, session_id=self._session_id)
