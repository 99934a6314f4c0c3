"""Portable classes: classes whose instances travel between peers as real objects.

``@portable_class`` registers a class under ``module.Name`` (or under a unique name given as
``@portable_class("my.Name")``); both sides of a call must register it under the same name.
An instance is sent as its ``__serialize__(info)`` result (default: its ``__dict__``) and rebuilt
on the other side with ``__new_deserialized__(data, info)`` if the class has one, else by
``__new__`` followed by ``__deserialize__(data, info)`` (default: updating ``__dict__``).
``__init__`` is not called on the receiving side.

Registering a new class under a name that is already taken replaces the old one: re-running a
notebook cell re-registers its classes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar, overload

__all__ = ["SerializationInfo", "class_for_name", "name_of_class", "portable_class"]

T = TypeVar("T", bound=type)

_lock = threading.Lock()
# Wire names; never change the meaning of a registered name: both sides look classes up by it.
_by_name: dict[str, type] = {}
_by_class: dict[type, str] = {}


@overload
def portable_class(cls: T, name: str | None = None) -> T: ...
@overload
def portable_class(cls: str | None = None, name: None = None) -> Callable[[T], T]: ...


def portable_class(cls: Any = None, name: str | None = None) -> Any:
    """Register a class so that its instances (and the class itself) can be sent and received.

    Use it as ``@portable_class``, ``@portable_class("unique.Name")`` or
    ``portable_class(cls, "unique.Name")``.

    Parameters
    ----------
    cls : type or str, optional
        The class, or the unique name when used as ``@portable_class("name")``.
    name : str, optional
        The name the class travels under. Default: ``cls.__module__ + "." + cls.__qualname__``.

    Returns
    -------
    type
        The class itself, unchanged apart from being registered.
    """
    if cls is None or isinstance(cls, str):
        unique = cls

        def decorate(c: T) -> T:
            return _register(c, unique)

        return decorate
    return _register(cls, name)


def _register(cls: Any, name: str | None) -> Any:
    if not isinstance(cls, type):
        raise TypeError(f"portable_class needs a class, not {type(cls).__name__}")
    if name is None:
        name = f"{cls.__module__}.{cls.__qualname__}"
    elif not isinstance(name, str) or not name:
        raise TypeError(f"The name of a portable class must be a non-empty str, not {name!r}")
    with _lock:
        old_cls = _by_name.get(name)
        if old_cls is not None and old_cls is not cls:
            _by_class.pop(old_cls, None)
        old_name = _by_class.get(cls)
        if old_name is not None and old_name != name:
            _by_name.pop(old_name, None)
        _by_name[name] = cls
        _by_class[cls] = name
    return cls


def unregister(name: str) -> None:
    """Forget the portable class registered under *name* (no error if there is none)."""
    with _lock:
        cls = _by_name.pop(name, None)
        if cls is not None:
            _by_class.pop(cls, None)


def class_for_name(name: str) -> type | None:
    """The class registered under *name*, or ``None``."""
    return _by_name.get(name)


def name_of_class(cls: type) -> str | None:
    """The name *cls* is registered under, or ``None`` (subclasses are not registered)."""
    return _by_class.get(cls)


def registered_names() -> dict[str, type]:
    """A snapshot of every registered name and its class."""
    with _lock:
        return dict(_by_name)


class SerializationInfo:
    """What ``__serialize__`` / ``__deserialize__`` are told about the transfer.

    ``shared_data(key)`` returns ``(transmitted, local)``: *transmitted* is a dict that is sent
    once per message (``vt_global`` on the wire) and shared by every object of the message;
    *local* stays on this side. Inside the shared data itself, *transmitted* is ``None``.
    """

    __slots__ = ("_default_key", "_local", "_trusted", "_tx", "_tx_enabled", "local_is_trusted")

    def __init__(
        self, vt_global: Any = None, remote_is_trusted: bool = False, local_is_trusted: bool = True
    ):
        self._tx: dict[str, Any] = {}
        self._local: dict[str, Any] = {}
        self._default_key: str | None = None
        self._tx_enabled = True
        self._trusted = remote_is_trusted
        #: Whether the code running here is trusted (server side).
        self.local_is_trusted = local_is_trusted
        if isinstance(vt_global, dict):
            self._tx[":GLOBAL"] = vt_global
        elif isinstance(vt_global, list):
            it = iter(vt_global)
            for k, v in zip(it, it, strict=False):
                self._tx[str(k)] = v

    @property
    def remote_is_trusted(self) -> bool:
        """Whether the other side of this transfer is trusted server code."""
        return self._trusted

    def shared_data(
        self,
        key: Any = None,
        transmitted_data_factory: Callable[[], Any] = dict,
        local_data_factory: Callable[[], Any] = dict,
    ) -> tuple[Any, Any]:
        """Return ``(transmitted, local)`` shared data for *key* (default: the class's name)."""
        if key is None:
            k = self._default_key
        elif isinstance(key, type):
            k = name_of_class(key) or f"{key.__module__}.{key.__qualname__}"
        else:
            k = ":" + str(key)
        if k is None:
            k = ":GLOBAL"
        local = self._local.get(k)
        if local is None:
            local = self._local[k] = local_data_factory()
        if not self._tx_enabled:
            return None, local
        tx = self._tx.get(k)
        if tx is None:
            tx = self._tx[k] = transmitted_data_factory()
        return tx, local

    def _to_wire(self) -> Any:
        if len(self._tx) == 1 and ":GLOBAL" in self._tx:
            return self._tx[":GLOBAL"]
        out: list[Any] = []
        for k, v in self._tx.items():
            out.append(k)
            out.append(v)
        return out

    def __repr__(self) -> str:
        return f"SerializationInfo(remote_is_trusted={self._trusted})"
