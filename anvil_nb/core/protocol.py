"""The Anvil uplink protocol: constants, frame encoding and message shapes. No I/O.

Every text frame is one JSON object (PROTOCOL.md). A frame is a *response* when it has ``id``
and ``response`` or ``error`` and no ``type``; otherwise its ``type`` says what it is
(``CALL``, ``REGISTER``, ``CHUNK_HEADER`` ...). ``{"error": ...}`` without ``id`` is fatal, and
``{"output": ...}`` is printed output. :func:`decode` turns a frame into a dict or raises
:class:`~anvil_nb.core.errors.ProtocolError` naming what was wrong; :func:`encode` is the inverse.

anvil_nb adds one message of its own, ``{"type": "UNREGISTER", "name": ...}``: the real
protocol has no way to withdraw a registration, which re-running a notebook cell needs. Real
clients never send it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal, get_args

import orjson

from anvil_nb.core.errors import ProtocolError, WireError

__all__ = [
    "CALL_ROOTS",
    "CHUNK_SIZE",
    "DEFAULT_MAX_FRAME_BYTES",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "RESPONSE_ROOTS",
    "SESSION_ROOTS",
    "MediaAssembler",
    "auth",
    "call",
    "check_objects",
    "chunk_media",
    "close_reason",
    "decode",
    "encode",
    "error_message",
    "events",
    "fatal",
    "hello",
    "kind_of",
    "register",
    "response",
    "unregister",
    "wire_error",
]

#: The protocol version anvil_nb speaks (anvil-uplink 0.7.0). Never change without a reason.
PROTOCOL_VERSION = 8
#: Clients older than this are refused, as the App Server does.
MIN_PROTOCOL_VERSION = 5
#: The largest frame accepted, as on the App Server; larger data goes as Media.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

OUTDATED_CLIENT = (
    "You are using an outdated version of the uplink library. "
    "Please use 'pip install --upgrade anvil-uplink' to get a new one."
)
BAD_KEY = "Incorrect uplink key"
CLIENT_REGISTER = (
    "Cannot register @anvil.server.callable functions from an unprivileged (client) uplink."
)
BAD_NAME = "Invalid function name specification"
CONNECTION_LOST = "Connection to Anvil Uplink server lost"

#: What a decoded message is; the upper-case kinds are the ones a frame names in its ``type``.
Kind = Literal[
    "EVENT",
    "CALL",
    "LAUNCH_BACKGROUND",
    "GET_TASK_STATE",
    "KILL_TASK",
    "REGISTER",
    "UNREGISTER",
    "CHUNK_HEADER",
    "MEDIA_ERROR",
    "response",
    "output",
    "fatal",
    "auth",
    "unknown",
]


def decode(frame: str | bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse one text frame.

    Raises
    ------
    ProtocolError
        The frame is not JSON, or not a JSON object.
    """
    try:
        msg = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON in frame: {exc}") from exc
    if type(msg) is not dict:
        raise ProtocolError(f"a frame must be a JSON object, not {type(msg).__name__}")
    return msg


def encode(msg: dict[str, Any]) -> bytes:
    """Serialise one message to the bytes of a text frame.

    Raises
    ------
    ProtocolError
        The message holds something JSON cannot carry (values should have been serialised).
    """
    try:
        return orjson.dumps(msg)
    except TypeError as exc:
        raise ProtocolError(f"message cannot be encoded as JSON: {exc}") from exc


#: The message kinds a frame names in its ``type`` field.
_TYPED_KINDS = frozenset(k for k in get_args(Kind) if k.isupper())


def kind_of(msg: dict[str, Any]) -> Kind:
    """What a decoded message is."""
    t = msg.get("type")
    if t is None:
        if "id" in msg and ("response" in msg or "error" in msg):
            return "response"
        if "output" in msg:
            return "output"
        if "auth" in msg:
            return "auth"
        if "error" in msg:
            return "fatal"
        return "unknown"
    if type(t) is str and t in _TYPED_KINDS:
        return t  # type: ignore[return-value]
    return "unknown"


def close_reason(text: str) -> str:
    """*text* cut to fit a WebSocket close frame (at most 123 bytes of UTF-8)."""
    return text.encode("utf-8")[:123].decode("utf-8", "ignore")


