"""Values to the wire form ``{json, objects[]}`` and back (PROTOCOL.md §4). No I/O.

:func:`serialise` turns the values of a message (``args``/``kwargs``, ``response``, or a
session's ``session``) into plain JSON plus an ``objects`` list. Each value that JSON cannot
carry is ``null`` in the body and described by an entry ``{"type": [...], "path": [...], ...}``:

============  ==========================================================================
``Long``      ints outside ±2147483647, as a decimal string
``Float``     NaN and ±Infinity
``Date``      ``"2024-01-31"``
``DateTime``  ``"2024-01-31 12:30:05.123456+0100"`` (naive datetimes get the local offset)
``DataMedia`` Media; the bytes travel beside the message, keyed by the entry's ``id``
``Capability`` ``scope``, ``mac`` and (from clients) ``narrow``
``ValueType`` a portable object; the body holds its ``__serialize__`` data
``ClassType`` a portable class itself
``LiveObject``/``LazyMedia`` passed through as received
============  ==========================================================================

A portable object's nested entries come before its own entry, and entries under ``vt_global``
(the data portable classes share through ``SerializationInfo.shared_data``) come first, so a
receiver can apply them in list order. Every crossing copies: the body is built from new
containers, so two references to one dict arrive as two dicts. A cycle, a dict key that is not
a str, an unregistered type or nesting deeper than :data:`MAX_DEPTH` raise
:class:`~anvil_nb.core.errors.SerializationError` naming the path, e.g. ``msg['args'][0].friend``.

:func:`deserialise` rebuilds the values in place in a freshly decoded message. Malformed
entries raise ``SerializationError`` naming the entry; they never raise anything else.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from anvil_nb.core import portable
from anvil_nb.core.capability import Capability
from anvil_nb.core.errors import SerializationError
from anvil_nb.core.liveobject import LiveObjectProxy
from anvil_nb.core.media import BlobMedia, LazyMedia, Media
from anvil_nb.core.portable import SerializationInfo

__all__ = ["MAX_DEPTH", "Encoded", "cache_entry", "deserialise", "format_path", "serialise"]

#: The deepest nesting a value may have. orjson refuses more than 254 levels, and the message
#: itself adds a few, so this keeps every serialisable value sendable.
MAX_DEPTH = 200

_INT_LIMIT = 2147483647  # the real client sends ints beyond ±2**31-1 as Long
_FINITE_MAX = sys.float_info.max
#: The longest Long both sides accept: CPython's default int/str conversion limit.
_LONG_MAX_DIGITS = 4300


def format_path(path: Iterable[Any], attrs: frozenset[int] | set[int] = frozenset()) -> str:
    """``msg['args'][0].friend`` for the path ``["args", 0, "friend"]``.

    Positions in *attrs* are attributes of a portable object and are shown as ``.name``.
    """
    out = ["msg"]
    for i, k in enumerate(path):
        if i in attrs and isinstance(k, str) and k.isidentifier():
            out.append("." + k)
        else:
            out.append(f"[{k!r}]")
    return "".join(out)


def _random_media_id() -> str:
    return secrets.token_urlsafe(8)


class Encoded:
    """The result of :func:`serialise`.

    Attributes
    ----------
    message : dict
        The encoded values under their keys, plus ``objects`` (and ``vt_global`` when used).
    media : list of (str, Media)
        The media to send beside the message, by entry id.
    capabilities : list of Capability
        Every capability in the values, in order (for update handling).
    """

    __slots__ = ("capabilities", "media", "message")

    def __init__(
        self,
        message: dict[str, Any],
        media: list[tuple[str, Media]],
        capabilities: list[Capability],
    ):
        self.message = message
        self.media = media
        self.capabilities = capabilities


class _Encoder:
    __slots__ = (
        "active",
        "attrs",
        "caps",
        "info",
        "lo_methods",
        "media",
        "new_media_id",
        "objects",
        "path",
        "trusted",
    )

    def __init__(self, new_media_id: Callable[[], str], trusted: bool):
        self.objects: list[dict[str, Any]] = []
        self.media: list[tuple[str, Media]] = []
        self.caps: list[Capability] = []
        self.path: list[Any] = []
        self.attrs: set[int] = set()  # path positions that are attributes of a portable object
        self.active: set[int] = set()  # ids of the containers on the current path (cycle check)
        self.info: SerializationInfo | None = None
        self.lo_methods: dict[str, Any] = {}
        self.new_media_id = new_media_id
        self.trusted = trusted

    # -- errors --------------------------------------------------------------------------------
    def fail(
        self, message: str, extra: Any = ..., cause: BaseException | None = None
    ) -> SerializationError:
        path = self.path if extra is ... else [*self.path, extra]
        shown = format_path(path, self.attrs)
        if len(path) > 12:
            shown = format_path(path[:8], self.attrs) + "…" + format_path(path[-3:])[3:]
        err = SerializationError(f"{message} at {shown}")
        if cause is not None:
            err.__cause__ = cause
        return err

    def entry(self, entry: dict[str, Any]) -> None:
        entry["path"] = list(self.path)
        self.objects.append(entry)

    # -- the walk ------------------------------------------------------------------------------
    def enc(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t is str or v is None or t is bool:
            return v
        if t is int:
            if -_INT_LIMIT <= v <= _INT_LIMIT:
                return v
            if v.bit_length() > _LONG_MAX_BITS:
                raise self.fail(f"Cannot serialize an int of more than {_LONG_MAX_DIGITS} digits")
            self.entry({"type": ["Long"], "value": str(v)})
            return None
        if t is float:
            if -_FINITE_MAX <= v <= _FINITE_MAX:
                return v
            self.entry(
                {
                    "type": ["Float"],
                    "value": "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity"),
                }
            )
            return None
        if t is dict or t is list or t is tuple:
            return self.enc_container(v, t is dict, depth)
        return self.enc_other(v, t, depth)

    def enc_container(self, v: Any, is_dict: bool, depth: int) -> Any:
        """A dict, list or tuple (or a subclass): a new container, checked for cycles."""
        if depth >= MAX_DEPTH:
            raise self.fail(f"Cannot serialize a value nested more than {MAX_DEPTH} levels deep")
        key = id(v)
        if key in self.active:
            raise self.fail("Cannot serialize a circular reference")
        self.active.add(key)
        path = self.path
        depth += 1
        if is_dict:
            out: Any = {}
            for k, item in v.items():
                if type(k) is not str:
                    if not isinstance(k, str):
                        raise self.fail(
                            "Cannot serialize dictionaries with keys that aren't strings", k
                        )
                    k = str.__str__(k)  # noqa: PLW2901 - a str subclass travels as its value
                path.append(k)
                out[k] = self.enc(item, depth)
                path.pop()
        else:
            out = []
            for i, item in enumerate(v):
                path.append(i)
                out.append(self.enc(item, depth))
                path.pop()
        self.active.discard(key)
        return out

    def enc_other(self, v: Any, t: type, depth: int) -> Any:
        name = portable.name_of_class(t)
        if name is not None:
            return self.enc_portable(v, t, name, depth)
        entry = self.wire_entry(v)
        if entry is not None:
            self.entry(entry)
            return None
        return self.enc_plain_subclass(v, t, depth)

    def wire_entry(self, v: Any) -> dict[str, Any] | None:
        """The ``objects`` entry of a value that travels as one of the wire's own types."""
        if isinstance(v, dt.datetime):
            return {"type": ["DateTime"], "value": _format_datetime(v)}
        if isinstance(v, dt.date):
            return {"type": ["Date"], "value": f"{v.year:04d}-{v.month:02d}-{v.day:02d}"}
        if isinstance(v, Capability):
            self.caps.append(v)
            entry: dict[str, Any] = {"type": ["Capability"], "scope": v._scope, "mac": v._mac}
            if v._narrow:
                entry["narrow"] = v._narrow
            return entry
        if isinstance(v, LazyMedia):
            return dict(v._spec)
        if isinstance(v, Media):
            media_id = self.new_media_id()
            self.media.append((media_id, v))
            return {
                "type": ["DataMedia"],
                "mime-type": v.content_type,
                "name": v.name,
                "id": media_id,
            }
        if isinstance(v, LiveObjectProxy):
            return v._to_wire(self.lo_methods)
        if isinstance(v, type) and portable.name_of_class(v) is not None:
            return {"type": ["ClassType"], "typeName": portable.name_of_class(v)}
        return None

    def enc_plain_subclass(self, v: Any, t: type, depth: int) -> Any:
        """Subclasses of the plain types (IntEnum, str mix-in enums, namedtuples, ...) and numpy
        scalars and arrays travel as their plain value; anything else is refused.
        """
        if isinstance(v, str):
            return str.__str__(v)
        if isinstance(v, int):
            return self.enc(int.__int__(v), depth)
        if isinstance(v, float):
            return self.enc(float.__float__(v), depth)
        if isinstance(v, dict):  # OrderedDict, defaultdict, ...
            return self.enc_container(v, True, depth)
        if isinstance(v, (list, tuple)):  # namedtuples, list subclasses
            return self.enc_container(v, False, depth)
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(v, (numpy.generic, numpy.ndarray)):
            return self.enc(v.item() if isinstance(v, numpy.generic) else v.tolist(), depth)
        for base in t.__mro__[1:]:
            base_name = portable.name_of_class(base)
            if base_name is not None:
                raise self.fail(
                    f"Cannot serialize {t} object: its base class {base_name!r} is portable, but "
                    f"{t.__qualname__} itself is not registered with @portable_class"
                )
        raise self.fail(f"Cannot serialize {t} object")

    def enc_portable(self, v: Any, t: type, name: str, depth: int) -> Any:
        if depth >= MAX_DEPTH:
            raise self.fail(f"Cannot serialize a value nested more than {MAX_DEPTH} levels deep")
        key = id(v)
        if key in self.active:
            raise self.fail("Cannot serialize a circular reference")
        info = self.info
        if info is None:
            info = self.info = SerializationInfo(remote_is_trusted=self.trusted)
        info._default_key = name
        serialize = getattr(t, "__serialize__", None)
        try:
            data = v.__serialize__(info) if serialize is not None else vars(v)
        except SerializationError:
            raise
        except Exception as exc:
            what = (
                f"{t.__qualname__}.__serialize__ failed"
                if serialize
                else f"{t.__qualname__} has no __dict__"
            )
            raise self.fail(f"Cannot serialize {t} object ({what}: {exc})", cause=exc) from exc
        self.active.add(key)
        position = len(self.path)
        self.attrs.add(position)
        try:
            out = self.enc(data, depth + 1)
        finally:
            self.attrs.discard(position)
            self.active.discard(key)
        self.entry({"type": ["ValueType"], "typeName": name})
        return out


