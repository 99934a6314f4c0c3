"""Events: what happens in a host or a client, pushed to whoever subscribes.

**The host's stream is the one stream of what happens in an app**: every call it routes and
finishes, every session saved, reset or expired, every capability update it relays, every
registration. Each event names its ``app``. Three kinds of reader take it:

* ``{root}_/admin/events`` streams it as JSON (the Lab panel; anything with the admin right);
* a trusted connection that watches (``anvil.private.watch_events``) is pushed the events of its
  app **that it was not a party to** (calls other connections served or made, sessions others
  saved, registrations of others, expiries): the widgets of any process read them so;
* subscribers in the host's own process (tests, the embedded host's users).

A client adds what only its process knows about the calls it served or made itself (their
rebuilt arguments, results, printed output, the session's contents) as events of the same
kinds, so a process's widgets see one stream: the host's, completed by the process's own.

Events cross the wire as JSON objects (:func:`to_wire`, :func:`from_wire`), so the stream is a
publish/subscribe channel that another backend (Redis, for several hosts) could carry. Only
the host's fields travel; what a client adds stays in its process.

Delivery is synchronous on the emitting thread (the host's loop, or a client's worker), so a
subscriber must be quick and thread-safe; an exception in one is logged and never reaches the
call path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CallFinished",
    "CallStarted",
    "CapabilityUpdated",
    "Event",
    "EventBus",
    "RegistrationChanged",
    "RegistrySnapshot",
    "SessionChanged",
    "from_wire",
    "to_wire",
]

log = logging.getLogger("anvil_nb.core.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; ``time`` is the wall-clock time it happened, ``app`` where."""

    time: float
    app: str = field(default="", kw_only=True)


@dataclass(frozen=True, slots=True)
class CallStarted(Event):
    """A call was routed (host) or began to run (runtime)."""

    call_id: str
    command: str
    #: ``{"type", "ip", "location"}`` of the client that started the session.
    client: dict[str, Any] | None
    #: Frame types, newest first; ``call_stack[0]`` is the remote caller.
    call_stack: tuple[str, ...]
    trusted: bool
    session_id: str | None
    caller: str = ""
    provider: str = ""
    background_task_id: str | None = None
    #: A client's events only: the rebuilt arguments.
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``"in"``: served here; ``"out"``: made from here (a client's events); ``"host"``: seen
    #: at the host (the host's stream, so, for a watcher, a call of other connections).
    direction: str = "in"


@dataclass(frozen=True, slots=True)
class CallFinished(Event):
    """A call completed, successfully or not."""

    call_id: str
    command: str
    duration: float
    ok: bool
    error_type: str | None = None
    error_message: str | None = None
    #: A client's events only: the value returned, and output printed during the call.
    result: Any = None
    output: str = ""
    direction: str = "in"
    #: The remote trace, innermost first, when the call failed.
    trace: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class SessionChanged(Event):
    """A session was saved, reset, expired or dropped."""

    session_id: str
    reason: str
    #: A client's events only: the session's contents after the call.
    data: dict[str, Any] | None = None
    replaced_by: str | None = None
    #: Host events: the connection that served the call which saved the session ("" otherwise).
    provider: str = ""


@dataclass(frozen=True, slots=True)
class CapabilityUpdated(Event):
    """An update for a capability travelled back to the caller that passed it in."""

    call_id: str
    scope_key: str
    update: Any
    #: ``"sent"``: sent back to the caller; ``"received"``: applied to a capability passed out
    #: (a client's events); ``"host"``: relayed by the host (the host's stream).
    direction: str = "sent"


@dataclass(frozen=True, slots=True)
class RegistrationChanged(Event):
    """A name was registered or withdrawn by a provider."""

    name: str
    provider: str
    added: bool


@dataclass(frozen=True, slots=True)
class RegistrySnapshot(Event):
    """Every registered name and its providers, as the host has them now."""

    registrations: dict[str, list[str]]


class EventBus:
    """Subscribers receive every event emitted, in order, on the emitting thread."""

    def __init__(self) -> None:
        self._subscribers: tuple[Callable[[Event], Any], ...] = ()
        self._lock = threading.Lock()

    def subscribe(self, callback: Callable[[Event], Any]) -> Callable[[], None]:
        """Call *callback* with every event; returns a function that unsubscribes it."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    @property
    def active(self) -> bool:
        """Whether anyone is listening (emitters may skip building events when not)."""
        return bool(self._subscribers)

    def emit(self, event: Event) -> None:
        """Deliver *event*; a failing subscriber is logged and the others still run."""
        for callback in self._subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", callback, type(event).__name__)


#: The wire name of each event type, and the fields that travel (the host's; never the values
#: only a client's process has: arguments, results, output, session contents).
_KINDS: dict[str, type[Event]] = {
    "call_started": CallStarted,
    "call_finished": CallFinished,
    "session": SessionChanged,
    "capability": CapabilityUpdated,
    "registration": RegistrationChanged,
    "registry": RegistrySnapshot,
}
_NAMES = {cls: kind for kind, cls in _KINDS.items()}
_LOCAL = frozenset({"args", "kwargs", "result", "output", "data"})
#: Fields and the JSON types they may hold on the wire (anything else: the event is dropped).
_TYPES: dict[str, tuple[type, ...]] = {
    "time": (float, int), "app": (str,), "call_id": (str,), "command": (str,),
    "client": (dict, type(None)), "call_stack": (list,), "trusted": (bool,),
    "session_id": (str, type(None)), "caller": (str,), "provider": (str,),
    "background_task_id": (str, type(None)), "direction": (str,), "duration": (float, int),
    "ok": (bool,), "error_type": (str, type(None)), "error_message": (str, type(None)),
    "trace": (list,), "reason": (str,), "replaced_by": (str, type(None)), "scope_key": (str,),
    "update": (object,), "name": (str,), "added": (bool,), "registrations": (dict,),
}  # fmt: skip
_FIELDS = {cls: tuple(f for f in cls.__dataclass_fields__ if f not in _LOCAL) for cls in _NAMES}


def to_wire(event: Event) -> dict[str, Any]:
    """The JSON object that carries *event* (its kind and the host's fields)."""
    out: dict[str, Any] = {"kind": _NAMES[type(event)]}
    for name in _FIELDS[type(event)]:
        value = getattr(event, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def from_wire(body: Any) -> Event | None:
    """The event a JSON object carries, or None when it is not one (unknown kind, a missing
    field, a field of the wrong type). Unknown fields are ignored.
    """
    cls = _KINDS.get(body.get("kind")) if isinstance(body, dict) else None
    if cls is None:
        return None
    fields = {}
    for name in _FIELDS[cls]:
        if name not in body:
            continue
        value = body[name]
        if not isinstance(value, _TYPES[name]) or (isinstance(value, bool) and name == "time"):
            return None
        fields[name] = tuple(value) if isinstance(value, list) and name != "update" else value
    try:
        return cls(**fields)
    except TypeError:  # a required field is missing
        return None