# ---------------------------------------------------------------------------------------------
# Message shapes: every message anvil_nb sends is built here.


def hello(
    key: str, kind: str | None = None, app: str | None = None, label: str | None = None
) -> dict[str, Any]:
    """The first message of an uplink: its key, and anvil_nb's extensions: ``kind`` (a kernel
    joins as ``server_module``), ``app`` (the app that the host's own server key joins) and
    ``label`` (what the connection is, for people: a notebook's path, a script's name).
    """
    msg: dict[str, Any] = {"key": key, "v": PROTOCOL_VERSION}
    if kind is not None:
        msg["kind"] = kind
    if app is not None:
        msg["app"] = app
    if label is not None:
        msg["label"] = label
    return msg


#: The longest peer label the host keeps.
MAX_LABEL = 120


def peer_label(value: Any) -> str | None:
    """A peer's ``label`` as the host keeps it: printable text, at most :data:`MAX_LABEL`
    characters; anything else is no label.
    """
    if not isinstance(value, str):
        return None
    text = "".join(c for c in value if c.isprintable())[:MAX_LABEL].strip()
    return text or None


def auth(priv: str, app_info: dict[str, Any]) -> dict[str, Any]:
    """The host's answer to a good key."""
    return {"auth": "OK", "priv": priv, "app-info": app_info}


def fatal(text: str) -> dict[str, Any]:
    """A fatal error: the connection closes after it."""
    return {"error": text}


def register(name: str) -> dict[str, Any]:
    """Serve *name* (a full-match regex) from this connection."""
    return {"type": "REGISTER", "name": name}


def unregister(name: str) -> dict[str, Any]:
    """anvil_nb's extension: stop serving *name*."""
    return {"type": "UNREGISTER", "name": name}


