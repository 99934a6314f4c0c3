"""The host: routes calls between peers, owns sessions and signs capabilities. No transport.

A *peer* is one connection to the host: a kernel, an uplink script, a browser. Transports
(tornado WebSockets, the in-process transport) decode frames and hand each message to
:meth:`Host.receive`, and deliver what the host sends through the peer's ``send``. Every
method of the host runs on its event loop's thread.

The host routes messages in wire form and never rebuilds portable objects: it cannot know the
classes, and it does not need to. It looks inside a message only at

* Capabilities: an untrusted sender's MACs are checked against the call's session (a forged,
  foreign or missing MAC fails the call with ``PermissionDenied``); every capability leaves the
  host with its full scope and a fresh MAC for the recipient's session, without ``narrow``;
* ``capUpdates``: passed back only to the caller that sent that capability into the call;
* ``sessionData``: stored, never relayed to untrusted callers.

The flow of one call (ids are rewritten so each side sees its own)::

    caller ──CALL id=c7──▶ host ──CALL id=server-12, session, client, call-stack──▶ provider
    caller ◀─response c7── host ◀────────response server-12, sessionData, capUpdates─ provider
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from anvil_nb import protocol
from anvil_nb.capability import normalise_scope_key, scope_key, sign_scope, verify_scope
from anvil_nb.context import TRUSTED_TYPES
from anvil_nb.errors import (
    AnvilError,
    InternalError,
    NoServerFunctionError,
    PermissionDenied,
    ProtocolError,
    QuotaExceededError,
    RuntimeUnavailableError,
    SessionExpiredError,
    StackOverflow,
    TimeoutError,
    UplinkDisconnectedError,
    error_to_wire,
)
from anvil_nb.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    EventBus,
    RegistrationChanged,
    SessionChanged,
)
from anvil_nb.registry import Registry
from anvil_nb.sessions import SessionManager, SessionRecord, SQLiteSessionStore

__all__ = ["MAX_CALL_DEPTH", "Host", "Peer"]

log = logging.getLogger("anvil_nb.host")

#: Calls nested deeper than this fail with StackOverflow (as on Anvil).
MAX_CALL_DEPTH = 10

Media = Mapping[str, bytes]

_SESSIONLESS = frozenset(
    {
        "anvil.private.echo",
        "anvil.private.get_app_origin",
        "anvil.private.get_api_origin",
        "anvil.private.host_state",
        "anvil.private.watch_registry",
    }
)


def load_secret(path: Path) -> bytes:
    """The host's MAC key from *path*, created (readable by the owner only) if missing."""
    try:
        secret = path.read_bytes()
        if len(secret) >= 32:
            return secret
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret


class Peer(Protocol):
    """What the host needs of a connection. Transports implement it."""

    #: A short unique name for logs and events, e.g. ``"uplink-3"``.
    name: str
    #: The caller type of its frames: ``server_module``, ``uplink``, ``client_uplink``,
    #: ``browser`` or ``http``.
    kind: str
    #: ``{"type", "ip", "location"}`` for the sessions it starts.
    client: dict[str, Any]

    def send(self, msg: dict[str, Any], media: Media | None = None) -> None:
        """Deliver a message (and the bytes of its DataMedia) to the peer; never blocks."""

    def close(self, reason: str) -> None:
        """Close the connection after a fatal error (already sent)."""


@dataclass(eq=False)
class _PeerState:
    peer: Peer
    trusted: bool
    frame: dict[str, Any]
    session_id: str
    #: Requests this peer is serving: host request id -> request.
    served: dict[str, _Request] = field(default_factory=dict)
    #: Calls this peer made that are still in flight: its call id -> request.
    calls: dict[Any, _Request] = field(default_factory=dict)


@dataclass(eq=False)
class _Request:
    id: str
    command: str
    caller: _PeerState | None
    caller_call_id: Any
    provider: _PeerState
    session_id: str
    #: The session's version when this request's copy of it went out; a returned copy is
    #: stored only if the session is still at this version (optimistic concurrency).
    session_version: int
    nested: bool
    caps_in: frozenset[str]
    started: float
    #: Frames newest first (the caller's on top) and the client of the session's chain.
    stack: list[dict[str, Any]]
    client: dict[str, Any]
    timer: asyncio.TimerHandle | None = None
    #: The request this one is nested in, when the caller is serving one.
    parent: _Request | None = None
    #: The caller sent its session along and takes the changed one back (anvil_nb clients).
    adopts_session: bool = False


