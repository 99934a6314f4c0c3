"""The runtime of a process connected to a host: it serves this process's callables and makes calls.

A :class:`Client` joins one host through a :class:`~anvil_nb.transports.base.Transport` as a
provider and caller. It registers every function of its :class:`FunctionRegistry`, then

* for each CALL from the host: rebuilds the arguments, builds the :class:`CallContext` and the
  session, and runs the function on a bounded worker pool (``async def`` functions run on the
  client's own event loop), each call in its own ``contextvars`` context; then it sends the
  result, the changed session and any capability updates back;
* for each outgoing call: serialises the arguments (a copy, always), sends them, waits for the
  response, rebuilds it and applies capability updates to the capabilities it passed in.

A call made while serving another call is *nested*: it carries that call's id, so the host
keeps it in the same session and stacks the frames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import io
import itertools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from anvil_nb import _output, protocol
from anvil_nb.capability import Capability, scope_key
from anvil_nb.context import CallContext
from anvil_nb.errors import (
    AppOfflineError,
    NoServerFunctionError,
    PermissionDenied,
    ProtocolError,
    SerializationError,
    UplinkDisconnectedError,
    error_from_wire,
    error_to_wire,
    trace_of,
)
from anvil_nb.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    EventBus,
    RegistrationChanged,
    RegistrySnapshot,
    SessionChanged,
)
from anvil_nb.serialise import deserialise, serialise
from anvil_nb.transports.base import Transport

__all__ = [
    "CallState",
    "Client",
    "FunctionRegistry",
    "Registered",
    "current_call",
    "reset_current_session",
]

log = logging.getLogger("anvil_nb.client")

_PRIV_TYPES = {"uplink": "uplink", "client": "client_uplink", "server_module": "server_module"}


# ---------------------------------------------------------------------------------------------
# Local functions


@dataclass(frozen=True, slots=True)
class Registered:
    """A function this process serves under a name (a full-match regex)."""

    name: str
    fn: Callable[..., Any]
    require_user: Any = None
    pattern: re.Pattern[str] | None = None
    is_async: bool = False


class FunctionRegistry:
    """The functions a process serves. Connected clients are told of every change."""

    def __init__(self) -> None:
        self._by_name: dict[str, Registered] = {}
        self._listeners: list[Callable[[str, bool], None]] = []
        self._lock = threading.Lock()

    def register(self, name: str, fn: Callable[..., Any], require_user: Any = None) -> Registered:
        """Serve *fn* under *name*; a new function under a taken name replaces the old one."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"A server function's name must be a non-empty str, not {name!r}")
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        try:
            pattern = re.compile(name)
        except re.error as exc:
            raise ValueError(f"Invalid function name specification {name!r}: {exc}") from exc
        entry = Registered(name, fn, require_user, pattern, inspect.iscoroutinefunction(fn))
        with self._lock:
            is_new = name not in self._by_name
            self._by_name[name] = entry
            listeners = list(self._listeners)
        if is_new:
            for listener in listeners:
                listener(name, True)
        return entry

    def unregister(self, name: str) -> bool:
        """Stop serving *name*; True if it was registered."""
        with self._lock:
            gone = self._by_name.pop(name, None) is not None
            listeners = list(self._listeners)
        if gone:
            for listener in listeners:
                listener(name, False)
        return gone

    def lookup(self, command: str) -> Registered | None:
        """The function serving *command*: an exact name first, else the first full match."""
        entry = self._by_name.get(command)
        if entry is not None and entry.pattern is not None and entry.pattern.fullmatch(command):
            return entry
        for entry in list(self._by_name.values()):
            if entry.pattern is not None and entry.pattern.fullmatch(command):
                return entry
        return None

    def names(self) -> list[str]:
        """Every registered name."""
        with self._lock:
            return list(self._by_name)

    def get(self, name: str) -> Registered | None:
        """The registration under exactly *name*."""
        return self._by_name.get(name)

    def add_listener(self, listener: Callable[[str, bool], None]) -> Callable[[], None]:
        """Call ``listener(name, added)`` on every change; returns a function that removes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return remove


#: The functions of this process, registered by ``@server.callable`` and ``%%callable``.
functions = FunctionRegistry()

#: Called to find the logged-in user for ``require_user``; the users service replaces it.
user_hook: Callable[[], Any] = lambda: None  # noqa: E731


# ---------------------------------------------------------------------------------------------
# The current call


@dataclass(eq=False)
class CallState:
    """What the runtime knows about the call being served in this context."""

    client: Client
    request_id: str
    command: str
    context: CallContext
    session: dict[str, Any]
    session_id: str | None
    capabilities: list[Capability] = field(default_factory=list)
    #: What the call printed, when the client captures output (kernels do).
    output: io.StringIO | None = None


_current: contextvars.ContextVar[CallState | None] = contextvars.ContextVar(
    "anvil_nb_call", default=None
)


def current_call() -> CallState | None:
    """The call being served in this context, or ``None`` outside server calls."""
    return _current.get()


# ---------------------------------------------------------------------------------------------
# The client


class _Pending(concurrent.futures.Future):  # type: ignore[type-arg]
    __slots__ = ("call_id", "caps", "command", "started", "state", "watched")


class Client:
    """A connection of this process to a host.

    Parameters
    ----------
    transport : Transport
        How to reach the host.
    functions : FunctionRegistry, optional
        The functions to serve (default: this process's).
    workers : int
        The size of the worker pool that runs incoming calls.
    """

    def __init__(
        self, transport: Transport, *, functions: FunctionRegistry = functions, workers: int = 32
    ):
        self.transport = transport
        self.functions = functions
        self.events = EventBus()
        self.own_type = "uplink"
        self.app_info: dict[str, Any] = {}
        self.fatal: str | None = None
        self._watching = False
        #: Capture what calls print (see :mod:`anvil_nb._output`; kernels turn it on).
        self.capture_output = False
        self._pending: dict[str, _Pending] = {}
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="anvil_nb-call"
        )
        self._authed = threading.Event()
        self._connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._remove_listener: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Client:
        """Connect, register every function and wait until the host has them all."""
        try:
            self.transport.open(self._on_message, self._on_closed)
        except ConnectionError as exc:
            self._pool.shutdown(wait=False)
            raise AppOfflineError(str(exc)) from exc
        if not self._authed.wait(timeout):
            self.close()
            raise AppOfflineError(f"The host did not answer the handshake within {timeout} s")
        if self.fatal is not None:
            raise AppOfflineError(f"Anvil fatal error: {self.fatal}")
        self._connected = True
        self._remove_listener = self.functions.add_listener(self._on_registration)
        for name in self.functions.names():
            self.transport.send({"type": "REGISTER", "name": name})
        self.sync()
        return self

    def sync(self) -> None:
        """Wait until the host has handled everything sent so far (one round trip)."""
        self.call("anvil.private.echo", "sync")

    @property
    def connected(self) -> bool:
        """Whether the connection is up."""
        return self._connected

    def close(self) -> None:
        """Close the connection; calls in flight fail with ``UplinkDisconnectedError``."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        self.transport.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def _on_registration(self, name: str, added: bool) -> None:
        if not self._connected:
            return
        self.transport.send({"type": "REGISTER" if added else "UNREGISTER", "name": name})
        if current_call() is None:
            self.sync()  # in effect on the host as soon as the registration call returns

    # -- incoming ------------------------------------------------------------------------------
    def _on_message(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        kind = protocol.kind_of(msg)
        if kind == "response":
            pending = self._pending.pop(msg["id"], None)
            if pending is not None:
                pending.set_result((msg, media))
        elif kind == "CALL":
            try:
                self._pool.submit(contextvars.Context().run, self._serve, msg, media)
            except RuntimeError:  # the pool is shut down: we are closing
                log.debug("call %s dropped: client closing", msg.get("id"))
        elif kind == "auth":
            self.own_type = _PRIV_TYPES.get(str(msg.get("priv")), "uplink")
            self.app_info = msg.get("app-info") or {}
            if self._remove_listener is not None:  # a reconnection: register everything again
                self._connected = True
                for name in self.functions.names():
                    self.transport.send({"type": "REGISTER", "name": name})
                if self._watching:  # and watch again; the answer is the registry as it is now
                    pending = self.send_call("anvil.private.watch_registry", [], {})
                    pending.add_done_callback(
                        lambda f: (
                            None
                            if f.exception()
                            else self._emit_snapshot(f.result()[0].get("response"))
                        )
                    )
            self._authed.set()
        elif kind == "fatal":
            self.fatal = str(msg.get("error"))
            log.error("Anvil fatal error: %s", self.fatal)
            self._authed.set()
        elif kind == "output":
            log.info("Anvil server output: %s", msg.get("output"))
        elif kind == "EVENT":  # pushed by the host after anvil.private.watch_registry
            event = msg.get("event") or {}
            if event.get("kind") == "registration" and self.events.active:
                self.events.emit(RegistrationChanged(
                    time.time(), str(event.get("name")), str(event.get("provider")), bool(event.get("added"))
                ))  # fmt: skip
        else:
            log.warning("unrecognised message from the host: %.200r", msg)

    def _on_closed(self, reason: str) -> None:
        self._connected = False
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(UplinkDisconnectedError(f"Connection to the host lost: {reason}"))

    # -- serving -------------------------------------------------------------------------------
    def _serve(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        rid = str(msg.get("id"))
        command = str(msg.get("command"))
        started = time.perf_counter()
        context = CallContext.from_wire(self.own_type, msg.get("client"), msg.get("call-stack"))
        trusted = context.remote_caller.is_trusted if context.remote_caller else True
        state = CallState(self, rid, command, context, {}, msg.get("session-id"))
        _current.set(state)
        if self.capture_output:
            state.output = _output.start_capture()
        try:
            entry = self.functions.lookup(command)
            if entry is None:
                raise NoServerFunctionError(
                    f'No server function matching "{command}" has been registered'
                )
            deserialise(
                msg, media=media, remote_is_trusted=trusted, capabilities=state.capabilities
            )
            for cap in state.capabilities:
                cap._validity = self._capability_is_valid
            state.session = self._load_session(msg.get("sessionData"))
            if entry.require_user and user_hook() is None:
                raise PermissionDenied("You must be logged in to call this server function")
            args, kwargs = msg.get("args") or [], msg.get("kwargs") or {}
            if self.events.active:
                self.events.emit(CallStarted(
                    time=time.time(), call_id=rid, command=command,
                    client=msg.get("client"), call_stack=tuple(f.type for f in context.call_stack),
                    trusted=trusted, session_id=state.session_id,
                    background_task_id=context.background_task_id, args=tuple(args), kwargs=dict(kwargs),
                ))  # fmt: skip
            if entry.is_async:
                coro = entry.fn(*args, **kwargs)
                ctx = contextvars.copy_context()
                loop = self._async_loop()
                loop.call_soon_threadsafe(
                    ctx.run, loop.create_task, self._finish_async(state, coro, trusted, started)
                )
                return
            result = entry.fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(state, trusted, started, error=exc)
            return
        self._finish(state, trusted, started, result=result)

    async def _finish_async(
        self, state: CallState, coro: Any, trusted: bool, started: float
    ) -> None:
        try:
            result = await coro
        except BaseException as exc:
            self._finish(state, trusted, started, error=exc)
            return
        self._finish(state, trusted, started, result=result)

    def _finish(
        self,
        state: CallState,
        trusted: bool,
        started: float,
        result: Any = None,
        error: BaseException | None = None,
    ) -> None:
        media: dict[str, bytes] = {}
        if error is None:
            try:
                enc = serialise({"response": result}, remote_is_trusted=trusted)
                msg: dict[str, Any] = {"id": state.request_id, **enc.message}
                msg["sessionData"] = self._dump_session(state.session)
                updates = {}
                for cap in state.capabilities:
                    update = cap._take_update()
                    if update is not None:
                        updates[scope_key(cap.scope)] = update
                        if self.events.active:
                            self.events.emit(CapabilityUpdated(
                                time.time(), state.request_id, scope_key(cap.scope), update, "sent"
                            ))  # fmt: skip
                if updates:
                    msg["capUpdates"] = updates
                media = {mid: m.get_bytes() for mid, m in enc.media}
                if updates:  # updates are sent as they are: they must be plain JSON
                    protocol.encode(updates)
            except Exception as exc:
                error = exc
        if error is not None:
            msg = {"id": state.request_id, "error": error_to_wire(error), "objects": []}
            media = {}
        # Events first, so that whoever watches has the outcome before the caller has it.
        if self.events.active:
            self.events.emit(CallFinished(
                time=time.time(), call_id=state.request_id, command=state.command,
                duration=time.perf_counter() - started, ok=error is None,
                error_type=None if error is None else type(error).__name__,
                error_message=None if error is None else str(error), result=result,
                output=state.output.getvalue() if state.output is not None else "",
                trace=() if error is None else tuple(trace_of(error.__traceback__)),
            ))  # fmt: skip
            if error is None and state.session_id:
                self.events.emit(
                    SessionChanged(time.time(), state.session_id, "saved", dict(state.session))
                )
        try:
            try:
                self.transport.send(msg, media)
            except ProtocolError as exc:  # not JSON after all: the caller must still hear back
                error = SerializationError(f"The response could not be encoded: {exc}")
                self.transport.send(
                    {"id": state.request_id, "error": error_to_wire(error), "objects": []}
                )
        except Exception:
            log.exception("could not send the response to %s", state.request_id)

    def _load_session(self, blob: Any) -> dict[str, Any]:
        if not isinstance(blob, dict) or blob.get("session") is None:
            return {}
        blob = dict(blob)
        deserialise(blob, remote_is_trusted=True)
        session = blob.get("session")
        return session if isinstance(session, dict) else {}

    def _dump_session(self, session: dict[str, Any]) -> dict[str, Any]:
        try:
            enc = serialise({"session": session}, remote_is_trusted=True)
        except SerializationError as exc:
            raise SerializationError(f"server.session cannot hold this value: {exc}") from exc
        if enc.media:
            raise SerializationError(
                "server.session cannot hold Media objects; store them elsewhere"
            )
        return enc.message

    def _async_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=_run_loop, args=(loop,), name="anvil_nb-async", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _emit_made(
        self, pending: _Pending, result: Any = None, error: BaseException | None = None
    ) -> None:
        """The CallFinished event of a call made from here (when someone listens)."""
        if not getattr(pending, "watched", False) or not self.events.active:
            return
        self.events.emit(CallFinished(
            time=time.time(), call_id=pending.call_id, command=pending.command,
            duration=time.perf_counter() - pending.started, ok=error is None,
            error_type=None if error is None else type(error).__name__,
            error_message=None if error is None else str(error), result=result, direction="out",
            trace=tuple(getattr(error, "remote_trace", ()) or ()),
        ))  # fmt: skip

    def watch_registry(self) -> dict[str, Any]:
        """Have the host push registration changes (again after a reconnection); its state now."""
        state = self.call("anvil.private.watch_registry")
        self._watching = True
        self._emit_snapshot(state)
        return state

    def _emit_snapshot(self, state: Any) -> None:
        if isinstance(state, dict) and self.events.active:
            self.events.emit(RegistrySnapshot(time.time(), dict(state.get("registrations") or {})))

    def _capability_is_valid(self, cap: Capability) -> bool:
        return bool(self.call("anvil.private.capability_is_valid", cap._scope, cap._mac))

    # -- calling -------------------------------------------------------------------------------
    def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Call a server function by name and return its result (a copy)."""
        pending = self.send_call(command, args, kwargs)
        return self._result(pending, *pending.result())

    async def call_async(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call`, awaitable from asyncio code."""
        pending = self.send_call(command, args, kwargs)
        msg, media = await asyncio.wrap_future(pending)
        return self._result(pending, msg, media)

    def send_call(
        self, command: str, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any]
    ) -> _Pending:
        """Send a CALL; the returned future resolves to the raw response and its media."""
        if not isinstance(command, str):
            raise TypeError(f"The function name must be a str, not {type(command).__name__}")
        if not self._connected and self._authed.is_set() and self.fatal is None:
            raise UplinkDisconnectedError("Not connected to the host")
        if self.fatal is not None:
            raise AppOfflineError(f"Anvil fatal error: {self.fatal}")
        enc = serialise({"args": list(args), "kwargs": kwargs}, remote_is_trusted=True)
        call_id = f"{self._id_prefix}{next(self._ids)}"
        msg = {"type": "CALL", "id": call_id, "command": command, **enc.message}
        state = _current.get()
        if state is not None and state.client is self:
            msg["call-stack-id"] = state.request_id
            msg["sessionData"] = self._dump_session(state.session)
        pending = _Pending()
        pending.caps = enc.capabilities
        pending.started = time.perf_counter()
        pending.watched = self.events.active and not command.startswith("anvil.private.")
        if pending.watched:
            self.events.emit(CallStarted(
                time=time.time(), call_id=call_id, command=command, client=None, call_stack=(),
                trusted=True, session_id=state.session_id if state is not None else None,
                args=tuple(args), kwargs=dict(kwargs), direction="out",
            ))  # fmt: skip
        pending.state = state if state is not None and state.client is self else None
        pending.call_id, pending.command = call_id, command
        self._pending[call_id] = pending
        try:
            self.transport.send(
                msg, {mid: m.get_bytes() for mid, m in enc.media} if enc.media else None
            )
        except Exception as exc:
            self._pending.pop(call_id, None)
            raise UplinkDisconnectedError(f"Could not send the call to {command!r}: {exc}") from exc
        return pending

    def _result(self, pending: _Pending, msg: dict[str, Any], media: Mapping[str, bytes]) -> Any:
        if "error" in msg:
            exc = error_from_wire(msg["error"], where="the server function")
            self._emit_made(pending, error=exc)
            raise exc
        deserialise(msg, media=media, remote_is_trusted=True)
        updates = msg.get("capUpdates")
        if updates:
            for cap in pending.caps:
                key = scope_key(cap.scope)
                if key in updates:
                    cap._apply_update(updates[key])
                    if self.events.active:
                        self.events.emit(
                            CapabilityUpdated(
                                time.time(), pending.call_id, key, updates[key], "received"
                            )
                        )
        self._emit_made(pending, result=msg.get("response"))
        state = pending.state
        if state is not None and isinstance(msg.get("sessionData"), dict):
            fresh = self._load_session(msg["sessionData"])
            state.session.clear()
            state.session.update(fresh)
        return msg.get("response")


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()


def reset_current_session(client: Client) -> str:
    """Reset the session of the current call (or the connection's) and return the new id."""
    state = current_call()
    old_id = state.session_id if state is not None and state.client is client else None
    new_id = str(client.call("anvil.private.reset_session"))
    if old_id and client.events.active:
        client.events.emit(SessionChanged(time.time(), old_id, "reset", replaced_by=new_id))
    if state is not None and state.client is client:
        state.session.clear()
        state.session_id = new_id
        for cap in state.capabilities:
            cap._validity = client._capability_is_valid
    return new_id