def events(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """anvil_nb's extension: host events (:func:`anvil_nb.core.events.to_wire`) pushed to a
    peer that watches its app (``anvil.private.watch_events``).
    """
    return {"type": "EVENT", "events": bodies}


def call(
    call_id: Any,
    command: str,
    args: list[Any],
    kwargs: dict[str, Any],
    objects: list[Any],
    *,
    call_stack_id: Any = None,
    vt_global: Any = None,
    session_data: dict[str, Any] | None = None,
    call_stack: list[dict[str, Any]] | None = None,
    client: dict[str, Any] | None = None,
    session_id: str | None = None,
    app_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A CALL. The host adds *call_stack*, *client*, the session and *app_info*; a caller adds
    *call_stack_id* when it calls from inside a call it serves.
    """
    msg: dict[str, Any] = {
        "type": "CALL",
        "id": call_id,
        "command": command,
        "args": args,
        "kwargs": kwargs,
        "objects": objects,
    }
    optional = (
        ("call-stack-id", call_stack_id),
        ("vt_global", vt_global),
        ("call-stack", call_stack),
        ("client", client),
        ("sessionData", session_data),
        ("session-id", session_id),
        ("app-info", app_info),
    )
    msg.update((key, value) for key, value in optional if value is not None)
    return msg


def response(
    call_id: Any,
    value: Any,
    objects: list[Any],
    *,
    vt_global: Any = None,
    session_data: dict[str, Any] | None = None,
    cap_updates: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A successful response to the call *call_id*."""
    msg: dict[str, Any] = {"id": call_id, "response": value, "objects": objects}
    if vt_global is not None:
        msg["vt_global"] = vt_global
    if session_data is not None:
        msg["sessionData"] = session_data
    if cap_updates:
        msg["capUpdates"] = cap_updates
    return msg


def error_message(call_id: Any, error: WireError) -> dict[str, Any]:
    """A response that fails the call *call_id*."""
    return {"id": call_id, "error": error, "objects": []}


#: Longest error message and trace relayed from a peer; longer ones are cut.
MAX_ERROR_MESSAGE = 64 * 1024
MAX_TRACE_FRAMES = 100


def wire_error(error: Any) -> WireError:
    """A clean copy of a peer's error description: ``type``, ``message`` and ``trace`` only.

    Whatever else the peer put in is dropped; a message that is not a string is turned into one,
    and the trace keeps only well-formed ``[file, line]`` frames.
    """
    if not isinstance(error, dict):
        return {"message": _text(error)}
    out: WireError = {"message": _text(error.get("message"))}
    kind = error.get("type")
    if isinstance(kind, str) and kind:
        out["type"] = kind[:200]
    trace = error.get("trace")
    if isinstance(trace, list):
        out["trace"] = [
            [f[0][:500], f[1]]
            for f in trace[:MAX_TRACE_FRAMES]
            if type(f) is list and len(f) == 2 and isinstance(f[0], str) and type(f[1]) is int
        ]
    return out


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else ("" if value is None else str(value)[:1000])
    return text if len(text) <= MAX_ERROR_MESSAGE else text[:MAX_ERROR_MESSAGE] + "…"


# ---------------------------------------------------------------------------------------------
# Where the entries of an ``objects`` list may point (DESIGN.md, "The host builds every message")

#: A caller's entries describe its arguments; a response's, its value; a session blob's, the
#: session. ``vt_global`` holds what portable classes share, in any message.
CALL_ROOTS = frozenset({"args", "kwargs", "vt_global"})
RESPONSE_ROOTS = frozenset({"response", "vt_global"})
SESSION_ROOTS = frozenset({"session"})

#: The deepest path an entry may have (serialised values nest at most 200 levels).
MAX_PATH_LENGTH = 256


def check_objects(objects: Any, roots: frozenset[str], where: str = "msg") -> list[dict[str, Any]]:
    """The entries of an ``objects`` list, each checked to lie inside one of *roots*.

    Receivers apply entries by walking their path from the message root, so an entry outside
    the values it describes could rewrite anything else in the message (the session, the call
    stack, the client). No message is ever relayed or applied with such an entry.

    Raises
    ------
    ProtocolError
        ``objects`` is not a list, or an entry is not a dict with a well-formed ``path`` whose
        first key is one of *roots*; the message names the entry's path.
    """
    if objects is None:
        return []
    if type(objects) is not list:
        raise ProtocolError(f"{where}['objects'] must be a list, not {type(objects).__name__}")
    for i, entry in enumerate(objects):
        if type(entry) is not dict:
            raise ProtocolError(f"{where}['objects'][{i}] must be an object")
        kinds = entry.get("type")
        if type(kinds) is not list or not all(type(k) is str for k in kinds):
            raise ProtocolError(f"{where}['objects'][{i}] needs a 'type' list of names")
        path = entry.get("path")
        if type(path) is not list or not path or len(path) > MAX_PATH_LENGTH:
            raise ProtocolError(f"{where}['objects'][{i}] needs a non-empty 'path' list")
        for key in path:
            if type(key) is not str and type(key) is not int:
                raise ProtocolError(
                    f"{where}['objects'][{i}] has a path key that is neither a string nor an "
                    f"integer: {_path_text(path)}"
                )
        if path[0] not in roots:
            allowed = " or ".join(sorted(roots))
            raise ProtocolError(
                f"an object at path {_path_text(path)} lies outside {allowed}: refused "
                "(an entry may only describe the values it travels with)"
            )
    return objects


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _path_text(path: list[Any]) -> str:
    text = "".join(f"[{k!r}]" for k in path[:12]) + ("…" if len(path) > 12 else "")
    return text if len(text) <= 200 else text[:199] + "…"


# ---------------------------------------------------------------------------------------------
# Media streaming (PROTOCOL.md §5)

#: Bytes per binary frame when anvil_nb sends media (the real client's size).
CHUNK_SIZE = 65536


def media_ids(msg: dict[str, Any]) -> list[str]:
    """The ids of the DataMedia entries of a message, whose bytes follow it in chunks."""
    objects = msg.get("objects")
    if not objects or type(objects) is not list:
        return []
    return [o["id"] for o in objects if _is_data_media(o) and isinstance(o.get("id"), str)]


def _is_data_media(entry: Any) -> bool:
    """Whether an ``objects`` entry is a DataMedia (its ``type`` a list of names, or a name);
    anything else a peer puts there (numbers, dicts) is not.
    """
    if type(entry) is not dict:
        return False
    t = entry.get("type")
    return t == "DataMedia" if type(t) is str else type(t) is list and "DataMedia" in t


def chunk_media(
    request_id: Any, media: Mapping[str, bytes], size: int = CHUNK_SIZE
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The ``CHUNK_HEADER`` and binary frame pairs that carry *media* after message *request_id*.

    Every media gets at least one chunk (an empty one for no bytes), the last marked ``lastChunk``.
    """
    for media_id, data in media.items():
        view = memoryview(data)
        n = max(1, -(-len(view) // size))
        for i in range(n):
            chunk = bytes(view[i * size : (i + 1) * size])
            header = {
                "type": "CHUNK_HEADER",
                "requestId": request_id,
                "mediaId": media_id,
                "chunkIndex": i,
                "lastChunk": i == n - 1,
            }
            yield header, chunk


class MediaAssembler:
    """Holds each message until the bytes of all its media have arrived. No I/O.

    Feed it every decoded text message with :meth:`message`, every ``CHUNK_HEADER`` with
    :meth:`header` and every binary frame with :meth:`chunk`; each returns the messages that
    are now complete, as ``(msg, media)`` pairs, in the order they completed.

    Parameters
    ----------
    max_bytes : int
        The most media bytes held at once; more is a :class:`ProtocolError` (the sender must
        not make the receiver buffer without bound).
    """

    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._held: dict[Any, tuple[dict[str, Any], dict[str, list[bytes] | bytes], set[str]]] = {}
        self._next: dict[str, Any] | None = None
        self._bytes = 0

    @property
    def waiting(self) -> int:
        """How many messages are waiting for media."""
        return len(self._held)

    def message(self, msg: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        """A message arrived: returned at once unless it has media to wait for."""
        ids = media_ids(msg)
        if not ids:
            return [(msg, {})]
        key = msg.get("id")
        if type(key) is not str and type(key) is not int:
            raise ProtocolError("a message with media needs a string 'id'")
        if key in self._held:
            raise ProtocolError(
                f"message id {_clip(key)} reused while its media are still arriving"
            )
        self._held[key] = (msg, {i: [] for i in ids}, set(ids))
        return []

    def header(self, header: dict[str, Any]) -> None:
        """A ``CHUNK_HEADER``: the next binary frame belongs to it."""
        if self._next is not None:
            raise ProtocolError("CHUNK_HEADER without the binary frame of the previous one")
        request_id = header.get("requestId")
        held = self._held.get(request_id) if type(request_id) in (str, int) else None
        media_id = header.get("mediaId")
        if held is None or type(media_id) is not str or media_id not in held[2]:
            raise ProtocolError(
                f"chunk for unknown media {_clip(media_id)} of request {_clip(request_id)}"
            )
        self._next = header

    def chunk(self, data: bytes) -> list[tuple[dict[str, Any], dict[str, bytes]]]:
        """A binary frame, the content announced by the last header."""
        header, self._next = self._next, None
        if header is None:
            raise ProtocolError("binary frame without a CHUNK_HEADER before it")
        key = header["requestId"]
        msg, parts, missing = self._held[key]
        media_id = header["mediaId"]
        self._bytes += len(data)
        if self._bytes > self.max_bytes:
            raise ProtocolError(f"more than {self.max_bytes} bytes of media are arriving at once")
        pieces = parts[media_id]
        assert isinstance(pieces, list)
        pieces.append(data)
        if not header.get("lastChunk"):
            return []
        parts[media_id] = b"".join(pieces)
        missing.discard(media_id)
        if missing:
            return []
        del self._held[key]
        media = {k: v for k, v in parts.items() if isinstance(v, bytes)}
        self._bytes -= sum(len(v) for v in media.values())
        return [(msg, media)]

    def failed(self, error: dict[str, Any]) -> dict[str, Any] | None:
        """A ``MEDIA_ERROR``: drop the waiting message and return it (``None`` if unknown)."""
        request_id = error.get("requestId")
        held = self._held.pop(request_id, None) if type(request_id) in (str, int) else None
        if held is None:
            return None
        self._bytes -= sum(
            len(b) for p in held[1].values() for b in (p if isinstance(p, list) else [p])
        )
        return held[0]
