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

It never relays a message as it came: every message it sends is built by :mod:`protocol` from
the fields it takes (a caller's ``id``, ``command``, ``args``, ``kwargs`` and the ``objects``
entries inside them; a provider's ``response`` and its entries, the session blob and capability
updates), so no peer can write another's session, call stack or client description. A message
whose relayed form would exceed the receiver's frame limit, or that cannot be encoded, fails
its call alone.

Every request lives in one place from routing to release: :meth:`Host._release` ends it on
every path (answered, failed to send, timed out, provider lost, caller gone, host closing).

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
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from anvil_nb.config import DEFAULT_APP, app_database
from anvil_nb.core import protocol
from anvil_nb.core.capability import normalise_scope_key, scope_key, sign_scope, verify_scope
from anvil_nb.core.context import TRUSTED_TYPES
from anvil_nb.core.errors import (
    AnvilError,
    AuthenticationFailed,
    InternalError,
    NoServerFunctionError,
    PermissionDenied,
    ProtocolError,
    QuotaExceededError,
    RuntimeUnavailableError,
    SerializationError,
    SessionExpiredError,
    StackOverflow,
    TimeoutError,
    UplinkDisconnectedError,
    error_to_wire,
)
from anvil_nb.core.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    Event,
    EventBus,
    RegistrationChanged,
    SessionChanged,
    to_wire,
)
from anvil_nb.core.limits import DEFAULT_LIMITS, Limits
from anvil_nb.core.logs import RateLimiter, clip
from anvil_nb.host.accounts import COMMANDS as ACCOUNT_COMMANDS
from anvil_nb.host.accounts import ROW_BACKEND, Accounts
from anvil_nb.host.background import TASK_COMMANDS, TaskRouting
from anvil_nb.host.http import ENDPOINT_PREFIXES
from anvil_nb.host.registry import Registry
from anvil_nb.host.sessions import SessionManager, SessionRecord, SQLiteSessionStore
from anvil_nb.host.state import AppState, Media, Peer, PeerState, Request, parent_request
from anvil_nb.host.tasks import BACKEND as TASK_BACKEND
from anvil_nb.host.tasks import KEEP_COUNT, KEEP_SECONDS, MemoryTaskStore, SQLiteTaskStore

__all__ = ["MAX_CALL_DEPTH", "AppState", "Host", "Peer"]

log = logging.getLogger("anvil_nb.host.dispatcher")

#: Calls nested deeper than this fail with StackOverflow (as on Anvil).
MAX_CALL_DEPTH = 10

#: Calls the host answers later (logins, a task's state) one connection may have waiting.
MAX_ASYNC_CALLS = 4


#: Events kept for one watcher between two pushes (one turn of the loop); more are dropped.
_MAX_OUTBOX = 10_000