class Host:
    """Routes calls between peers.

    Parameters
    ----------
    sessions : SessionManager, optional
        Where sessions live (default: in memory, 30-minute idle timeout).
    secret : bytes, optional
        The key of capability MACs; random by default. Keep it with the sessions so that
        capabilities survive a restart.
    call_timeout : float, optional
        Seconds after which a routed call fails with ``TimeoutError`` (default: no limit).
    app_info : dict, optional
        Sent to peers at handshake and with every call (``anvil.app`` on real clients).
    origin : str, optional
        The app origin, e.g. ``"http://127.0.0.1:8888"``; ``None`` when nothing listens on HTTP.
    max_calls_per_peer : int
        The most calls one connection may have in flight; more fail with
        ``QuotaExceededError`` (a flood cannot make the host hold unbounded state).
    data_dir : str or Path, optional
        Keep sessions (``sessions.sqlite3``) and the MAC key (``host-secret``) in this folder, so
        that both survive a restart. Without it, both live in memory.
    """

    def __init__(
        self,
        *,
        sessions: SessionManager | None = None,
        secret: bytes | None = None,
        call_timeout: float | None = None,
        app_info: dict[str, Any] | None = None,
        origin: str | None = None,
        data_dir: str | Path | None = None,
        max_calls_per_peer: int = 1024,
    ):
        self.max_calls_per_peer = max_calls_per_peer
        if sessions is None:
            store = SQLiteSessionStore(Path(data_dir) / "sessions.sqlite3") if data_dir else None
            sessions = SessionManager(store)
        self.sessions = sessions
        if secret is None:
            secret = (
                load_secret(Path(data_dir) / "host-secret") if data_dir else secrets.token_bytes(32)
            )
        self.secret = secret
        self.call_timeout = call_timeout
        self.app_info = app_info or {
            "id": "anvil_nb",
            "branch": "master",
            "environment": {"description": "Notebook", "tags": []},
        }
        self.origin = origin
        #: The client key of the placement, shown to trusted code (``%anvil status``).
        self.client_key: str | None = None
        self.events = EventBus()
        self.registry: Registry[_PeerState] = Registry()
        self._peers: dict[Peer, _PeerState] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)
        self._late: dict[str, None] = {}  # timed-out or orphaned request ids, to drop quietly
        self._private: dict[
            str, Callable[[_PeerState, dict[str, Any], SessionRecord | None], Any]
        ] = {
            "anvil.private.echo": self._echo,
            "anvil.private.get_app_origin": lambda *_: self.origin,
            "anvil.private.get_api_origin": lambda *_: (
                self.origin and self.origin.rstrip("/") + "/_/api"
            ),
            "anvil.private.get_session_id": lambda _ps, _m, rec: rec.id if rec else None,
            "anvil.private.reset_session": self._reset_session,
            "anvil.private.capability_is_valid": self._capability_is_valid,
            "anvil.private.host_state": self._host_state,
            "anvil.private.watch_registry": self._watch_registry,
        }
        self._watchers: set[_PeerState] = set()

    # -----------------------------------------------------------------------------------------
    # Peers

    def attach(self, peer: Peer, greet: bool = True) -> None:
        """Start serving a connection whose handshake succeeded; it gets its own session.

        With *greet*, the peer is sent the ``auth`` message of the uplink protocol (browsers,
        which have no handshake, are not).
        """
        trusted = peer.kind in TRUSTED_TYPES
        record = self.sessions.new(client=dict(peer.client))
        frame = {"type": peer.kind, "protocol-version": protocol.PROTOCOL_VERSION}
        self._peers[peer] = _PeerState(peer, trusted, frame, record.id)
        if greet:
            auth = {
                "auth": "OK",
                "priv": peer.kind if trusted else "client",
                "app-info": self.app_info,
            }
            peer.send(auth)
        log.info("%s connected as %s", peer.name, peer.kind)

    def detach(self, peer: Peer) -> None:
        """Forget a connection: its names go, calls it was serving fail, its session is dropped."""
        ps = self._peers.pop(peer, None)
        if ps is None:
            return
        self._watchers.discard(ps)
        for name in self.registry.remove_provider(ps):
            self._emit_registration(name, ps, added=False)
        for req in list(ps.served.values()):
            self._cancel_timer(req)
            if req.caller is not None:
                req.caller.calls.pop(req.caller_call_id, None)
                self._fail(
                    req.caller,
                    req.caller_call_id,
                    UplinkDisconnectedError(
                        f"The connection serving {req.command!r} was lost ({peer.name})"
                    ),
                )
                self._emit_finished(req, ok=False, error=UplinkDisconnectedError.wire_type)
        ps.served.clear()
        for req in ps.calls.values():  # calls it made: their responses will be dropped
            req.caller = None
        ps.calls.clear()
        self.sessions.drop(ps.session_id)
        log.info("%s disconnected", peer.name)

    def state(self) -> dict[str, Any]:
        """A snapshot for ``_/admin/state`` and ``%anvil status``: names, providers and peers."""
        return {
            "origin": self.origin,
            "registrations": {
                name: [ps.peer.name for ps in providers]
                for name, providers in self.registry.names().items()
            },
            "peers": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "ip": p.client.get("ip"),
                    "calls_in_flight": len(ps.calls),
                }
                for p, ps in self._peers.items()
            ],
        }

    def housekeeping(self) -> list[str]:
        """Remove expired sessions and persist idle clocks; call it every minute or so."""
        gone = self.sessions.purge()
        for session_id in gone:
            self._emit_session(session_id, "expired")
        return gone

    def close(self) -> None:
        """Stop: every call in flight fails with ``RuntimeUnavailableError``, every peer is closed."""
        for ps in list(self._peers.values()):
            for call_id, req in list(ps.calls.items()):
                self._cancel_timer(req)
                req.caller = None
                self._fail(ps, call_id, RuntimeUnavailableError("The host is shutting down"))
            ps.calls.clear()
        for peer in list(self._peers):
            peer.close("host shutting down")
            self.detach(peer)
        self.sessions.close()

    @property
    def peers(self) -> list[Peer]:
        """The connected peers."""
        return list(self._peers)

    # -----------------------------------------------------------------------------------------
    # Incoming messages

    def receive(self, peer: Peer, msg: dict[str, Any], media: Media | None = None) -> None:
        """Handle one decoded message from *peer*.

        A malformed message fails only the call it belongs to (or, where Anvil closes the
        connection, closes it after a fatal error); other connections are never affected.
        """
        ps = self._peers.get(peer)
        if ps is None:
            log.warning("message from unknown peer %s dropped", getattr(peer, "name", peer))
            return
        kind = protocol.kind_of(msg)
        if kind == "response":
            self._on_response(ps, msg, media)
        elif kind == "CALL":
            self._on_call(ps, msg, media)
        elif kind == "REGISTER":
            self._on_register(ps, msg)
        elif kind == "UNREGISTER":
            name = msg.get("name")
            if isinstance(name, str) and self.registry.remove(name, ps):
                self._emit_registration(name, ps, added=False)
        else:
            raise ProtocolError(f"unexpected message of kind {kind!r} from {peer.name}")

    def _on_register(self, ps: _PeerState, msg: dict[str, Any]) -> None:
        if not ps.trusted:
            self._fatal(ps, protocol.CLIENT_REGISTER)
            return
        name = msg.get("name")
        try:
            if not isinstance(name, str):
                raise ValueError("the name must be a string")  # noqa: TRY004 - reported as a bad name  # noqa: TRY301
            added = self.registry.add(name, ps)
        except ValueError as exc:
            log.warning("%s: bad REGISTER %r: %s", ps.peer.name, name, exc)
            self._fatal(ps, protocol.BAD_NAME)
            return
        if added:
            self._emit_registration(name, ps, added=True)

    def _fatal(self, ps: _PeerState, text: str) -> None:
        log.warning("%s: %s", ps.peer.name, text)
        ps.peer.send({"error": text})
        ps.peer.close(text)

    # -----------------------------------------------------------------------------------------
    # Calls

    def _on_call(self, ps: _PeerState, msg: dict[str, Any], media: Media | None) -> None:
        call_id = msg.get("id")
        if not isinstance(call_id, (str, int)) or isinstance(call_id, bool):
            raise ProtocolError("a CALL needs a string 'id'")
        try:
            self._route(ps, call_id, msg, media)
        except AnvilError as exc:
            self._fail(ps, call_id, exc)

    def _route(
        self, ps: _PeerState, call_id: Any, msg: dict[str, Any], media: Media | None
    ) -> None:
        command = msg.get("command")
        if not isinstance(command, str):
            if "liveObjectCall" in msg:
                raise PermissionDenied("Live objects are not served by this host")
            raise ProtocolError("a CALL needs a string 'command'")
        args = msg.get("args", [])
        kwargs = msg.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("a CALL's 'args' must be a list and its 'kwargs' a dict")
        if call_id in ps.calls:
            raise ProtocolError(f"call id {call_id!r} is already in use on this connection")
        if len(ps.calls) >= self.max_calls_per_peer:
            raise QuotaExceededError(
                f"Too many calls in flight on this connection (at most {self.max_calls_per_peer})"
            )

        parent = ps.served.get(msg.get("call-stack-id"))  # type: ignore[arg-type]
        if parent is not None:
            session_id = parent.session_id
            stack = [ps.frame, *parent.stack]
            client = parent.client
        else:
            session_id = ps.session_id
            stack = [ps.frame]
            client = ps.peer.client
        if len(stack) > MAX_CALL_DEPTH:
            raise StackOverflow(
                f"Server calls are nested more than {MAX_CALL_DEPTH} deep (calling {command!r})"
            )
        if not ps.trusted and ":" in command:
            raise PermissionDenied(f"Untrusted callers cannot call {command!r}")

        handler = self._private.get(command)
        if handler is not None and command in _SESSIONLESS:  # keep-alives do not touch sessions
            ps.peer.send({"id": call_id, "response": handler(ps, msg, None), "objects": []})
            return
        record = self._session_for(ps, session_id, parent)
        if handler is not None:
            value = handler(ps, msg, record)
            ps.peer.send({"id": call_id, "response": value, "objects": []})
            return

        objects = msg.get("objects") or []
        caps_in = self._check_capabilities(objects, record, ps.trusted)
        data = msg.get("sessionData")
        adopts = parent is not None and ps.trusted and isinstance(data, dict)
        if adopts and data != record.data and record.version == parent.session_version:  # type: ignore[union-attr]
            self.sessions.save_data(record, data)  # type: ignore[arg-type]
            parent.session_version = record.version  # type: ignore[union-attr]

        provider = self.registry.pick(command)
        if provider is None:
            raise NoServerFunctionError(
                f'No server function matching "{command}" has been registered'
            )

        rid = f"server-{self._prefix}-{next(self._ids)}"
        out: dict[str, Any] = {
            "type": "CALL",
            "id": rid,
            "call-stack-id": rid,
            "command": command,
            "args": args,
            "kwargs": kwargs,
            "objects": self._sign_objects(objects, record),
            "call-stack": stack,
            "client": client,
            "sessionData": record.data if record.data is not None else {},
            "session-id": record.id,
            "app-info": self.app_info,
        }
        if "vt_global" in msg:
            out["vt_global"] = msg["vt_global"]
        req = _Request(
            id=rid,
            command=command,
            caller=ps,
            caller_call_id=call_id,
            provider=provider,
            session_id=record.id,
            session_version=record.version,
            nested=parent is not None,
            caps_in=caps_in,
            started=time.perf_counter(),
            stack=stack,
            client=client,
            parent=parent,
            adopts_session=adopts,
        )
        provider.served[rid] = req
        ps.calls[call_id] = req
        if self.call_timeout is not None:
            req.timer = asyncio.get_running_loop().call_later(
                self.call_timeout, self._time_out, req
            )
        provider.peer.send(out, media)
        if self.events.active:
            self.events.emit(
                CallStarted(
                    time=time.time(),
                    call_id=rid,
                    command=command,
                    client=client,
                    call_stack=tuple(f.get("type", "") for f in stack),
                    trusted=ps.trusted,
                    session_id=record.id,
                    caller=ps.peer.name,
                    provider=provider.peer.name,
                )
            )

    def _session_for(
        self, ps: _PeerState, session_id: str, parent: _Request | None
    ) -> SessionRecord:
        try:
            return self.sessions.use(session_id)
        except SessionExpiredError:
            fresh = self.sessions.new(client=dict(ps.peer.client))
            if parent is not None:
                parent.session_id = fresh.id
            if ps.session_id == session_id:
                ps.session_id = fresh.id
            self._emit_session(session_id, "expired", fresh.id)
            raise

    def _on_response(self, ps: _PeerState, msg: dict[str, Any], media: Media | None) -> None:
        rid = msg["id"]
        req = ps.served.pop(rid, None)
        if req is None:
            if rid in self._late:  # the call timed out; its answer comes too late
                del self._late[rid]
                return
            raise ProtocolError(f"response for unknown call id {rid!r}")
        self._cancel_timer(req)
        caller = req.caller
        if caller is None:
            return
        caller.calls.pop(req.caller_call_id, None)
        record = self.sessions.get(req.session_id)
        if "error" in msg:
            error = (
                msg["error"] if isinstance(msg["error"], dict) else {"message": str(msg["error"])}
            )
            out: dict[str, Any] = {"id": req.caller_call_id, "error": error, "objects": []}
            ok = False
        else:
            data = msg.get("sessionData")
            # Most calls leave the session as it was: write only what changed. A copy that went
            # out before the session last changed is stale and dropped, as the App Server does.
            if isinstance(data, dict) and record is not None and data != record.data:
                if record.version == req.session_version:
                    self.sessions.save_data(record, data)
                    if self.events.active:
                        self._emit_session(record.id, "saved")
                else:
                    log.info(
                        "%s: session changed during %r; its copy is dropped", req.id, req.command
                    )
            objects = msg.get("objects") or []
            try:
                if record is not None:
                    self._check_capabilities(objects, record, trusted=True)
                    objects = self._sign_objects(objects, record)
            except PermissionDenied as exc:
                self._fail(caller, req.caller_call_id, exc)
                self._emit_finished(req, ok=False, error=exc.wire_type)
                return
            out = {"id": req.caller_call_id, "response": msg.get("response"), "objects": objects}
            if "vt_global" in msg:
                out["vt_global"] = msg["vt_global"]
            ok = True
            if req.adopts_session and record is not None and record.version != req.session_version:
                out["sessionData"] = record.data if record.data is not None else {}
                if req.parent is not None:
                    req.parent.session_version = record.version  # the caller now holds this copy
        updates = msg.get("capUpdates")
        if updates and isinstance(updates, dict) and req.caps_in:
            passed = {}
            for key, update in updates.items():
                norm = normalise_scope_key(key) if isinstance(key, str) else None
                if norm is not None and norm in req.caps_in:
                    passed[norm] = update
                    if self.events.active:
                        self.events.emit(CapabilityUpdated(time.time(), req.id, norm, update))
            if passed:
                out["capUpdates"] = passed
        caller.peer.send(out, media)
        if self.events.active:
            err = out.get("error", {}).get("type") if not ok else None
            self._emit_finished(
                req, ok=ok, error=err, message=None if ok else out["error"].get("message")
            )

    def _time_out(self, req: _Request) -> None:
        if req.provider.served.pop(req.id, None) is None:
            return
        self._late[req.id] = None
        if len(self._late) > 10000:
            self._late.pop(next(iter(self._late)))
        if req.caller is not None:
            req.caller.calls.pop(req.caller_call_id, None)
            self._fail(
                req.caller,
                req.caller_call_id,
                TimeoutError(f"Server call {req.command!r} timed out"),
            )
        self._emit_finished(req, ok=False, error=TimeoutError.wire_type)

    def _cancel_timer(self, req: _Request) -> None:
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None

    def _fail(self, ps: _PeerState, call_id: Any, exc: AnvilError) -> None:
        error = error_to_wire(exc)
        error["trace"] = []  # the host's own frames mean nothing to the caller
        ps.peer.send(protocol.error_message(call_id, error))

    # -----------------------------------------------------------------------------------------
    # Capabilities

    def _check_capabilities(
        self, objects: Any, record: SessionRecord, trusted: bool
    ) -> frozenset[str]:
        """Verify the capabilities in a message; return their full-scope keys.

        An untrusted sender's capabilities must carry a MAC valid for the call's session. A
        trusted sender may also send unsigned ones (any scope but a ``"_"`` one), or one signed
        for another session: trusted code could have minted it anyway.
        """
        if not isinstance(objects, list):
            raise ProtocolError("'objects' must be a list")
        keys: list[str] = []
        for entry in objects:
            if not isinstance(entry, dict) or "Capability" not in (entry.get("type") or ()):
                continue
            scope, mac, narrow = entry.get("scope"), entry.get("mac"), entry.get("narrow") or []
            if not isinstance(scope, list) or not isinstance(narrow, list):
                raise PermissionDenied("Invalid Capability: its scope must be a list")
            valid = mac is not None and verify_scope(self.secret, record.secret, scope, mac)
            if not valid:
                reserved = not scope or scope[0] == "_"
                if not trusted or reserved:
                    raise PermissionDenied(
                        f"Invalid Capability {scope + narrow!r}: it was not issued to this session "
                        "(forged, from another session, or its session has expired)"
                    )
            keys.append(scope_key(scope + narrow))
        return frozenset(keys)

    def _sign_objects(self, objects: list[Any], record: SessionRecord) -> list[Any]:
        """Capabilities leave with their full scope and a MAC for *record*; nothing else changes."""
        out = None
        for i, entry in enumerate(objects):
            if isinstance(entry, dict) and "Capability" in (entry.get("type") or ()):
                if out is None:
                    out = list(objects)
                full = entry["scope"] + (entry.get("narrow") or [])
                out[i] = {
                    "type": ["Capability"],
                    "path": entry.get("path"),
                    "scope": full,
                    "mac": sign_scope(self.secret, record.secret, full),
                }
        return objects if out is None else out

    # -----------------------------------------------------------------------------------------
    # Private functions (anvil.private.*), answered by the host itself

    def _echo(self, _ps: _PeerState, msg: dict[str, Any], _rec: SessionRecord | None) -> Any:
        args = msg.get("args") or [None]
        return args[0]

    def _reset_session(self, ps: _PeerState, msg: dict[str, Any], rec: SessionRecord | None) -> str:
        if rec is None:
            raise InternalError("There is no session to reset")
        fresh = self.sessions.new(client=rec.client)
        parent = ps.served.get(msg.get("call-stack-id"))  # type: ignore[arg-type]
        for state in self._peers.values():
            if state.session_id == rec.id:
                state.session_id = fresh.id
            for req in state.served.values():
                if req.session_id == rec.id:
                    req.session_id = fresh.id
                    req.session_version = -1  # their copies belong to the old session: dropped
        if parent is not None:
            parent.session_id = fresh.id
            parent.session_version = fresh.version  # the call that reset it continues in it
        self.sessions.drop(rec.id)
        self._emit_session(rec.id, "reset", fresh.id)
        return fresh.id

    def _watch_registry(
        self, ps: _PeerState, _msg: dict[str, Any], _rec: SessionRecord | None
    ) -> Any:
        """Push every registration change to this (trusted, anvil_nb) peer from now on."""
        if not ps.trusted:
            raise PermissionDenied("Only trusted code may watch the registry")
        self._watchers.add(ps)
        return {**self.state(), "you": ps.peer.name}

    def _host_state(self, ps: _PeerState, _msg: dict[str, Any], _rec: SessionRecord | None) -> Any:
        if not ps.trusted:
            raise PermissionDenied("Only trusted code may read the host's state")
        return {**self.state(), "client_key": self.client_key}

    def _capability_is_valid(
        self, _ps: _PeerState, msg: dict[str, Any], rec: SessionRecord | None
    ) -> bool:
        args = msg.get("args") or []
        if rec is None or len(args) != 2 or not isinstance(args[0], list):
            return False
        return verify_scope(self.secret, rec.secret, args[0], args[1])

    # -----------------------------------------------------------------------------------------
    # Events

    def _emit_registration(self, name: str, ps: _PeerState, added: bool) -> None:
        if self._watchers:
            event = {"kind": "registration", "name": name, "provider": ps.peer.name, "added": added}
            for watcher in list(self._watchers):
                if watcher is not ps or not added:
                    watcher.peer.send({"type": "EVENT", "event": event})
        if self.events.active:
            self.events.emit(RegistrationChanged(time.time(), name, ps.peer.name, added))

    def _emit_session(self, session_id: str, reason: str, replaced_by: str | None = None) -> None:
        if self.events.active:
            self.events.emit(
                SessionChanged(time.time(), session_id, reason, replaced_by=replaced_by)
            )

    def _emit_finished(
        self, req: _Request, ok: bool, error: str | None = None, message: str | None = None
    ) -> None:
        if self.events.active:
            self.events.emit(
                CallFinished(
                    time=time.time(),
                    call_id=req.id,
                    command=req.command,
                    duration=time.perf_counter() - req.started,
                    ok=ok,
                    error_type=error,
                    error_message=message,
                )
            )