def _format_datetime(v: dt.datetime) -> str:
    offset = v.utcoffset()
    if offset is None:
        offset = v.astimezone().utcoffset() or dt.timedelta(0)
    minutes = int(offset.total_seconds()) // 60
    sign = "+" if minutes >= 0 else "-"
    hh, mm = divmod(abs(minutes), 60)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d} {v.hour:02d}:{v.minute:02d}:{v.second:02d}"
        f".{v.microsecond:06d}{sign}{hh:02d}{mm:02d}"
    )


def serialise(
    values: Mapping[str, Any],
    *,
    remote_is_trusted: bool = False,
    new_media_id: Callable[[], str] = _random_media_id,
) -> Encoded:
    """Encode the values of a message.

    Parameters
    ----------
    values : mapping
        The message's value fields, e.g. ``{"args": [...], "kwargs": {...}}`` or
        ``{"response": x}``; paths in ``objects`` start with these keys.
    remote_is_trusted : bool
        Told to ``__serialize__`` through ``SerializationInfo.remote_is_trusted``.
    new_media_id : callable
        Makes the id of each DataMedia entry.

    Returns
    -------
    Encoded
        The message fields (the encoded values, ``objects`` and perhaps ``vt_global``), the
        media to send and the capabilities found.

    Raises
    ------
    SerializationError
        A value cannot be sent; the message names its path.
    """
    enc = _Encoder(new_media_id, remote_is_trusted)
    message: dict[str, Any] = {}
    path = enc.path
    for key, value in values.items():
        path.append(key)
        message[key] = enc.enc(value, 0)
        path.pop()
    objects = enc.objects
    info = enc.info
    if info is not None and info._tx:
        # Shared data is encoded last (objects may add to it) but its entries go first.
        info._tx_enabled = False
        enc.objects = []
        path.append("vt_global")
        enc.lo_methods = {}  # its entries go first, so they must not rely on the body's
        message["vt_global"] = enc.enc(info._to_wire(), 0)
        path.pop()
        objects = enc.objects + objects
    message["objects"] = objects
    return Encoded(message, enc.media, enc.caps)


