"""What the widgets show, as plain Python: bounded, thread-safe, fed by events. No widgets here.

Each model keeps what its view needs as short reprs (never the values themselves), in ring
buffers of configurable length, so memory stays bounded however many calls go by. ``apply``
may be called from any thread; every model tells its listeners (views) that it changed, and
the views decide when to render (see :mod:`anvil_nb.widgets.throttle`).
"""

from __future__ import annotations

import reprlib
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from anvil_nb.core.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    Event,
    RegistrationChanged,
    SessionChanged,
)

__all__ = [
    "CallLogModel",
    "CallRecord",
    "CapabilityModel",
    "Model",
    "RegistryModel",
    "SessionModel",
    "short_repr",
]


class _Repr(reprlib.Repr):
    """reprlib's bounded repr; an object without a ``__repr__`` of its own (a portable class's,
    typically) shows its class name and fields, ``Person(name='Ann', age=3)``, not
    ``<__main__.Person object at 0x...>``.
    """

    def repr_instance(self, x: Any, level: int) -> str:
        cls = type(x)
        items = _fields(x, self.maxdict + 1) if cls.__repr__ is object.__repr__ else None
        if items is None:
            return super().repr_instance(x, level)
        name = cls.__name__
        if level <= 0:
            return f"{name}({self.fillvalue})"
        parts = [f"{k}={self.repr1(v, level - 1)}" for k, v in items[: self.maxdict]]
        if len(items) > self.maxdict:
            parts.append(self.fillvalue)
        return f"{name}({', '.join(parts)})"


def _fields(x: Any, n: int) -> list[tuple[str, Any]] | None:
    """The first *n* attributes of *x* (its ``__dict__``, else its ``__slots__``); None if neither."""
    try:
        fields = getattr(x, "__dict__", None)
        if isinstance(fields, dict):
            return list(fields.items())[:n]
        slots = []
        for c in type(x).__mro__:
            declared = c.__dict__.get("__slots__", ())
            for name in [declared] if isinstance(declared, str) else declared:
                if name not in ("__dict__", "__weakref__") and hasattr(x, name):
                    slots.append(name)
        return [(name, getattr(x, name)) for name in slots[:n]] if slots else None
    except Exception:  # changed by another thread meanwhile, or an odd descriptor
        return None


_repr = _Repr()
_repr.maxstring = 80
_repr.maxother = 80
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 8
_repr.maxlevel = 3

MAX_REPR = 200
#: Types whose repr is their own, short and safe: no need for reprlib's bounded walk.
_PLAIN = frozenset({int, float, bool, type(None)})


def short_repr(value: Any, limit: int = MAX_REPR) -> str:
    """A readable repr, truncated; never raises (a repr that fails says so).

    Objects show their own ``__repr__``; those without one their class name and fields.
    """
    if type(value) in _PLAIN:  # the common case, without reprlib's walk
        text = repr(value)
        if len(text) <= limit:
            return text
    try:
        text = _repr.repr(value)
    except Exception as exc:  # a user's __repr__ must not break the view
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Model:
    """Base: a lock, a version counter and listeners (held weakly, so views can go away)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._listeners: list[weakref.ref[Any] | Callable[[], None]] = []
        self.version = 0

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call *listener* after each change (a bound method is held weakly)."""
        ref: Any = (
            weakref.WeakMethod(listener) if hasattr(listener, "__self__") else (lambda: listener)
        )
        with self._lock:
            self._listeners.append(ref)

    def _changed(self) -> None:
        self.version += 1
        alive = []
        for ref in self._listeners:
            fn = ref()
            if fn is not None:
                alive.append(ref)
                fn()
        self._listeners = alive

    def apply(self, event: Event) -> None:
        """Take one event into account (from any thread)."""
        with self._lock:
            if self._apply(event):
                self._changed()

    def _apply(self, event: Event) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass
