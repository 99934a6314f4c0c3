"""What the host keeps: its apps, its connections (peers) and the requests in flight.

Plain data; the dispatcher (:mod:`anvil_nb.host.dispatcher`) is the only code that changes it,
on the host's event loop. A request is held in two places while it is in flight (its provider's
``served`` and its caller's ``calls``) and leaves both in ``Host._release``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from anvil_nb.host.registry import Registry
from anvil_nb.host.sessions import SessionManager
from anvil_nb.host.tasks import MemoryTaskStore, TaskRecord, TaskStore

__all__ = ["AppState", "Media", "Peer", "PeerState", "Request", "parent_request"]

#: The bytes of a message's DataMedia entries, by id.
Media = Mapping[str, bytes]


class Peer(Protocol):
    """What the host needs of a connection. Transports implement it."""

    #: A short name for logs and events, e.g. ``"uplink-3"``, assigned by the host at attach
    #: (unique among the host's peers).
    name: str
    #: The caller type of its frames: ``server_module``, ``uplink``, ``client_uplink``,
    #: ``browser`` or ``http``.
    kind: str
    #: ``{"type", "ip", "location"}`` for the sessions it starts.
    client: dict[str, Any]

    @property
    def queued_bytes(self) -> int:
        """Bytes sent to the peer that it has not read yet (0 when the transport cannot tell)."""
        ...

    def send(self, data: bytes, media: Media | None = None, request_id: Any = None) -> None:
        """Deliver one encoded message, then the bytes of its DataMedia (chunks carrying
        *request_id*) to the peer; never blocks.
        """

    def close(self, reason: str) -> None:
        """Close the connection after a fatal error (already sent)."""


@dataclass(eq=False)
class AppState:
    """One app on the host (DESIGN.md, "Apps"): its registry, its sessions, and what its peers
    are told of it. A peer belongs to one app, and calls stay inside it.
    """

    name: str
    sessions: SessionManager
    app_info: dict[str, Any]
    registry: Registry[PeerState] = field(default_factory=Registry)
    #: Trusted anvil_nb peers that asked to be pushed the app's events (``watch_events``).
    watchers: set[PeerState] = field(default_factory=set)
    #: The app's keys, shown to its trusted peers (``%anvil status``); set by the door that
    #: knows them (the uplink route's key ring).
    client_key: str | None = None
    server_key: str | None = None
    #: Where the app's background task records are kept.
    tasks: TaskStore = field(default_factory=MemoryTaskStore)


@dataclass(eq=False)
class PeerState:
    """What the host keeps of one connection: its trust, its frame, its session, its app, and
    the requests it serves and makes.
    """

    peer: Peer
    trusted: bool
    frame: dict[str, Any]
    session_id: str
    app: AppState
    #: The portable classes an anvil_nb peer says it defines (``%anvil status``, admin pages).
    classes: tuple[str, ...] = ()
    #: Requests this peer is serving: host request id -> request.
    served: dict[str, Request] = field(default_factory=dict)
    #: Calls this peer made that are still in flight: its call id -> request.
    calls: dict[Any, Request] = field(default_factory=dict)
    #: A watcher's events not pushed yet (sent together at the end of the loop's turn).
    outbox: list[dict[str, Any]] = field(default_factory=list)
    #: A door of the host itself (an HTTP request), not a connection: it may call ``http:``
    #: and ``route:`` names, which the host built for it.
    door: bool = False
    #: Calls of this peer the host answers later (logins, task states), waiting now.
    pending_async: int = 0
    #: ``GET_TASK_STATE`` questions put to this peer, by id.
    queries: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    #: Its session is its own and ends with it (a browser's cookie session outlives it).
    owns_session: bool = True


@dataclass(eq=False)
class Request:
    """One routed call, from routing to release (see :meth:`Host._release`)."""

    id: str
    command: str
    caller: PeerState | None
    caller_call_id: Any
    provider: PeerState
    session_id: str
    #: The session's version when this request's copy of it went out; a returned copy is
    #: stored only if the session is still at this version (optimistic concurrency).
    session_version: int
    nested: bool
    caps_in: frozenset[str]
    started: float
    #: Whether the caller is trusted (what may come back to it).
    trusted: bool
    #: Frames newest first (the caller's on top) and the client of the session's chain.
    stack: list[dict[str, Any]]
    client: dict[str, Any]
    timer: asyncio.TimerHandle | None = None
    #: The request this one is nested in, when the caller is serving one.
    parent: Request | None = None
    #: The caller sent its session along and takes the changed one back (anvil_nb clients).
    adopts_session: bool = False
    #: The session the provider may switch this call to (``anvil.private.switch_session!``):
    #: the cookie session of a cross-site HTTP request.
    alternate_session: str | None = None
    #: The record of the background task this request runs (nobody waits for its answer).
    task: TaskRecord | None = None


def parent_request(ps: PeerState, msg: dict[str, Any]) -> Request | None:
    """The request *ps* is serving that this call is nested in (by its ``call-stack-id``)."""
    stack_id = msg.get("call-stack-id")
    return ps.served.get(stack_id) if type(stack_id) is str else None