# ---------------------------------------------------------------------------------------------
# Decoding


def _parse_date(s: Any) -> dt.date:
    if not isinstance(s, str):
        raise TypeError("not a string")
    return dt.date(int(s[0:4]), int(s[5:7]), int(s[8:10]))


def _parse_datetime(s: Any) -> dt.datetime:
    if not isinstance(s, str) or len(s) < 19:
        raise ValueError("not a datetime string")
    tz = None
    if len(s) > 5 and s[-5] in "+-" and s[-4:].isdigit():
        sign = -1 if s[-5] == "-" else 1
        minutes = sign * (int(s[-4:-2]) * 60 + int(s[-2:]))
        tz = dt.timezone.utc if minutes == 0 else dt.timezone(dt.timedelta(minutes=minutes))
        s = s[:-5]
    micro = int(s[20:26].ljust(6, "0")) if len(s) > 20 else 0
    return dt.datetime(
        int(s[0:4]),
        int(s[5:7]),
        int(s[8:10]),
        int(s[11:13]),
        int(s[14:16]),
        int(s[17:19]),
        micro,
        tz,
    )


def _parse_long(s: Any) -> int:
    if isinstance(s, int) and not isinstance(s, bool):
        return s
    if not isinstance(s, str) or len(s) > _LONG_MAX_DIGITS + 1 or not _LONG_RE.fullmatch(s):
        raise ValueError(f"not a decimal string of at most {_LONG_MAX_DIGITS} digits")
    return int(s)