_SESSIONLESS = frozenset(
    {
        "anvil.private.echo",
        "anvil.private.capability_is_valid",
        "anvil.private.report_classes",
        "anvil.private.get_app_origin",
        "anvil.private.get_api_origin",
        "anvil.private.host_state",
        "anvil.private.watch_events",
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


class Host(TaskRouting):
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
    limits : Limits, optional
        What one connection may cost: frame size, calls in flight, bytes queued for writing
        (see :class:`~anvil_nb.core.limits.Limits`).
    data_dir : str or Path, optional
        Keep each app's cookie sessions and users (``app.sqlite3``; another app's in
        ``apps/<name>/app.sqlite3``) and the MAC key (``host-secret``) in this folder, so that
        they survive a restart. Without it, sessions and the key live in memory and users in a
        temporary folder.
    password_hasher : argon2.PasswordHasher, optional
        How users' passwords are hashed (argon2-cffi's defaults unless given).

    The arguments about sessions and ``app_info`` are those of the app ``default``; other apps
    are made on first use (:meth:`app`).
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
        limits: Limits = DEFAULT_LIMITS,
        password_hasher: PasswordHasher | None = None,
    ):
        self.limits = limits
        self._data_dir = Path(data_dir) if data_dir else None
        if secret is None:
            secret = (
                load_secret(Path(data_dir) / "host-secret") if data_dir else secrets.token_bytes(32)
            )
        self.secret = secret
        self.call_timeout = call_timeout
        self.origin = origin
        self.events = EventBus()
        #: The users of every app (``anvil.private.users.*``).
        self.accounts = Accounts(secret, self._data_dir, password_hasher)
        #: Calls the host answers later (logins, task states): cancelled when it closes.
        self._async_calls: set[asyncio.Task[Any]] = set()
        #: The apps of this host, by name; ``default`` always exists.
        self.apps: dict[str, AppState] = {}
        self.apps[DEFAULT_APP] = self._new_app(DEFAULT_APP, sessions, app_info)
        self._peers: dict[Peer, PeerState] = {}
        self._ids = itertools.count(1)
        self._peer_ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)
        #: Ids of requests released before their answer came (timed out, caller gone): their
        #: late answers are dropped quietly. Bounded; an answer for an id no longer here is
        #: logged (rate-limited) and dropped too.
        self._late: dict[str, None] = {}
        self._quiet = RateLimiter(limits.log_interval)
        self._private: dict[
            str, Callable[[PeerState, dict[str, Any], SessionRecord | None], Any]
        ] = {
            "anvil.private.echo": self._echo,
            "anvil.private.get_app_origin": lambda ps, *_: self.app_origin(ps.app.name),
            "anvil.private.get_api_origin": lambda ps, *_: self.api_origin(ps.app.name),
            "anvil.private.switch_session!": self._switch_session,
            "anvil.private.get_session_id": lambda _ps, _m, rec: rec.id if rec else None,
            "anvil.private.reset_session": self._reset_session,
            "anvil.private.capability_is_valid": self._capability_is_valid,
            "anvil.private.host_state": self._host_state,
            "anvil.private.watch_events": self._watch_events,
            "anvil.private.report_classes": self._report_classes,
        }

    # -----------------------------------------------------------------------------------------
    # Apps

    def app(self, name: str = DEFAULT_APP) -> AppState:
        """The app *name*, made on first use (its persistent sessions in the data dir)."""
        found = self.apps.get(name)
        if found is None:
            found = self.apps[name] = self._new_app(name)
        return found

    def _new_app(
        self,
        name: str,
        sessions: SessionManager | None = None,
        app_info: dict[str, Any] | None = None,
    ) -> AppState:
        if sessions is None:
            store = None
            if self._data_dir is not None:
                store = SQLiteSessionStore(app_database(self._data_dir, name))
            sessions = SessionManager(store)
        if self._data_dir is not None:
            tasks: Any = SQLiteTaskStore(app_database(self._data_dir, name))
        else:
            tasks = MemoryTaskStore()
        tasks.mark_missing(time.time())  # tasks of an earlier run of the host ran no more
        info = app_info or {
            "id": "anvil_nb" if name == DEFAULT_APP else name,
            "branch": "master",
            "environment": {"description": "Notebook", "tags": []},
        }
        return AppState(name, sessions, info, tasks=tasks)

    # The app ``default``'s parts, as a host of one app has them.
    @property
    def sessions(self) -> SessionManager:
        """The sessions of the app ``default``."""
        return self.apps[DEFAULT_APP].sessions

    @property
    def registry(self) -> Registry[PeerState]:
        """The registry of the app ``default``."""
        return self.apps[DEFAULT_APP].registry

    @property
    def app_info(self) -> dict[str, Any]:
        """What peers of the app ``default`` are told of it (``anvil.app`` on real clients)."""
        return self.apps[DEFAULT_APP].app_info

    @property
    def client_key(self) -> str | None:
        """The client key of the app ``default`` (shown to trusted code)."""
        return self.apps[DEFAULT_APP].client_key

    @client_key.setter
    def client_key(self, key: str | None) -> None:
        self.apps[DEFAULT_APP].client_key = key

    def app_origin(self, app: str = DEFAULT_APP) -> str | None:
        """The origin URL of *app* (``None`` when nothing listens on HTTP): the host's origin for
        ``default``, ``{origin}/app/NAME`` for another app.
        """
        if not self.origin:
            return None
        root = self.origin.rstrip("/")
        return root if app == DEFAULT_APP else f"{root}/app/{app}"

    def api_origin(self, app: str = DEFAULT_APP) -> str | None:
        """Where *app*'s HTTP endpoints are served: its origin + ``/_/api``."""
        origin = self.app_origin(app)
        return origin and origin + "/_/api"

    # -----------------------------------------------------------------------------------------
    # Peers

    def attach(
        self, peer: Peer, greet: bool = True, app: str = DEFAULT_APP, session_id: str | None = None
    ) -> None:
        """Start serving a connection whose handshake succeeded; it gets its own session, or
        joins the session *session_id* (a browser's cookie session, which outlives it).

        With *greet*, the peer is sent the ``auth`` message of the uplink protocol (browsers,
        which have no handshake, are not).
        """
        trusted = peer.kind in TRUSTED_TYPES
        peer.name = f"{peer.kind}-{next(self._peer_ids)}"
        state = self.app(app)
        owned = session_id is None or state.sessions.get(session_id) is None
        if owned:
            session_id = state.sessions.new(client=dict(peer.client)).id
        frame = {"type": peer.kind, "protocol-version": protocol.PROTOCOL_VERSION}
        ps = PeerState(peer, trusted, frame, session_id, state)  # type: ignore[arg-type]
        ps.owns_session = owned
        self._peers[peer] = ps
        if greet:
            self._send(ps, protocol.auth(peer.kind if trusted else "client", state.app_info))
        log.info("%s connected as %s", peer.name, peer.kind)

    def detach(self, peer: Peer) -> None:
        """Forget a connection: its names go, calls it was serving fail, its session is dropped."""
        ps = self._peers.pop(peer, None)
        if ps is None:
            return
        ps.app.watchers.discard(ps)
        for name in ps.app.registry.remove_provider(ps):
            self._emit_registration(name, ps, added=False)
        for req in list(ps.served.values()):
            self._release(
                req,
                UplinkDisconnectedError(
                    f"The connection serving {clip(req.command)!r} was lost ({peer.name})"
                ),
            )
        for req in list(ps.calls.values()):  # calls it made: their late answers are dropped
            req.caller = None
            self._release(req, late=True)
        if ps.owns_session or self._unused_cookie_session(ps):
            ps.app.sessions.drop(ps.session_id)
        log.info("%s disconnected", peer.name)

    def _unused_cookie_session(self, ps: PeerState) -> bool:
        """Whether the cookie session a leaving browser used holds nothing worth keeping (it
        never stored data or a login, so it was never written) and no other connection is in
        it: it is dropped rather than left in memory until it expires.
        """
        record = ps.app.sessions.get(ps.session_id)
        return (
            record is not None
            and not record.persistent
            and not any(p.session_id == ps.session_id for p in self._peers.values())
        )

    def call_once(
        self,
        peer: Peer,
        app: str,
        session_id: str,
        msg: dict[str, Any],
        media: Media | None = None,
        alternate_session: str | None = None,
    ) -> Request | None:
        """Route one call made by a door of the host itself (an HTTP request), not a connection.

        The call runs in the session *session_id* with ``peer.client`` as its client and a call
        stack of one frame of ``peer.kind``; its answer (or error) reaches ``peer.send`` as a
        connection's would. The door built *msg*, so it may name ``http:`` and ``route:``
        registrations, which no untrusted connection may. *alternate_session* is the session a
        provider may switch the call to (``anvil.private.switch_session!``: the cookie session
        of a cross-site request). Returns the request in flight (``None`` if it failed at once),
        whose ``session_id`` says which session it ended in; :meth:`abandon` it if the door
        gives up before the answer.
        """
        peer.name = f"{peer.kind}-{next(self._peer_ids)}"
        ps = PeerState(
            peer, peer.kind in TRUSTED_TYPES, {"type": peer.kind}, session_id, self.app(app)
        )
        ps.door = True
        self._on_call(ps, msg, media)
        req = ps.calls.get(msg.get("id"))
        if req is not None:
            req.alternate_session = alternate_session
        return req

    def abandon(self, req: Request) -> None:
        """Give up a call routed by :meth:`call_once`: a late answer is dropped quietly."""
        if req.caller is not None:
            req.caller = None
            self._release(req, late=True)

    def endpoint_command(self, app: str, path: str) -> str | None:
        """The command a request for ``_/api{path}`` calls: ``http:{path}`` if a provider
        serves it, else ``route:{path}``; ``None`` if neither is served.
        """
        registry = self.app(app).registry
        for prefix in ENDPOINT_PREFIXES:
            if registry.providers(prefix + path):
                return prefix + path
        return None

    def state(self, app: str = DEFAULT_APP) -> dict[str, Any]:
        """A snapshot of one app for ``_/admin/state`` and ``%anvil status``: its names, their
        providers and its peers.
        """
        state = self.app(app)
        return {
            "app": state.name,
            "origin": self.origin,
            "registrations": {
                name: [ps.peer.name for ps in providers]
                for name, providers in state.registry.names().items()
            },
            "peers": [
                {
                    "name": p.name,
                    "kind": p.kind,
                    "label": getattr(p, "label", None),
                    "ip": p.client.get("ip"),
                    "calls_in_flight": len(ps.calls),
                }
                for p, ps in self._peers.items()
                if ps.app is state
            ],
        }

    def housekeeping(self) -> list[str]:
        """Remove expired sessions and old task records, and persist idle clocks; call it every
        minute or so. Returns the ids of the sessions that expired.
        """
        gone = []
        for state in list(self.apps.values()):
            for session_id in state.sessions.purge():
                gone.append(session_id)
                self._emit_session(state, session_id, "expired")
            state.tasks.prune(state.name, time.time() - KEEP_SECONDS, KEEP_COUNT)
        return gone

    def close(self) -> None:
        """Stop: every call in flight fails with ``RuntimeUnavailableError``, every peer is closed."""
        for ps in list(self._peers.values()):
            for req in list(ps.calls.values()):
                self._release(req, RuntimeUnavailableError("The host is shutting down"))
        for peer in list(self._peers):
            peer.close("host shutting down")
            self.detach(peer)
        for task in list(self._async_calls):
            task.cancel()
        for state in self.apps.values():
            state.sessions.close()
            state.tasks.close()
        self.accounts.close()

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
            log.debug("message from a detached peer dropped")
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
            if isinstance(name, str) and ps.app.registry.remove(name, ps):
                self._emit_registration(name, ps, added=False)
        else:
            raise ProtocolError(f"unexpected message of kind {clip(kind)} from {peer.name}")

    def _on_register(self, ps: PeerState, msg: dict[str, Any]) -> None:
        if not ps.trusted:
            self._fatal(ps, protocol.CLIENT_REGISTER)
            return
        name = msg.get("name")
        try:
            if not isinstance(name, str):
                raise ValueError("the name must be a string")  # noqa: TRY004 - reported as a bad name  # noqa: TRY301
            added = ps.app.registry.add(name, ps)
        except ValueError as exc:
            self._quiet.warning(
                log, "bad-register", "%s: bad REGISTER %s: %s", ps.peer.name, clip(name),
                clip(str(exc)),
            )  # fmt: skip
            self._fatal(ps, protocol.BAD_NAME)
            return
        if added:
            self._emit_registration(name, ps, added=True)

    def _fatal(self, ps: PeerState, text: str) -> None:
        self._quiet.warning(log, "fatal:" + text[:40], "%s: %s", ps.peer.name, clip(text))
        self._send(ps, protocol.fatal(text))
        ps.peer.close(text)

    # -----------------------------------------------------------------------------------------
    # Sending: every message is encoded here, once, and checked against the frame limit

    def _encode(self, msg: dict[str, Any], what: str) -> bytes:
        """The frame of *msg*, or a SerializationError that says why it cannot be sent."""
        try:
            data = protocol.encode(msg)
        except ProtocolError as exc:
            raise SerializationError(f"The {what} cannot be relayed: {exc}") from None
        limit = self.limits.max_frame_bytes
        if len(data) > limit:
            raise SerializationError(
                f"The {what} would need a frame of {len(data):,} bytes, over the limit of "
                f"{limit:,} bytes: send large values as Media (they travel in chunks)"
            )
        return data

    def _send(
        self,
        ps: PeerState,
        msg: dict[str, Any],
        media: Media | None = None,
        data: bytes | None = None,
    ) -> None:
        """Send a message the host made (small by construction) or its pre-encoded *data*."""
        if data is None:
            data = protocol.encode(msg)
        ps.peer.send(data, media, msg.get("id"))

    def _over_queue(self, ps: PeerState) -> bool:
        return ps.peer.queued_bytes > self.limits.max_queued_bytes

    # -----------------------------------------------------------------------------------------
    # Calls

    def _on_call(self, ps: PeerState, msg: dict[str, Any], media: Media | None) -> None:
        call_id = msg.get("id")
        if type(call_id) is not str and type(call_id) is not int:
            raise ProtocolError("a CALL needs a string 'id'")
        try:
            if "command" not in msg and "liveObjectCall" in msg:
                self._live_object_call(ps, call_id, msg)
            else:
                self._route(ps, call_id, msg, media)
        except ProtocolError as exc:  # a malformed call: it fails alone, named for the caller
            self._fail(ps, call_id, SerializationError(str(exc)))
        except AnvilError as exc:
            self._fail(ps, call_id, exc)

    def _route(self, ps: PeerState, call_id: Any, msg: dict[str, Any], media: Media | None) -> None:
        command, args, kwargs = self._call_fields(msg)
        if call_id in ps.calls:
            raise ProtocolError(f"call id {clip(call_id)} is already in use on this connection")
        self._admit(ps)
        parent = parent_request(ps, msg)
        session_id, stack, client = self._place(ps, parent, command)
        if command.startswith("anvil.private.") and self._answer_privately(
            ps, call_id, command, msg, session_id, parent
        ):
            return
        record = self._session_for(ps, session_id, parent)
        objects = protocol.check_objects(msg.get("objects"), protocol.CALL_ROOTS)
        caps_in = self._check_capabilities(objects, record, ps.trusted)
        adopts = parent is not None and ps.trusted and isinstance(msg.get("sessionData"), dict)
        if adopts:
            self._adopt_session(parent, record, msg["sessionData"])  # type: ignore[arg-type]
        provider = ps.app.registry.pick(command)
        if provider is None:
            raise NoServerFunctionError(
                f'No server function matching "{clip(command)}" has been registered'
            )
        if self._over_queue(provider):
            raise QuotaExceededError(
                f"The connection serving {clip(command)!r} is not reading what it is sent; try later"
            )
        rid = f"server-{self._prefix}-{next(self._ids)}"
        out = protocol.call(
            rid,
            command,
            args,
            kwargs,
            self._sign_objects(objects, record),
            call_stack_id=rid,
            vt_global=msg.get("vt_global"),
            call_stack=stack,
            client=client,
            session_data=record.data if record.data is not None else {},
            session_id=record.id,
            app_info=ps.app.app_info,
        )
        data = self._encode(
            out, f"call to {clip(command)!r}"
        )  # fails this call alone, nothing held
        req = Request(
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
            trusted=ps.trusted,
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
        self._send(provider, out, media, data)
        if self._heard(ps.app, ps, provider):
            event = CallStarted(
                time=time.time(),
                call_id=rid,
                command=command,
                client=client,
                call_stack=tuple(f.get("type", "") for f in stack),
                trusted=ps.trusted,
                session_id=record.id,
                caller=ps.peer.name,
                provider=provider.peer.name,
                direction="host",
                app=ps.app.name,
            )
            self._publish(ps.app, event, ps, provider)

    def _answer_privately(
        self,
        ps: PeerState,
        call_id: Any,
        command: str,
        msg: dict[str, Any],
        session_id: str,
        parent: Request | None,
    ) -> bool:
        """Answer a private function the host serves itself (False: not one of those)."""
        handler = self._private.get(command)
        if handler is not None and command in _SESSIONLESS:  # keep-alives do not touch sessions
            self._send(ps, protocol.response(call_id, handler(ps, msg, None), []))
            return True
        if handler is None and command not in ACCOUNT_COMMANDS and command not in TASK_COMMANDS:
            return False
        record = self._session_for(ps, session_id, parent)
        if command in ACCOUNT_COMMANDS:
            self._start_async(ps, call_id, command, self._account_call(ps, command, msg, record))
        elif command in TASK_COMMANDS:
            self._task_command(ps, call_id, msg, record)
        else:
            self._send(ps, protocol.response(call_id, handler(ps, msg, record), []))  # type: ignore[misc]
        return True

    @staticmethod
    def _place(
        ps: PeerState, parent: Request | None, command: str
    ) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        """The session, call stack and client of a call (its parent's when it is nested)."""
        if parent is not None:
            session_id, stack, client = parent.session_id, [ps.frame, *parent.stack], parent.client
        else:
            session_id, stack, client = ps.session_id, [ps.frame], ps.peer.client
        if len(stack) > MAX_CALL_DEPTH:
            raise StackOverflow(
                f"Server calls are nested more than {MAX_CALL_DEPTH} deep (calling {clip(command)!r})"
            )
        if not ps.trusted and ":" in command and not ps.door:
            raise PermissionDenied(f"Untrusted callers cannot call {clip(command)!r}")
        return session_id, stack, client

    @staticmethod
    def _call_fields(msg: dict[str, Any]) -> tuple[str, list[Any], dict[str, Any]]:
        command = msg.get("command")
        if not isinstance(command, str):
            if "liveObjectCall" in msg:
                raise PermissionDenied("Live objects are not served by this host")
            raise ProtocolError("a CALL needs a string 'command'")
        args = msg.get("args", [])
        kwargs = msg.get("kwargs") or {}
        if type(args) is not list or type(kwargs) is not dict:
            raise ProtocolError("a CALL's 'args' must be a list and its 'kwargs' a dict")
        return command, args, kwargs

    def _admit(self, ps: PeerState) -> None:
        """Refuse a new call from a connection that already costs as much as it may."""
        if len(ps.calls) >= self.limits.max_calls_in_flight:
            raise QuotaExceededError(
                "Too many calls in flight on this connection "
                f"(at most {self.limits.max_calls_in_flight})"
            )
        if self._over_queue(ps):
            raise QuotaExceededError(
                "This connection is not reading its responses: over "
                f"{self.limits.max_queued_bytes:,} bytes are waiting for it"
            )

    def _adopt_session(self, parent: Request, record: SessionRecord, blob: dict[str, Any]) -> None:
        """A trusted caller serving *parent* sent its (maybe changed) copy of the session."""
        blob = self._session_blob(blob)
        if blob != record.data and record.version == parent.session_version:
            parent.provider.app.sessions.save_data(record, blob)
            parent.session_version = record.version

    @staticmethod
    def _session_blob(blob: dict[str, Any]) -> dict[str, Any]:
        """A clean copy of a session blob: its session and the entries inside it."""
        objects = protocol.check_objects(blob.get("objects"), protocol.SESSION_ROOTS, "sessionData")
        return {"session": blob.get("session"), "objects": objects}

    def _session_for(self, ps: PeerState, session_id: str, parent: Request | None) -> SessionRecord:
        try:
            return ps.app.sessions.use(session_id)
        except SessionExpiredError:
            fresh = ps.app.sessions.new(client=dict(ps.peer.client))
            if parent is not None:
                parent.session_id = fresh.id
            if ps.session_id == session_id:
                ps.session_id = fresh.id
            self._emit_session(ps, session_id, "expired", fresh.id)
            raise

    def _on_response(self, ps: PeerState, msg: dict[str, Any], media: Media | None) -> None:
        rid = msg["id"]
        query = ps.queries.pop(rid, None) if type(rid) is str else None
        if query is not None:  # GET_TASK_STATE, asked by a task's watcher
            if not query.done():
                query.set_result(msg)
            return
        req = ps.served.get(rid) if type(rid) is str else None
        if req is not None and req.task is not None:
            self._end_task(req, msg, media)
            self._release(req, None, ok="error" not in msg, out=msg)
            return
        if req is None:
            if type(rid) is str and self._late.pop(rid, False) is None:
                return  # released earlier (timed out, caller gone): its answer comes too late
            self._quiet.warning(
                log, "unknown-id", "%s: response for unknown call id %s dropped", ps.peer.name,
                clip(rid),
            )  # fmt: skip
            return
        caller = req.caller
        if caller is not None and self._over_queue(caller):
            self._shed(caller)  # this answer and every other one it is waiting for
            return
        try:
            out = self._relayed_response(req, msg)
            data = self._encode(out, f"response of {clip(req.command)!r}") if caller else b""
        except (ProtocolError, PermissionDenied, SerializationError) as exc:
            # No local keeps the exception: its traceback would hold this frame in a cycle.
            self._release(req, exc if exc.wire_type else SerializationError(str(exc)))
            return
        self._release(req, None, ok="error" not in out, out=out)
        if caller is not None:
            self._send(caller, out, media, data)

    def _shed(self, caller: PeerState) -> None:
        """Fail every call of a caller that is not reading its responses.

        Its queue is over the bound, so no answer may be added to it: each call it is waiting
        for fails now with a small error, and the answers still to come are dropped unread
        (never decoded into a relayed message, never queued). New calls are refused by
        :meth:`_admit` until it has read what it was sent.
        """
        error = QuotaExceededError(
            "Response dropped: this connection is not reading its responses (over "
            f"{self.limits.max_queued_bytes:,} bytes are waiting for it)"
        )
        for req in list(caller.calls.values()):
            self._release(req, error, late=True)

    def _relayed_response(self, req: Request, msg: dict[str, Any]) -> dict[str, Any]:
        """What the caller of *req* is sent for the provider's answer *msg*."""
        if "error" in msg:
            return protocol.error_message(req.caller_call_id, protocol.wire_error(msg["error"]))
        record = req.provider.app.sessions.get(req.session_id)
        data = msg.get("sessionData")
        if isinstance(data, dict) and record is not None:
            self._store_session(req, record, self._session_blob(data))
        objects = protocol.check_objects(msg.get("objects"), protocol.RESPONSE_ROOTS)
        if record is not None:
            self._check_capabilities(objects, record, trusted=True)
            objects = self._sign_objects(objects, record)
        session_back = None
        if req.adopts_session and record is not None and record.version != req.session_version:
            session_back = record.data if record.data is not None else {}
            if req.parent is not None:
                req.parent.session_version = record.version  # the caller now holds this copy
        return protocol.response(
            req.caller_call_id,
            msg.get("response"),
            objects,
            vt_global=msg.get("vt_global"),
            session_data=session_back,
            cap_updates=self._passed_updates(req, msg.get("capUpdates")),
        )

    def _store_session(self, req: Request, record: SessionRecord, data: dict[str, Any]) -> None:
        # Most calls leave the session as it was: write only what changed. A copy that went
        # out before the session last changed is stale and dropped, as the App Server does.
        if data == record.data:
            return
        if record.version == req.session_version:
            req.provider.app.sessions.save_data(record, data)
            self._emit_session(req.provider, record.id, "saved")
        else:
            log.info(
                "%s: session changed during %s; its copy is dropped", req.id, clip(req.command)
            )

    def _passed_updates(self, req: Request, updates: Any) -> dict[str, Any] | None:
        """The capability updates for capabilities the caller passed into this call."""
        if not updates or type(updates) is not dict or not req.caps_in:
            return None
        passed = {}
        for key, update in updates.items():
            norm = normalise_scope_key(key) if isinstance(key, str) else None
            if norm is not None and norm in req.caps_in:
                passed[norm] = update
                app = req.provider.app
                if self._heard(app, req.caller, req.provider):
                    event = CapabilityUpdated(
                        time.time(), req.id, norm, update, direction="host", app=app.name
                    )
                    self._publish(app, event, req.caller, req.provider)
        return passed or None

    def _time_out(self, req: Request) -> None:
        req.timer = None
        if req.provider.served.get(req.id) is req:
            self._release(
                req, TimeoutError(f"Server call {clip(req.command)!r} timed out"), late=True
            )

    def _release(
        self,
        req: Request,
        error: AnvilError | None = None,
        *,
        ok: bool = False,
        out: dict[str, Any] | None = None,
        late: bool = False,
    ) -> None:
        """End *req*: forget it everywhere, stop its timer, tell its caller of *error*.

        The one place a request ends, on every path. With *late*, an answer that still comes
        from the provider is dropped quietly.
        """
        req.provider.served.pop(req.id, None)
        if req.task is not None and error is not None:  # its provider was lost
            self._finish_task(req, "missing")
        if req.timer is not None:
            req.timer.cancel()
            req.timer = None
        if late:
            self._late[req.id] = None
            if len(self._late) > 10_000:
                self._late.pop(next(iter(self._late)))
        caller, req.caller = req.caller, None
        if caller is not None:
            caller.calls.pop(req.caller_call_id, None)
            if error is not None:
                self._fail(caller, req.caller_call_id, error)
        if (caller is None and error is None and out is None) or not self._heard(
            req.provider.app, caller, req.provider
        ):
            return
        if error is not None:
            self._emit_finished(req, caller, ok=False, error=error.wire_type, message=str(error))
        elif out is not None:
            err = out.get("error") or {}
            self._emit_finished(
                req, caller, ok=ok, error=err.get("type"), message=err.get("message"),
                trace=err.get("trace") or (),
            )  # fmt: skip

    def _fail(self, ps: PeerState, call_id: Any, exc: AnvilError) -> None:
        error = error_to_wire(exc)
        error["trace"] = []  # the host's own frames mean nothing to the caller
        self._send(ps, protocol.error_message(call_id, error))

    # -----------------------------------------------------------------------------------------
    # Capabilities

    def _check_capabilities(
        self, objects: Any, record: SessionRecord, trusted: bool
    ) -> frozenset[str]:
        """Verify the capabilities in a message; return their full-scope keys.

        Every MAC must be valid for the call's session: a forged one, or one issued to another
        session, fails the call with ``PermissionDenied`` whoever sent it (as on the App
        Server). Only trusted code may send a capability with no MAC at all (one it minted),
        and never one of a ``"_"`` scope.
        """
        keys: list[str] = []
        for entry in objects:
            if "Capability" not in entry.get("type", ()):
                continue
            scope, mac, narrow = entry.get("scope"), entry.get("mac"), entry.get("narrow") or []
            if type(scope) is not list or type(narrow) is not list:
                raise PermissionDenied("Invalid Capability: its scope must be a list")
            try:
                full = scope_key(scope + narrow)
            except (TypeError, ValueError, RecursionError):
                raise PermissionDenied("Invalid Capability: its scope is not plain JSON") from None
            if mac is None:
                if not trusted or not scope or scope[0] == "_":
                    raise PermissionDenied(
                        f"Invalid Capability {clip(scope + narrow)}: it carries no MAC, and only trusted "
                        "code may pass a capability it made itself"
                    )
            elif not verify_scope(self.secret, record.secret, scope, mac):
                raise PermissionDenied(
                    f"Invalid Capability {clip(scope + narrow)}: it was not issued to this session "
                    "(forged, from another session, or its session has expired)"
                )
            keys.append(full)
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

    def _echo(self, _ps: PeerState, msg: dict[str, Any], _rec: SessionRecord | None) -> Any:
        args = msg.get("args") or [None]
        return args[0]

    def _move_session(self, ps: PeerState, old: str, new: str, *, copies_valid: bool) -> None:
        """Every connection and request of *ps*'s app in session *old* continues in *new*.

        Unless *copies_valid* (a login: the data moved with the id), the copies of the session
        that requests in flight hold belong to the old session, and are dropped when they come
        back.
        """
        extra = [ps] if ps.door else []  # a door is no connection: not among the peers
        for state in (*self._peers.values(), *extra):
            if state.app is not ps.app:
                continue
            if state.session_id == old:
                state.session_id = new
            for req in state.served.values():
                if req.session_id == old:
                    req.session_id = new
                    if not copies_valid:
                        req.session_version = -1
                if req.alternate_session == old:
                    req.alternate_session = new

    def _reset_session(self, ps: PeerState, msg: dict[str, Any], rec: SessionRecord | None) -> str:
        if rec is None:
            raise InternalError("There is no session to reset")
        sessions = ps.app.sessions
        fresh = sessions.new(client=rec.client, persistent=rec.persistent)
        parent = parent_request(ps, msg)
        self._move_session(ps, rec.id, fresh.id, copies_valid=False)
        if parent is not None:
            parent.session_id = fresh.id
            parent.session_version = fresh.version  # the call that reset it continues in it
        sessions.drop(rec.id)
        self._emit_session(ps, rec.id, "reset", fresh.id)
        return fresh.id

    # -----------------------------------------------------------------------------------------
    # Users (anvil.private.users.*): password work runs on the accounts' pool, off this loop

    def _live_object_call(self, ps: PeerState, call_id: Any, msg: dict[str, Any]) -> None:
        """A ``liveObjectCall``: a background task's methods, and ``get_id()`` of a user row."""
        spec = msg.get("liveObjectCall")
        backend = spec.get("backend") if isinstance(spec, dict) else None
        if backend == TASK_BACKEND:
            self._start_async(ps, call_id, "a background task", self._task_live_call(ps, msg))
        elif backend == ROW_BACKEND and spec.get("method") == "get_id":  # type: ignore[union-attr]
            self._send(ps, protocol.response(call_id, self.accounts.row_id(ps.app.name, spec), []))
        else:
            raise PermissionDenied(
                f"Live objects of backend {clip(backend)} are not served by this host"
            )

    def _start_async(
        self,
        ps: PeerState,
        call_id: Any,
        what: str,
        work: Coroutine[Any, Any, tuple[Any, list[Any]]],
    ) -> None:
        """Answer a call the host serves itself once *work* is done (a login's password check,
        a task's state from its provider), without holding up the loop meanwhile. A connection
        may have :data:`MAX_ASYNC_CALLS` of these waiting at once.
        """
        if ps.pending_async >= MAX_ASYNC_CALLS:
            work.close()
            raise QuotaExceededError(
                f"Too many calls to {what} waiting on this connection (at most {MAX_ASYNC_CALLS})"
            )
        ps.pending_async += 1
        task = asyncio.get_running_loop().create_task(work)
        self._async_calls.add(task)

        def done(task: asyncio.Task[tuple[Any, list[Any]]]) -> None:
            self._async_calls.discard(task)
            ps.pending_async -= 1
            if ps.peer not in self._peers:
                return  # the caller went away meanwhile
            exc = None if task.cancelled() else task.exception()
            if task.cancelled() or exc is not None:
                wire = getattr(exc, "wire", None)
                if isinstance(wire, dict):  # an error kept as it came (a failed task's)
                    self._send(ps, protocol.error_message(call_id, protocol.wire_error(wire)))
                    return
                if isinstance(exc, ProtocolError):  # a malformed answer: named, as a call's is
                    error: AnvilError = SerializationError(str(exc))
                else:
                    error = exc if isinstance(exc, AnvilError) else InternalError(f"{what} failed")
                if not isinstance(exc, AnvilError):
                    log.error("%s failed", what, exc_info=exc)
                self._fail(ps, call_id, error)
                return
            value, objects = task.result()
            self._send(ps, protocol.response(call_id, value, objects))

        task.add_done_callback(done)

    async def _account_call(
        self, ps: PeerState, command: str, msg: dict[str, Any], rec: SessionRecord
    ) -> tuple[Any, list[Any]]:
        app, accounts = ps.app.name, self.accounts
        users = accounts.users(app)
        name = command.rsplit(".", 1)[1]
        if name == "get_current_user":
            return accounts.answer(app, users.get(rec.user_id) if rec.user_id else None)
        if name == "logout":
            self._log_in(ps, msg, rec, None)
            return None, []
        if name == "force_login":
            if not ps.trusted:
                raise PermissionDenied("force_login is only available to server code")
            objects = protocol.check_objects(msg.get("objects"), protocol.CALL_ROOTS)
            entry = next((o for o in objects if o.get("path") == ["args", 0]), None)
            user = accounts.user_of_row(app, entry)
        else:
            args = msg.get("args") or []
            if len(args) < 2:
                raise AuthenticationFailed(f"{name} needs an email address and a password")
            work = users.login if name == "login_with_email" else users.signup
            user = await accounts.run(work, args[0], args[1])
        self._log_in(ps, msg, rec, user.id)
        return accounts.answer(app, user)

    def _log_in(
        self, ps: PeerState, msg: dict[str, Any], rec: SessionRecord, user_id: str | None
    ) -> None:
        """Make *user_id* (``None``: nobody) the session's user, under a new session id.

        Every connection and request in that session moves to the new id with it (their
        copies of the data stay valid: only the id and its secret change).
        """
        sessions = ps.app.sessions
        if sessions.get(rec.id) is not rec:
            raise SessionExpiredError("The session ended while logging in; log in again")
        fresh = sessions.replace(rec, user_id)
        self._move_session(ps, rec.id, fresh.id, copies_valid=True)
        parent = parent_request(ps, msg)
        if parent is not None and parent.session_id == rec.id:
            parent.session_id = fresh.id
        self._emit_session(ps, rec.id, "login" if user_id else "logout", fresh.id)

    def _switch_session(self, ps: PeerState, msg: dict[str, Any], rec: SessionRecord | None) -> Any:
        """``anvil.private.switch_session!`` (an endpoint with ``cross_site_session``): move the
        HTTP request being served to its alternate session (the cookie session of a cross-site
        request) and answer that session's blob; else answer the current one's.
        """
        parent = parent_request(ps, msg)
        if not ps.trusted or parent is None:
            raise PermissionDenied("switch_session is for the endpoint serving an HTTP request")
        alternate, parent.alternate_session = parent.alternate_session, None
        if alternate is not None:
            try:
                rec = ps.app.sessions.use(alternate)
            except SessionExpiredError:
                rec = None
            if rec is not None:
                parent.session_id, parent.session_version = rec.id, rec.version
        return rec.data if rec is not None else None

    def _watch_events(self, ps: PeerState, _msg: dict[str, Any], _rec: SessionRecord | None) -> Any:
        """Push this (trusted, anvil_nb) peer the events of its app it is not a party to, from
        now on; the answer is the app's state now and the name the host knows the peer by.
        """
        if not ps.trusted:
            raise PermissionDenied("Only trusted code may watch the app's events")
        ps.app.watchers.add(ps)
        return {**self.state(ps.app.name), "you": ps.peer.name}

    def _report_classes(
        self, ps: PeerState, msg: dict[str, Any], _rec: SessionRecord | None
    ) -> int:
        """A trusted anvil_nb peer says which portable classes it defines (shown, not used)."""
        if not ps.trusted:
            raise PermissionDenied("Only trusted code may report portable classes")
        names = (msg.get("args") or [[]])[0]
        if type(names) is not list:
            raise ProtocolError("anvil.private.report_classes takes a list of names")
        ps.classes = tuple(sorted({clip(n) for n in names[:1000] if type(n) is str}))
        return len(ps.classes)

    def portable_classes(self, app: str = DEFAULT_APP) -> list[str]:
        """The portable classes the peers of *app* said they define."""
        state = self.app(app)
        return sorted({c for ps in self._peers.values() if ps.app is state for c in ps.classes})

    def _host_state(self, ps: PeerState, _msg: dict[str, Any], _rec: SessionRecord | None) -> Any:
        if not ps.trusted:
            raise PermissionDenied("Only trusted code may read the host's state")
        return {
            **self.state(ps.app.name),
            "client_key": ps.app.client_key,
            "server_key": ps.app.server_key,
        }

    def _capability_is_valid(
        self, ps: PeerState, msg: dict[str, Any], _rec: SessionRecord | None
    ) -> bool:
        """Whether a MAC holds for the caller's session now (False once it expired or reset)."""
        args = msg.get("args") or []
        if len(args) != 2 or type(args[0]) is not list:
            return False
        parent = parent_request(ps, msg)
        sessions = ps.app.sessions
        rec = sessions.get(parent.session_id if parent is not None else ps.session_id)
        if rec is None or sessions.is_expired(rec):
            return False
        return verify_scope(self.secret, rec.secret, args[0], args[1])

    # -----------------------------------------------------------------------------------------
    # Events

    def _heard(self, app: AppState, *parties: PeerState | None) -> bool:
        """Whether an event of *app* between *parties* has anyone to hear it (checked before
        one is built: a kernel that serves every call of its app is told none of them).
        """
        if self.events.active:
            return True
        return bool(app.watchers) and any(w not in parties for w in app.watchers)

    def _publish(self, app: AppState, event: Event, *parties: PeerState | None) -> None:
        """Put *event* on the host's stream: its subscribers now, and each watcher of *app*
        that was not a party to it at the end of this turn of the loop (batched).
        """
        if self.events.active:
            self.events.emit(event)
        if not app.watchers:
            return
        body = to_wire(event)
        for watcher in app.watchers:
            if watcher in parties:
                continue
            if not watcher.outbox:
                try:
                    asyncio.get_running_loop().call_soon(self._push_events, watcher)
                except RuntimeError:  # driven without a loop (tests): push at once
                    watcher.outbox.append(body)
                    self._push_events(watcher)
                    continue
            if len(watcher.outbox) < _MAX_OUTBOX:
                watcher.outbox.append(body)

    def _push_events(self, watcher: PeerState) -> None:
        events, watcher.outbox = watcher.outbox, []
        if not events or self._peers.get(watcher.peer) is not watcher:
            return
        if self._over_queue(watcher):  # it is not reading: events are the first thing to go
            self._quiet.warning(
                log, "events-dropped", "%s is not reading; %d events for it dropped",
                watcher.peer.name, len(events),
            )  # fmt: skip
            return
        self._send(watcher, protocol.events(events))

    def _emit_registration(self, name: str, ps: PeerState, added: bool) -> None:
        if self.events.active or ps.app.watchers:
            event = RegistrationChanged(time.time(), name, ps.peer.name, added, app=ps.app.name)
            # A provider knows what it registered; it is told when the host withdraws a name.
            self._publish(ps.app, event, ps if added else None)

    def _emit_session(
        self,
        where: PeerState | AppState,
        session_id: str,
        reason: str,
        replaced_by: str | None = None,
    ) -> None:
        """A session of *where* (an app, or the peer whose call changed it) changed."""
        app, party = (where, None) if isinstance(where, AppState) else (where.app, where)
        if self._heard(app, party):
            provider = party.peer.name if party is not None else ""
            event = SessionChanged(
                time.time(), session_id, reason, replaced_by=replaced_by, provider=provider,
                app=app.name,
            )  # fmt: skip
            self._publish(app, event, party)

    def _emit_finished(
        self,
        req: Request,
        caller: PeerState | None,
        ok: bool,
        error: str | None = None,
        message: str | None = None,
        trace: Any = (),
    ) -> None:
        app = req.provider.app
        event = CallFinished(
            time=time.time(),
            call_id=req.id,
            command=req.command,
            duration=time.perf_counter() - req.started,
            ok=ok,
            error_type=error,
            error_message=message,
            direction="host",
            trace=tuple(trace),
            app=app.name,
        )
        self._publish(app, event, caller, req.provider)