class CallRecord:
    """One call as the call log shows it."""

    call_id: str
    time: float
    function: str
    direction: str
    caller: str
    trusted: bool
    client_type: str
    ip: str
    location: str
    session_id: str
    task_id: str
    args: str
    duration: float | None = None
    outcome: str = "running"
    result: str = ""
    error_type: str = ""
    error_message: str = ""
    output: str = ""
    trace: list[Any] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)


def _location(client: dict[str, Any] | None) -> str:
    loc = (client or {}).get("location")
    if not isinstance(loc, dict):
        return ""
    country = loc.get("country") if isinstance(loc.get("country"), dict) else {}
    parts = [loc.get("city"), country.get("name") or country.get("code")]
    return ", ".join(str(p) for p in parts if p)


class CallLogModel(Model):
    """The last *maxlen* calls served by or made from this kernel (or process), and those of
    other connections of its app that the host reports, by call id.

    *me* is the caller shown for calls made from here ("this kernel" or "this process").
    """

    def __init__(self, maxlen: int = 500, me: str = "this kernel"):
        super().__init__()
        self.maxlen = maxlen
        self.me = me
        self._calls: OrderedDict[str, CallRecord] = OrderedDict()
        self.total = 0

    def _apply(self, event: Event) -> bool:
        if isinstance(event, CallStarted):
            client = event.client or {}
            caller = (
                event.call_stack[0]
                if event.call_stack
                else (self.me if event.direction == "out" else "")
            )
            args = ", ".join(
                [short_repr(a, 60) for a in event.args]
                + [f"{k}={short_repr(v, 60)}" for k, v in event.kwargs.items()]
            )
            self._calls[event.call_id] = CallRecord(
                call_id=event.call_id,
                time=event.time,
                function=event.command,
                direction=event.direction,
                caller=caller,
                trusted=event.trusted,
                client_type=str(client.get("type") or ""),
                ip=str(client.get("ip") or ""),
                location=_location(client),
                session_id=event.session_id or "",
                task_id=event.background_task_id or "",
                args=short_repr(args, 300) if len(args) > 300 else args,
                context={
                    "caller type": caller,
                    "trusted": event.trusted,
                    "call stack": list(event.call_stack),
                    "client": {k: client.get(k) for k in ("type", "ip", "location") if k in client},
                    "session id": event.session_id,
                    "background task id": event.background_task_id,
                    **({"from": event.caller} if event.caller else {}),
                    **({"served by": event.provider} if event.provider else {}),
                },
            )
            self.total += 1
            while len(self._calls) > self.maxlen:
                self._calls.popitem(last=False)
            return True
        if isinstance(event, CallFinished):
            record = self._calls.get(event.call_id)
            if record is None:
                return False
            record.duration = event.duration
            record.outcome = "ok" if event.ok else "error"
            record.result = short_repr(event.result) if event.ok else ""
            record.error_type = event.error_type or ""
            message = event.error_message or ""
            record.error_message = message if len(message) <= 300 else message[:299] + "…"
            record.output = event.output[-2000:]
            record.trace = list(event.trace)[:20]
            return True
        return False

    def rows(self, function: str | None = None, outcome: str | None = None) -> list[CallRecord]:
        """The calls, newest first, optionally only of one function or one outcome."""
        with self._lock:
            calls = list(self._calls.values())
        return [
            c
            for c in reversed(calls)
            if (not function or c.function == function) and (not outcome or c.outcome == outcome)
        ]

    def functions(self) -> list[str]:
        """Every function name seen (for the filter)."""
        with self._lock:
            return sorted({c.function for c in self._calls.values()})

    def get(self, call_id: str) -> CallRecord | None:
        """One call by id."""
        with self._lock:
            return self._calls.get(call_id)


@dataclass
class SessionView:
    """One session's contents as reprs, what the last call changed, and its status."""

    session_id: str
    data: dict[str, str]
    changed: set[str]
    status: str
    time: float
    replaced_by: str | None = None


