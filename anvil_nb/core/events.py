"""The event bus: what happens in a host or a runtime, pushed to whoever subscribes.

Widgets and the labextension subscribe; nothing in the call path waits for them. Events are
delivered synchronously on the thread that emits them (the host's loop, or a runtime's worker),
so a subscriber must be quick and thread-safe; an exception in a subscriber is logged and never
reaches the call path.
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
]

log = logging.getLogger("anvil_nb.core.events")


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; ``time`` is the wall-clock time it happened."""

    time: float


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
    #: Runtime events only: the rebuilt arguments.
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: ``"in"``: served here; ``"out"``: made from here (runtime events).
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
    #: Runtime events only: the value returned, and output printed during the call.
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
    #: Runtime events only: the session's contents after the call.
    data: dict[str, Any] | None = None
    replaced_by: str | None = None


@dataclass(frozen=True, slots=True)
class CapabilityUpdated(Event):
    """An update for a capability travelled back to the caller that passed it in."""

    call_id: str
    scope_key: str
    update: Any
    #: ``"sent"``: sent back to the caller; ``"received"``: applied to a capability passed out.
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