_LONG_MAX_BITS = int(_LONG_MAX_DIGITS * 3.3219)  # log2(10): a bound below 4300 digits

_LONG_RE = re.compile(r"-?[0-9]+", re.ASCII)

_FLOATS = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


def deserialise(
    message: dict[str, Any],
    *,
    media: Mapping[str, bytes] | None = None,
    remote_is_trusted: bool = True,
    capabilities: list[Capability] | None = None,
    fetch_media: Callable[[dict[str, Any]], Media] | None = None,
    live_call: Callable[..., Any] | None = None,
) -> None:
    """Rebuild, in place, the values of a freshly decoded message.

    Parameters
    ----------
    message : dict
        A decoded message with its ``objects`` list (and perhaps ``vt_global``). It is changed
        in place; ``objects`` and ``vt_global`` are removed.
    media : mapping of str to bytes, optional
        The bytes of each DataMedia entry, by id.
    remote_is_trusted : bool
        Told to ``__deserialize__`` through ``SerializationInfo.remote_is_trusted``.
    capabilities : list, optional
        Every Capability rebuilt is appended to it.
    fetch_media : callable, optional
        How a ``LazyMedia`` rebuilt here fetches its bytes (over the connection it came by):
        ``fetch_media(spec) -> Media``. Without it, ``get_bytes()`` on one raises.
    live_call : callable, optional
        How a live object rebuilt here calls its methods (over the connection it came by):
        ``live_call(spec, method, *args, **kwargs)``. Without it, its methods are not there.

    Raises
    ------
    SerializationError
        An entry is malformed, names an unknown type, or its class cannot rebuild it.
    """
    objects = message.pop("objects", None)
    vt_global = message.pop("vt_global", None)
    if objects is None:
        return
    if not isinstance(objects, list):
        raise SerializationError(f"'objects' must be a list, not {type(objects).__name__}")
    reading = _Reading(fetch_media, live_call)
    if vt_global is not None:
        message["vt_global"] = vt_global  # entries may point into it; removed again below
    try:
        _apply_entries(message, objects, media, remote_is_trusted, capabilities, reading)
    finally:
        message.pop("vt_global", None)


