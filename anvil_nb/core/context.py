"""CallContext: who made the current call, from where, and whether to trust it.

Every call a provider serves carries ``client`` and ``call-stack`` (PROTOCOL.md §9), from which
the runtime builds a :class:`CallContext`. The current context lives in a ``contextvars``
variable, so each call sees its own context whether it runs on a worker thread or as an asyncio
task, and concurrent calls never see each other's.

Caller types are the reference page's words: ``browser``, ``client_uplink``, ``uplink``,
``server_module``, ``http``, ``background_task``. Frames of ``server_module``, ``uplink`` and
``background_task`` are trusted; the others are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TRUSTED_TYPES", "CallContext", "ClientInfo", "Location", "StackFrame"]

#: Frame types whose calls are trusted (server-side code).
TRUSTED_TYPES = frozenset({"server_module", "uplink", "background_task"})


@dataclass(frozen=True, slots=True)
class Location:
    """Where a client is, as far as its IP address tells."""

    city: str | None = None
    subdivision: str | None = None
    country: str | None = None
    country_code: str | None = None
    latitude: float | None = None
    longitude: float | None = None

    @classmethod
    def from_wire(cls, loc: Any) -> Location | None:
        """Build from ``{city, subdivision: {name}, location: {lat, lng}, country: {code, name}}``."""
        if not isinstance(loc, dict):
            return None
        sub = loc.get("subdivision") if isinstance(loc.get("subdivision"), dict) else {}
        country = loc.get("country") if isinstance(loc.get("country"), dict) else {}
        point = loc.get("location") if isinstance(loc.get("location"), dict) else {}
        return cls(
            city=loc.get("city"),
            subdivision=sub.get("name"),
            country=country.get("name"),
            country_code=country.get("code"),
            latitude=point.get("lat"),
            longitude=point.get("lng"),
        )

    def to_wire(self) -> dict[str, Any]:
        """The wire form; keys whose value is unknown are left out (never ``null``)."""
        out: dict[str, Any] = {}
        if self.city is not None:
            out["city"] = self.city
        if self.subdivision is not None:
            out["subdivision"] = {"name": self.subdivision}
        if self.latitude is not None and self.longitude is not None:
            out["location"] = {"lat": self.latitude, "lng": self.longitude}
        country = {
            k: v for k, v in (("code", self.country_code), ("name", self.country)) if v is not None
        }
        if country:
            out["country"] = country
        return out


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The client that started the session: its type, IP address and location."""

    type: str | None = None
    ip: str | None = None
    location: Location | None = None

    @classmethod
    def from_wire(cls, client: Any) -> ClientInfo | None:
        """Build from the ``client`` field of a CALL."""
        if not isinstance(client, dict):
            return None
        ip = client.get("ip")
        return cls(
            type=client.get("type"),
            ip=ip if isinstance(ip, str) else None,
            location=Location.from_wire(client.get("location")),
        )


@dataclass(frozen=True, slots=True)
class StackFrame:
    """One frame of the call stack: the kind of code that made a call, and whether it is trusted."""

    type: str
    protocol_version: int | None = None

    @property
    def is_trusted(self) -> bool:
        """True for server-side code (``server_module``, ``uplink``, ``background_task``)."""
        return self.type in TRUSTED_TYPES

    @classmethod
    def from_wire(cls, frame: Any) -> StackFrame:
        """Build from ``{"type": ..., "protocol-version": ...}``."""
        if not isinstance(frame, dict):
            return cls(type="unknown")
        version = frame.get("protocol-version")
        return cls(
            type=str(frame.get("type")),
            protocol_version=version if isinstance(version, int) else None,
        )


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the current call knows about itself.

    Attributes
    ----------
    type : str
        Where this code runs: ``server_module`` (a kernel or in-process runtime), ``uplink``
        or ``client_uplink``.
    client : ClientInfo or None
        The client that started the session this call belongs to.
    remote_caller : StackFrame or None
        The code that made this call (newest frame of the call stack).
    call_stack : tuple of StackFrame
        Every frame, newest first.
    background_task_id : str or None
        The id of the background task this call runs in, if any.
    """

    type: str
    client: ClientInfo | None = None
    remote_caller: StackFrame | None = None
    call_stack: tuple[StackFrame, ...] = field(default=())
    background_task_id: str | None = None

    @classmethod
    def from_wire(cls, own_type: str, client: Any, call_stack: Any) -> CallContext:
        """Build the context of an incoming CALL (PROTOCOL.md §9)."""
        info = ClientInfo.from_wire(client)
        frames = (
            tuple(StackFrame.from_wire(f) for f in call_stack)
            if isinstance(call_stack, list)
            else ()
        )
        if frames:
            remote: StackFrame | None = frames[0]
        elif info is not None and info.type:
            remote = StackFrame(type=info.type)
        else:
            remote = None
        task_id = client.get("background-task-id") if isinstance(client, dict) else None
        return cls(
            type=own_type,
            client=info,
            remote_caller=remote,
            call_stack=frames,
            background_task_id=task_id,
        )
