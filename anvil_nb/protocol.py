"""The Anvil uplink protocol: constants, frame encoding and message shapes. No I/O.

Every text frame is one JSON object (PROTOCOL.md). A frame is a *response* when it has ``id``
and ``response`` or ``error`` and no ``type``; otherwise its ``type`` says what it is
(``CALL``, ``REGISTER``, ``CHUNK_HEADER`` ...). ``{"error": ...}`` without ``id`` is fatal, and
``{"output": ...}`` is printed output. :func:`decode` turns a frame into a dict or raises
:class:`~anvil_nb.errors.ProtocolError` naming what was wrong; :func:`encode` is the inverse.

anvil_nb adds one message of its own, ``{"type": "UNREGISTER", "name": ...}``: the real
protocol has no way to withdraw a registration, which re-running a notebook cell needs. Real
clients never send it.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import orjson

from anvil_nb.errors import ProtocolError, WireError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "decode",
    "encode",
    "error_message",
    "kind_of",
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

Kind = Literal[
    "CALL",
    "LAUNCH_BACKGROUND",
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


class Frame(TypedDict, total=False):
    """The stack frame of a caller: ``{"type": ..., "protocol-version": ...}``."""

    type: str


class CallMessage(TypedDict, total=False):
    """A CALL in either direction (see PROTOCOL.md §3 for every field)."""

    type: Literal["CALL"]
    id: str
    command: str
    args: list[Any]
    kwargs: dict[str, Any]
    objects: list[dict[str, Any]]


class ResponseMessage(TypedDict, total=False):
    """A response: ``id`` plus ``response`` or ``error``; never a ``type``."""

    id: str
    response: Any
    error: WireError
    objects: list[dict[str, Any]]


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
    if t in ("CALL", "LAUNCH_BACKGROUND", "REGISTER", "UNREGISTER", "CHUNK_HEADER", "MEDIA_ERROR"):
        return t  # type: ignore[return-value]
    return "unknown"


def error_message(call_id: Any, error: WireError) -> dict[str, Any]:
    """A response that fails the call *call_id*."""
    return {"id": call_id, "error": error, "objects": []}