def _apply_entries(
    root: dict[str, Any],
    objects: list[Any],
    media: Mapping[str, bytes] | None,
    remote_is_trusted: bool,
    capabilities: list[Capability] | None,
    reading: _Reading,
) -> SerializationInfo | None:
    infos = _Infos(root, remote_is_trusted)
    for entry in objects:
        types, path = _entry_parts(entry)
        parent, key = _walk(root, path)
        for t in types:
            if not isinstance(t, str):
                continue
            if t in {"ValueType", "ClassType"}:
                parent[key] = _portable_value(t, entry, parent[key], path, infos)
                break
            value = _rebuild_value(t, entry, media, reading, path)
            if value is not _UNKNOWN:
                if capabilities is not None and type(value) is Capability:
                    capabilities.append(value)
                parent[key] = value
                break
        else:
            raise SerializationError(
                f"Cannot accept an object of type {types[0]!r} at {format_path(path)}"
            )
    return infos.main


def _entry_parts(entry: Any) -> tuple[list[Any], list[Any]]:
    """The type list and path of an ``objects`` entry, or a SerializationError."""
    if not isinstance(entry, dict):
        raise SerializationError(
            f"each entry of 'objects' must be a dict, not {type(entry).__name__}"
        )
    types, path = entry.get("type"), entry.get("path")
    if not isinstance(types, list) or not types or not isinstance(path, list) or not path:
        raise SerializationError(
            f"malformed entry in 'objects' (needs a type list and a path): {entry!r:.200}"
        )
    return types, path


class _Infos:
    """The SerializationInfo of a message: one for values inside ``vt_global`` (no
    transmission of shared values from there), and one for the rest, built from ``vt_global``
    once its own entries have been applied (so on first use).
    """

    def __init__(self, root: dict[str, Any], remote_is_trusted: bool):
        self.root, self.trusted = root, remote_is_trusted
        self.shared = SerializationInfo(remote_is_trusted=remote_is_trusted)
        self.shared._tx_enabled = False
        self.main: SerializationInfo | None = None

    def for_path(self, path: list[Any]) -> SerializationInfo:
        if path[0] == "vt_global":
            return self.shared
        if self.main is None:
            self.main = SerializationInfo(
                self.root.get("vt_global"), remote_is_trusted=self.trusted
            )
        return self.main


def _portable_value(
    t: str, entry: dict[str, Any], data: Any, path: list[Any], infos: _Infos
) -> Any:
    """A ``ClassType`` entry's class, or a ``ValueType`` entry's object rebuilt from *data*."""
    name = entry.get("typeName")
    cls = portable.class_for_name(name) if isinstance(name, str) else None
    if cls is None:
        raise SerializationError(
            f"No such portable class: {name!r} at {format_path(path)}; register it with "
            f"@server.portable_class({name!r}) on this side too"
        )
    if t == "ClassType":
        return cls
    info = infos.for_path(path)
    info._default_key = name  # type: ignore[assignment]
    return _rebuild(cls, data, info, path)


_UNKNOWN = object()


def _rebuild_value(
    t: Any,
    entry: dict[str, Any],
    media: Mapping[str, bytes] | None,
    reading: _Reading,
    path: list[Any],
) -> Any:
    reader = _READERS.get(t)
    if reader is None:
        return _UNKNOWN
    try:
        return reader(entry, media, reading)
    except SerializationError:
        raise
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise SerializationError(f"Cannot rebuild a {t} at {format_path(path)}: {exc}") from exc


def _read_capability(entry: dict[str, Any], *_: Any) -> Capability:
    scope, mac, narrow = entry.get("scope"), entry.get("mac"), entry.get("narrow")
    if mac is not None and not isinstance(mac, str):
        raise TypeError("mac must be a string or null")
    return Capability(scope, mac, narrow if narrow else None)