class SessionModel(Model):
    """The sessions this kernel has served, as they were after the last call in each."""

    def __init__(self, maxlen: int = 100):
        super().__init__()
        self.maxlen = maxlen
        self._sessions: OrderedDict[str, SessionView] = OrderedDict()

    def _apply(self, event: Event) -> bool:
        if not isinstance(event, SessionChanged):
            return False
        old = self._sessions.pop(event.session_id, None)
        if event.data is not None:
            data = {str(k): short_repr(v) for k, v in event.data.items()}
            before = old.data if old is not None else {}
            changed = {k for k in data if before.get(k) != data[k]} | (set(before) - set(data))
        else:
            data, changed = (old.data if old is not None else {}), set()
        status = "active" if event.reason == "saved" else event.reason
        self._sessions[event.session_id] = SessionView(
            event.session_id, data, changed, status, event.time, event.replaced_by
        )
        while len(self._sessions) > self.maxlen:
            self._sessions.popitem(last=False)
        return True

    def sessions(self) -> list[SessionView]:
        """Most recently changed first."""
        with self._lock:
            return list(reversed(self._sessions.values()))


@dataclass
class CapabilityView:
    """The updates of one capability scope, and their aggregate."""

    scope_key: str
    updates: deque[tuple[float, str, str, str]]
    aggregate: Any = None
    count: int = 0


def merge_update(aggregate: Any, update: Any) -> Any:
    """The default rule: a dict update merges into a dict; anything else replaces."""
    if isinstance(update, dict):
        return {**aggregate, **update} if isinstance(aggregate, dict) else dict(update)
    return update


class CapabilityModel(Model):
    """Per capability scope: each update (time, call, direction, payload) and the aggregate.

    Parameters
    ----------
    rule : callable
        How updates aggregate, ``rule(aggregate, update) -> aggregate``; the default merges
        dicts and otherwise keeps the latest, as capabilities do by default.
    """

    def __init__(
        self,
        per_scope: int = 50,
        max_scopes: int = 200,
        rule: Callable[[Any, Any], Any] = merge_update,
    ):
        super().__init__()
        self.per_scope = per_scope
        self.max_scopes = max_scopes
        self.rule = rule
        self._scopes: OrderedDict[str, CapabilityView] = OrderedDict()

    def _apply(self, event: Event) -> bool:
        if not isinstance(event, CapabilityUpdated):
            return False
        view = self._scopes.pop(event.scope_key, None) or CapabilityView(
            event.scope_key, deque(maxlen=self.per_scope)
        )
        view.updates.append((event.time, event.call_id, event.direction, short_repr(event.update)))
        try:
            view.aggregate = self.rule(view.aggregate, event.update)
        except Exception as exc:  # a custom rule must not break the feed
            view.aggregate = f"<rule failed: {exc!r}>"
        view.count += 1
        self._scopes[event.scope_key] = view
        while len(self._scopes) > self.max_scopes:
            self._scopes.popitem(last=False)
        return True

    def scopes(self) -> list[CapabilityView]:
        """Most recently updated first."""
        with self._lock:
            return list(reversed(self._scopes.values()))


class RegistryModel(Model):
    """Registered names and who provides them (this kernel, other kernels, uplinks)."""

    def __init__(self) -> None:
        super().__init__()
        self._names: dict[str, set[str]] = {}

    def load(self, registrations: dict[str, list[str]]) -> None:
        """Start from a snapshot of the host (``host_state``)."""
        with self._lock:
            self._names = {name: set(providers) for name, providers in registrations.items()}
            self._changed()

    def _apply(self, event: Event) -> bool:
        if not isinstance(event, RegistrationChanged):
            return False
        providers = self._names.setdefault(event.name, set())
        if event.added:
            providers.add(event.provider)
        else:
            providers.discard(event.provider)
            if not providers:
                del self._names[event.name]
        return True

    def names(self) -> dict[str, list[str]]:
        """Every name and its providers, sorted."""
        with self._lock:
            return {name: sorted(p) for name, p in sorted(self._names.items())}
