"""The uplink WebSocket (``_/uplink``): the Anvil uplink protocol over tornado, in front of a host.

The handler only translates: it decodes frames, reassembles media, authenticates the first
frame's key, and hands each complete message to :meth:`Host.receive`; the host's messages go
out through :class:`WebSocketPeer`. The key authenticates, not the ``Origin`` header: the real
client's Origin never matches tornado's default check when the URL has no explicit port
(PROTOCOL.md §1).

Bad input never reaches other connections: a malformed frame, an unknown message type, a chunk
for unknown media or too much buffered media ends *this* connection with a fatal error that
says what was wrong. ``on_message`` is a coroutine, so while the peer is not reading what we
send it, we stop reading from it (backpressure instead of unbounded buffers).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import tornado.websocket

from anvil_nb import protocol
from anvil_nb.errors import ProtocolError
from anvil_nb.host import Host

__all__ = ["BrowserHandler", "Keys", "UplinkHandler", "WebSocketPeer"]

log = logging.getLogger("anvil_nb.uplink")

#: Unflushed writes to a peer after which we stop reading from it until they drain.
MAX_UNFLUSHED_WRITES = 256


@dataclass(frozen=True)
class Keys:
    """The uplink keys of a host: the server key admits trusted uplinks, the client key
    untrusted ones.
    """

    server_key: str
    client_key: str

    @classmethod
    def generate(cls) -> Keys:
        """A fresh pair of random keys."""
        return cls("server_" + secrets.token_urlsafe(18), "client_" + secrets.token_urlsafe(18))

    def kind_of(self, key: Any) -> str | None:
        """``"uplink"`` for the server key, ``"client_uplink"`` for the client key, else ``None``."""
        if not isinstance(key, str):
            return None
        given = key.encode("utf-8", "replace")
        if hmac.compare_digest(given, self.server_key.encode()):
            return "uplink"
        if hmac.compare_digest(given, self.client_key.encode()):
            return "client_uplink"
        return None


class WebSocketPeer:
    """The host's handle on one uplink WebSocket.

    It counts the bytes written that the peer has not read yet (:attr:`queued_bytes`); the
    handler stops reading from a peer while that is over the host's bound, and the host refuses
    its new calls and fails responses that would queue more.
    """

    def __init__(self, handler: UplinkHandler, kind: str, ip: str | None):
        self.name = kind  # the host names it at attach
        self.kind = kind
        self.client: dict[str, Any] = {"type": kind, "ip": ip or ""}
        self._handler = handler
        self.queued_bytes = 0
        self.unflushed = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def send(
        self, data: bytes, media: Mapping[str, bytes] | None = None, request_id: Any = None
    ) -> None:
        """Write an encoded message, then its media, each chunk header right before its chunk."""
        handler = self._handler
        try:
            self._track(handler.write_message(data), len(data))
            if media:
                for header, chunk in protocol.chunk_media(request_id, media):
                    handler.write_message(protocol.encode(header))
                    self._track(handler.write_message(chunk, binary=True), len(chunk))
        except tornado.websocket.WebSocketClosedError:
            log.debug("%s: message dropped, the connection is closed", self.name)

    def _track(self, future: asyncio.Future[None], size: int) -> None:
        if future.done():  # written straight to the socket: the usual case
            future.exception()
            return
        self.unflushed += 1
        self.queued_bytes += size
        if self.unflushed >= MAX_UNFLUSHED_WRITES or self.over_bound():
            self._drained.clear()
        future.add_done_callback(lambda f: self._flushed(f, size))

    def _flushed(self, future: asyncio.Future[None], size: int) -> None:
        if not future.cancelled():
            future.exception()  # retrieve it: a closed connection is handled by on_close
        self.unflushed -= 1
        self.queued_bytes -= size
        if self.unflushed < MAX_UNFLUSHED_WRITES // 2 and not self.over_bound(half=True):
            self._drained.set()

    def over_bound(self, half: bool = False) -> bool:
        """Whether the unread bytes are over the host's bound (or half of it)."""
        bound = self._handler.host.limits.max_queued_bytes
        return self.queued_bytes > (bound // 2 if half else bound)

    @property
    def blocked(self) -> bool:
        """Whether reading from this peer should pause until it has read what it was sent."""
        return not self._drained.is_set()

    async def drained(self) -> None:
        """Wait until the peer has read most of what was written to it."""
        await self._drained.wait()

    def close(self, reason: str) -> None:
        """Close the connection (after a fatal error has been sent)."""
        self._handler.close(1008, reason[:120])


class UplinkHandler(tornado.websocket.WebSocketHandler):
    """``_/uplink``: one connection of an uplink (real ``anvil-uplink`` client or anvil_nb's)."""

    def initialize(self, host: Host, keys: Keys, public: bool = False) -> None:  # noqa: D102
        self.host = host
        self.keys = keys
        self.public = public
        self.peer: WebSocketPeer | None = None
        self.assembler = protocol.MediaAssembler()
        self._closed = False

    def open(self) -> None:  # noqa: D102
        self.set_nodelay(True)  # small frames, request/response: never wait on Nagle

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
        try:
            self._handle(message)
        except ProtocolError as exc:
            self.fatal(str(exc))
        except Exception as exc:
            error_id = secrets.token_hex(4)
            log.exception(
                "%s: internal error %s", self.peer.name if self.peer else "uplink", error_id
            )
            self.fatal(f"Internal error in the host ({error_id}): {type(exc).__name__}")
        peer = self.peer
        if peer is not None and peer.blocked:
            return peer.drained()
        return None

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
                raise ProtocolError(f"unexpected message from an uplink: {str(msg)[:100]}")
            done = self.assembler.message(msg)
        for msg, media in done:
            self.host.receive(self.peer, msg, media)  # type: ignore[arg-type]

    def _handshake(self, msg: dict[str, Any]) -> None:
        version = msg.get("v")
        if not isinstance(version, int) or version < protocol.MIN_PROTOCOL_VERSION:
            self.fatal(protocol.OUTDATED_CLIENT)
            return
        kind = self.keys.kind_of(msg.get("key"))
        if kind is None:
            self.fatal(protocol.BAD_KEY)
            return
        # anvil_nb's kernels join as server modules; only the server key may ask for it.
        if kind == "uplink" and msg.get("kind") == "server_module":
            kind = "server_module"
        self.peer = WebSocketPeer(self, kind, self.request.remote_ip)
        self.host.attach(self.peer)

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
            self.host.receive(self.peer, {"id": held.get("id"), "error": error}, {})  # type: ignore[arg-type]

    def fatal(self, text: str) -> None:
        """Send a fatal error (no ``id``) and close this connection."""
        log.warning("uplink %s: %s", self.peer.name if self.peer else self.request.remote_ip, text)
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(tornado.websocket.WebSocketClosedError):
            self.write_message(protocol.encode(protocol.fatal(text)))
        self.close(1008, text[:120])

    def on_close(self) -> None:  # noqa: D102
        self._closed = True
        if self.peer is not None:
            self.host.detach(self.peer)


class BrowserHandler(UplinkHandler):
    """``_/ws``: a browser's connection. Untrusted; no key and no handshake (PROTOCOL.md §11).

    Where it may be reached from, and by whom, is the placement's decision: standalone it is
    public; inside Jupyter it needs Jupyter's auth unless ``AnvilNB.public`` is set.
    """

    def open(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102, ARG002
        super().open()
        self.peer = WebSocketPeer(self, "browser", self.request.remote_ip)
        self.host.attach(self.peer, greet=False)