def _read_data_media(entry: dict[str, Any], media: Mapping[str, bytes] | None, *_: Any) -> Any:
    media_id = entry.get("id")
    content = media.get(media_id) if media is not None and isinstance(media_id, str) else None
    if content is None:
        raise KeyError(f"no content arrived for media {media_id!r}")
    return BlobMedia(
        str(entry.get("mime-type") or "application/octet-stream"), content, entry.get("name")
    )


class _Reading:
    """What the readers of one message share: the LiveObject methods seen, the media fetcher."""

    __slots__ = ("fetch_media", "live_call", "lo_methods")

    def __init__(
        self,
        fetch_media: Callable[[dict[str, Any]], Media] | None,
        live_call: Callable[..., Any] | None = None,
    ):
        self.fetch_media = fetch_media
        self.live_call = live_call
        self.lo_methods: dict[str, Any] = {}


#: How each wire type of an ``objects`` entry is read: ``reader(entry, media, reading)``.
_READERS: dict[str, Callable[..., Any]] = {
    "Long": lambda e, *_: _parse_long(e.get("value")),
    "Float": lambda e, *_: _FLOATS[e.get("value")],
    "Date": lambda e, *_: _parse_date(e["value"]) if e.get("value") else None,
    "DateTime": lambda e, *_: _parse_datetime(e["value"]) if e.get("value") else None,
    "Capability": _read_capability,
    "DataMedia": _read_data_media,
    "LazyMedia": lambda e, _media, reading: LazyMedia(e, reading.fetch_media),
    "LiveObject": lambda e, _media, reading: _read_live_object(e, reading),
    "Primitive": lambda e, *_: e.get("value"),
}


def _read_live_object(entry: dict[str, Any], reading: _Reading) -> LiveObjectProxy:
    """A live object, the values of its ``itemCache`` read (each is a typed entry, as the
    real client writes and reads them: ``{"type": ["Primitive"], "value": ...}``).
    """
    cache = entry.get("itemCache")
    items = {}
    if isinstance(cache, dict):
        for key, value in cache.items():
            kinds = value.get("type") if isinstance(value, dict) else None
            reader = next((_READERS[k] for k in kinds or () if k in _READERS), None)
            items[key] = reader(value, None, reading) if reader is not None else value
    proxy = LiveObjectProxy._from_wire(entry, reading.lo_methods, items)
    proxy._call = reading.live_call
    return proxy


def cache_entry(value: Any) -> dict[str, Any]:
    """*value* (JSON scalar or datetime) as a live object's ``itemCache`` holds it."""
    if isinstance(value, dt.datetime):
        return {"type": ["DateTime"], "value": _format_datetime(value)}
    if value is None or isinstance(value, (str, bool, int, float)):
        return {"type": ["Primitive"], "value": value}
    raise SerializationError(f"a live object's item cannot be a {type(value).__name__}")


def _walk(root: dict[str, Any], path: list[Any]) -> tuple[Any, Any]:
    obj: Any = root
    for k in path[:-1]:
        obj = _step(obj, k, path)
    last = path[-1]
    _step(obj, last, path)
    return obj, last


def _step(obj: Any, k: Any, path: list[Any]) -> Any:
    if type(obj) is dict and type(k) is str and k in obj:
        return obj[k]
    if type(obj) is list and type(k) is int and 0 <= k < len(obj):
        return obj[k]
    raise SerializationError(
        f"the path {format_path(path)} of an entry in 'objects' does not lead to a value"
    )


def _rebuild(cls: type, data: Any, info: SerializationInfo, path: list[Any]) -> Any:
    try:
        new_deserialized = getattr(cls, "__new_deserialized__", None)
        if new_deserialized is not None:
            return new_deserialized(data, info)
        obj = cls.__new__(cls)
        deserialize = getattr(cls, "__deserialize__", None)
        if deserialize is not None:
            obj.__deserialize__(data, info)
        elif isinstance(data, dict):
            obj.__dict__.update(data)
        else:
            raise TypeError(f"expected a dict of attributes, got {type(data).__name__}")
        return obj
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(
            f"Cannot rebuild {cls.__qualname__} at {format_path(path)}: {exc}"
        ) from exc
