"""The runtime of a process connected to a host: it serves this process's callables and makes calls.

A :class:`Client` joins one host through a :class:`~anvil_nb.core.transport.Transport` as a
provider and caller. It registers every function of its :class:`FunctionRegistry`, then

* for each CALL from the host: rebuilds the arguments, builds the :class:`CallContext` and the
  session, and runs the function on a bounded worker pool (``async def`` functions run on the
  client's own event loop), each call in its own ``contextvars`` context; then it sends the
  result, the changed session and any capability updates back;
* for each outgoing call: serialises the arguments (a copy, always), sends them, waits for the
  response, rebuilds it and applies capability updates to the capabilities it passed in.

A call made while serving another call is *nested*: it carries that call's id, so the host
keeps it in the same session and stacks the frames.

Connection loss. Calls in flight when the connection drops fail at once with
``UplinkDisconnectedError``, and so do the answers of calls being served then (they are
dropped: the host has already failed them). While a reconnecting transport (the WebSocket
one) is down, new calls wait for the connection to come back, at most ``offline_wait``
seconds (:data:`OFFLINE_WAIT` by default), then fail with ``AppOfflineError`` naming the host.
A host that refused the key (:data:`~anvil_nb.core.transport.KEY_REFUSALS`) is not tried
again: every call fails at once with ``AppOfflineError("Anvil fatal error: <the host's text>")``.

Receipt. The client applies the host's rule to what it receives (DESIGN.md, "The host builds
every message it sends"): the ``objects`` entries of an incoming CALL must lie inside
``args``/``kwargs``/``vt_global`` (else the call fails, naming the path, and the function never
runs); those of a response inside ``response``/``vt_global`` (else the call raises
``SerializationError`` naming the path); those of a session blob inside ``session``.
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

from anvil_nb.client import capture
from anvil_nb.client.tasks import TaskRun, kill, run_task
from anvil_nb.core import protocol
from anvil_nb.core.capability import Capability, scope_key
from anvil_nb.core.context import CallContext
from anvil_nb.core.errors import (
    AnvilError,
    AppOfflineError,
    AuthenticationFailed,
    NoServerFunctionError,
    PermissionDenied,
    ProtocolError,
    SerializationError,
    UplinkDisconnectedError,
    error_from_wire,
    error_to_wire,
    trace_of,
)
from anvil_nb.core.events import (
    CallFinished,
    CallStarted,
    CapabilityUpdated,
    EventBus,
    RegistrySnapshot,
    SessionChanged,
    from_wire,
)
from anvil_nb.core.logs import RateLimiter, clip
from anvil_nb.core.serialise import deserialise, serialise
from anvil_nb.core.transport import KEY_REFUSALS, Transport

__all__ = [
    "OFFLINE_WAIT",
    "CallState",
    "Client",
    "FunctionRegistry",
    "Registered",
    "current_call",
    "reset_current_session",
]

log = logging.getLogger("anvil_nb.client.client")

_PRIV_TYPES = {"uplink": "uplink", "client": "client_uplink", "server_module": "server_module"}

#: Seconds a call waits for a lost connection to come back before it fails with
#: ``AppOfflineError`` (the default of ``Client(offline_wait=...)``, read when a client is made).
OFFLINE_WAIT = 10.0

_quiet = RateLimiter()


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


def check_user(client: Client, name: str, require_user: Any) -> None:
    """Refuse a call of *name* unless its session's user passes *require_user* (``True``: any
    logged-in user; a callable: a predicate on the user), as the real client does.

    Raises
    ------
    AuthenticationFailed
        No user is logged in.
    PermissionDenied
        The predicate refused the user.
    """
    user = client.call("anvil.private.users.get_current_user")
    if user is None:
        raise AuthenticationFailed(f"You must be logged in to call server function {name!r}")
    if require_user is not True and not require_user(user):
        raise PermissionDenied(f"You do not have permission to call server function {name!r}")


# ---------------------------------------------------------------------------------------------
# The current call


@dataclass(eq=False)
class CallState:
    """What the runtime knows about the call being served in this context."""

    client: Client
    request_id: str
    command: str
    context: CallContext
    session_id: str | None
    capabilities: list[Capability] = field(default_factory=list)
    #: What the call printed, when the client captures output (kernels do).
    output: io.StringIO | None = None
    #: The connection (its number) the call came on; once that connection is lost, the
    #: host has failed the call and its answer is dropped.
    generation: int = 0
    #: The session as it came (wire form): rebuilt only when the call uses ``session``, so a
    #: call that never touches it costs no session work and sends none back.
    session_blob: Any = None
    #: The HTTP request an endpoint call serves (``server.request``), set by its wrapper.
    request: Any = None
    #: The background task this call runs (``server.task_state``), or ``None``.
    task: TaskRun | None = None
    _session: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def session(self) -> dict[str, Any]:
        """The call's session (rebuilt from its wire form on first use)."""
        if self._session is None:
            self._session = self.client._load_session(self.session_blob)
        return self._session

    @property
    def session_used(self) -> bool:
        """Whether the call rebuilt its session (only then can it have changed it)."""
        return self._session is not None

    def replace_session(self, session: dict[str, Any] | None = None, blob: Any = None) -> None:
        """Take a new session: rebuilt (*session*) or still in wire form (*blob*)."""
        self._session, self.session_blob = session, blob

    def adopt_session(self, session: dict[str, Any] | None, blob: dict[str, Any]) -> None:
        """Take the session a nested call sent back: *session* rebuilt when this call already
        uses its session (the same dict is updated, so whoever holds it sees the change),
        else *blob*, rebuilt if the call uses it later.
        """
        if session is not None and self._session is not None:
            self._session.clear()
            self._session.update(session)
        else:
            self.replace_session(blob=blob)

    def session_on_wire(self) -> dict[str, Any]:
        """The session in wire form, to send along (unchanged if the call never used it)."""
        if self._session is None and isinstance(self.session_blob, dict):
            return self.session_blob
        return self.client._dump_session(self.session)


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
    offline_wait : float, optional
        Seconds a call waits for a lost connection to come back before it fails with
        ``AppOfflineError`` (default: :data:`OFFLINE_WAIT`, 10 s). Only transports that
        reconnect are waited for; with others a call fails at once.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        functions: FunctionRegistry = functions,
        workers: int = 32,
        offline_wait: float | None = None,
    ):
        self.transport = transport
        self.functions = functions
        self.events = EventBus()
        self.own_type = "uplink"
        self.app_info: dict[str, Any] = {}
        #: The host's fatal error when it refused the key; every call raises it from then on.
        self.fatal: str | None = None
        self.offline_wait = OFFLINE_WAIT if offline_wait is None else float(offline_wait)
        self._watching = False
        #: Capture what calls print (see :mod:`anvil_nb.client.capture`; kernels turn it on).
        self.capture_output = False
        self._pending: dict[str, _Pending] = {}
        #: The background tasks this process runs now, by the host's request id.
        self._tasks: dict[str, TaskRun] = {}
        self._handlers = self._message_handlers()
        self._id_prefix = secrets.token_hex(4) + "-"
        self._ids = itertools.count(1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="anvil_nb-call"
        )
        #: Set by the first ``auth`` (or a refusal): the handshake of :meth:`start` is over.
        self._authed = threading.Event()
        #: Guards the connection state below; waiters are woken on every change.
        self._state = threading.Condition()
        self._online = False
        self._closed = False
        #: Bumped by every ``auth``: which connection a served call came on.
        self._generation = 0
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._remove_listener: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Client:
        """Connect, register every function and wait until the host has them all.

        Raises
        ------
        AppOfflineError
            The host cannot be reached, did not answer the handshake, or refused the key.
        """
        try:
            self.transport.open(self._on_message, self._on_closed)
        except ConnectionError as exc:
            self._closed = True
            self._pool.shutdown(wait=False)
            raise AppOfflineError(str(exc)) from exc
        if not self._authed.wait(timeout):
            self.close()
            raise AppOfflineError(
                f"The host at {self.transport.name} did not answer the handshake within {timeout} s"
            )
        if self.fatal is not None:
            self.close()
            raise self._refused_error()
        self._remove_listener = self.functions.add_listener(self._on_registration)
        self._started = True
        for name in self.functions.names():
            self._send_quietly(protocol.register(name))
        self.sync()
        return self

    def sync(self) -> None:
        """Wait until the host has handled everything sent so far (one round trip)."""
        self.call("anvil.private.echo", "sync")

    @property
    def connected(self) -> bool:
        """Whether the connection is up (the host has accepted it and it has not dropped)."""
        return self._online

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the host refused the key)."""
        return self._closed

    def close(self) -> None:
        """Close the connection; calls in flight fail with ``UplinkDisconnectedError``."""
        with self._state:
            self._closed = True
            self._online = False
            self._state.notify_all()
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        self.transport.close()
        self._fail_pending("the client was closed")
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._loop_lock:
            loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)

    def _send_quietly(self, msg: dict[str, Any]) -> bool:
        """Send a message that a reconnection would send again anyway; False if it was not sent."""
        try:
            self.transport.send(msg)
        except ConnectionError:
            return False
        return True

    def _on_registration(self, name: str, added: bool) -> None:
        if not self._online:
            return  # the next connection registers every function anew
        if not self._send_quietly(protocol.register(name) if added else protocol.unregister(name)):
            return
        if current_call() is None:
            try:
                self.sync()  # in effect on the host as soon as the registration call returns
            except (UplinkDisconnectedError, AppOfflineError) as exc:
                log.info("registration of %r not confirmed: %s", name, exc)

    # -- connection state ----------------------------------------------------------------------
    def _refused_error(self) -> AppOfflineError:
        return AppOfflineError(f"Anvil fatal error: {self.fatal}")

    def _wait_online(self, command: str, deadline: float) -> None:
        """Return once the connection is up; raise if it will not be up by *deadline*."""
        with self._state:
            while True:
                if self.fatal is not None:
                    raise self._refused_error()
                if self._online:
                    return
                if self._closed or not self.transport.reconnects:
                    raise UplinkDisconnectedError(
                        f"Not connected to the host at {self.transport.name} (calling {command!r})"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AppOfflineError(
                        f"The host at {self.transport.name} is unreachable: no connection to it "
                        f"for the last {self.offline_wait:g} s (calling {command!r}); anvil_nb "
                        "keeps reconnecting"
                    )
                self._state.wait(left)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(UplinkDisconnectedError(f"Connection to the host lost: {reason}"))

    # -- incoming ------------------------------------------------------------------------------
    def _on_message(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        handler = self._handlers.get(protocol.kind_of(msg))
        if handler is None:
            _quiet.warning(log, "unrecognised", "unrecognised message from the host: %s", clip(msg))
        else:
            handler(msg, media)

    def _message_handlers(self) -> dict[str, Callable[[dict[str, Any], Mapping[str, bytes]], None]]:
        return {
            "response": self._on_response,
            "CALL": self._on_call,
            "LAUNCH_BACKGROUND": self._on_launch,
            "GET_TASK_STATE": lambda msg, _: self._answer_task_state(msg),
            "KILL_TASK": lambda msg, _: self._on_kill(msg),
            "auth": lambda msg, _: self._on_auth(msg),
            "fatal": lambda msg, _: self._on_fatal(msg),
            "output": lambda msg, _: log.info("Anvil server output: %s", clip(msg.get("output"))),
            # pushed by the host after anvil.private.watch_events
            "EVENT": lambda msg, _: self._on_events(msg.get("events")),
        }

    def _on_response(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        rid = msg["id"]
        pending = self._pending.pop(rid, None) if isinstance(rid, str) else None
        if pending is not None:
            pending.set_result((msg, media))
        else:
            log.debug("response for unknown call id %s dropped", clip(rid))

    def _on_call(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        try:
            self._pool.submit(contextvars.Context().run, self._serve, msg, media, self._generation)
        except RuntimeError:  # the pool is shut down: we are closing
            log.debug("call %s dropped: client closing", clip(msg.get("id")))

    def _on_launch(self, msg: dict[str, Any], media: Mapping[str, bytes]) -> None:
        """A background task: it runs on a thread of its own, never on a worker calls need."""
        threading.Thread(
            target=contextvars.Context().run,
            args=(self._serve, msg, media, self._generation),
            name=f"anvil_nb-task-{clip(msg.get('id'), 40)}",
            daemon=True,
        ).start()

    def _on_kill(self, msg: dict[str, Any]) -> None:
        run = self._tasks.get(str(msg.get("task")))
        if run is not None and kill(run):
            log.info("background task %s killed", clip(msg.get("task")))

    def _on_events(self, bodies: Any) -> None:
        """Put the host's events (of calls and sessions this client was no party to) on
        :attr:`events`; what is not an event is logged and skipped.
        """
        if type(bodies) is not list or not self.events.active:
            return
        for body in bodies:
            event = from_wire(body)
            if event is None:
                _quiet.warning(log, "bad-event", "not an event, from the host: %s", clip(body))
            else:
                self.events.emit(event)

    def _on_auth(self, msg: dict[str, Any]) -> None:
        self.own_type = _PRIV_TYPES.get(str(msg.get("priv")), "uplink")
        app_info = msg.get("app-info")
        self.app_info = app_info if isinstance(app_info, dict) else {}
        with self._state:
            self._generation += 1
        if self._started:  # a reconnection: register everything again, before any call goes out
            for name in self.functions.names():
                self._send_quietly(protocol.register(name))
            log.info("reconnected to %s", self.transport.name)
        with self._state:
            self._online = not self._closed
            self._state.notify_all()
        if self._started and self._watching:  # and watch again: the answer is the registry now
            try:
                pending = self.send_call("anvil.private.watch_events", [], {}, wait=False)
            except AnvilError as exc:
                log.info("could not watch the app's events again: %s", exc)
            else:
                pending.add_done_callback(self._on_rewatched)
        self._authed.set()

    def _on_rewatched(self, fut: concurrent.futures.Future[Any]) -> None:
        if fut.exception() is None:
            msg = fut.result()[0]
            if "error" not in msg:
                self._emit_snapshot(msg.get("response"))

    def _on_fatal(self, msg: dict[str, Any]) -> None:
        text = msg.get("error")
        if text in KEY_REFUSALS:
            with self._state:
                self.fatal = str(text)
                self._state.notify_all()
            log.error("Anvil fatal error: %s", clip(text))
            self._authed.set()
        else:  # this connection ends; the transport connects again
            _quiet.warning(
                log, "fatal", "the host at %s ended the connection: %s",
                self.transport.name, clip(text),
            )  # fmt: skip

    def _on_closed(self, reason: str) -> None:
        with self._state:
            self._online = False
            self._state.notify_all()
        self._fail_pending(reason)

    # -- serving -------------------------------------------------------------------------------
    def _serve(self, msg: dict[str, Any], media: Mapping[str, bytes], generation: int = 0) -> None:
        rid = str(msg.get("id"))
        command = str(msg.get("command"))
        started = time.perf_counter()
        context = CallContext.from_wire(self.own_type, msg.get("client"), msg.get("call-stack"))
        trusted = context.remote_caller.is_trusted if context.remote_caller else True
        state = CallState(
            self, rid, command, context, msg.get("session-id"), generation=generation,
            session_blob=msg.get("sessionData"),
        )  # fmt: skip
        if msg.get("type") == "LAUNCH_BACKGROUND":
            state.task = self._tasks[rid] = TaskRun(rid)
        _current.set(state)
        if self.capture_output:
            state.output = capture.start_capture()
        try:
            entry = self._prepare(state, msg, media, trusted)
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
            if state.task is not None:
                result, failed = run_task(state.task, entry.fn, args, kwargs)
                if failed is not None:
                    raise failed
            else:
                result = entry.fn(*args, **kwargs)
        except BaseException as exc:
            self._finish(state, trusted, started, error=exc)
            return
        self._finish(state, trusted, started, result=result)

    def _prepare(
        self, state: CallState, msg: dict[str, Any], media: Mapping[str, bytes], trusted: bool
    ) -> Registered:
        """Check a call that came in and rebuild its values; the function that serves it."""
        _check_received(msg.get("objects"), protocol.CALL_ROOTS, "The call was refused")
        _check_session(msg.get("sessionData"), "The call was refused")
        entry = self.functions.lookup(state.command)
        if entry is None:
            raise NoServerFunctionError(
                f'No server function matching "{state.command}" has been registered'
            )
        deserialise(
            msg,
            media=media,
            remote_is_trusted=trusted,
            capabilities=state.capabilities,
            fetch_media=self._fetch_media,
            live_call=self._live_call,
        )
        for cap in state.capabilities:
            cap._validity = self._capability_is_valid
        if entry.require_user:
            check_user(self, entry.name, entry.require_user)
        return entry

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
        msg: dict[str, Any] = {}
        media: dict[str, bytes] = {}
        if error is None:
            try:
                msg, media = self._answer(state, trusted, result)
            except Exception as exc:
                error = exc
        if error is not None:
            msg, media = protocol.error_message(state.request_id, error_to_wire(error)), {}
        if state.task is not None:
            self._tasks.pop(state.request_id, None)
            task_state = _plain_state(state.task)
            if task_state is not None:
                msg["taskState"] = task_state
        # Events first, so that whoever watches has the outcome before the caller has it.
        if self.events.active:
            self._emit_finished(state, started, result, error)
        if state.generation != self._generation or not self._online:
            # The connection the call came on is gone, and the host failed the call with it;
            # a new connection (a new host, perhaps) knows nothing of this id.
            log.info(
                "the answer to %s (%r) was dropped: the connection it came on was lost",
                clip(state.request_id), clip(state.command),
            )  # fmt: skip
            return
        self._send_answer(state, msg, media)

    def _answer(
        self, state: CallState, trusted: bool, result: Any
    ) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The response to a call that returned *result*: value, session and updates."""
        enc = serialise({"response": result}, remote_is_trusted=trusted)
        updates = {}
        for cap in state.capabilities:
            update = cap._take_update()
            if update is not None:
                updates[scope_key(cap.scope)] = update
                if self.events.active:
                    self.events.emit(CapabilityUpdated(
                        time.time(), state.request_id, scope_key(cap.scope), update, "sent"
                    ))  # fmt: skip
        if updates:  # updates are sent as they are: they must be plain JSON
            protocol.encode(updates)
        msg = protocol.response(
            state.request_id,
            enc.message["response"],
            enc.message.get("objects") or [],
            vt_global=enc.message.get("vt_global"),
            session_data=self._dump_session(state.session) if state.session_used else None,
            cap_updates=updates,
        )
        return msg, {mid: m.get_bytes() for mid, m in enc.media}

    def _emit_finished(
        self, state: CallState, started: float, result: Any, error: BaseException | None
    ) -> None:
        self.events.emit(CallFinished(
            time=time.time(), call_id=state.request_id, command=state.command,
            duration=time.perf_counter() - started, ok=error is None,
            error_type=None if error is None else type(error).__name__,
            error_message=None if error is None else str(error), result=result,
            output=state.output.getvalue() if state.output is not None else "",
            trace=() if error is None else tuple(trace_of(error.__traceback__)),
        ))  # fmt: skip
        if error is None and state.session_id and state.session_used:
            self.events.emit(
                SessionChanged(time.time(), state.session_id, "saved", dict(state.session))
            )

    def _send_answer(self, state: CallState, msg: dict[str, Any], media: dict[str, bytes]) -> None:
        try:
            try:
                self.transport.send(msg, media)
            except ProtocolError as exc:  # not JSON after all: the caller must still hear back
                error = SerializationError(f"The response could not be encoded: {exc}")
                self.transport.send(protocol.error_message(state.request_id, error_to_wire(error)))
        except ConnectionError as exc:
            log.info("the answer to %s was dropped: %s", clip(state.request_id), exc)
        except Exception:
            log.exception("could not send the response to %s", clip(state.request_id))

    def _answer_task_state(self, msg: dict[str, Any]) -> None:
        """``GET_TASK_STATE``: the state of a task this process runs (PROTOCOL.md §8)."""
        run = self._tasks.get(str(msg.get("task")))
        qid = msg.get("id")
        if run is None:
            error = {"type": "anvil.server.NotRunningTask", "message": "No such task running"}
            self._send_quietly({"id": qid, "error": error})
            return
        state = _plain_state(run)
        if state is None:
            error = {
                "type": "anvil.server.SerializationError",
                "message": "server.task_state holds a value that cannot be sent (plain JSON only, at most 1 MiB)",
            }
            self._send_quietly({"id": qid, "error": error})
            return
        self._send_quietly({"id": qid, "response": state, "objects": []})

    def _fetch_media(self, spec: dict[str, Any]) -> Any:
        """The bytes of a ``LazyMedia`` that came by this connection, from the host that sent it."""
        return self.call("anvil.private.fetch_lazy_media", spec)

    def _load_session(self, blob: Any, *, where: str = "The call was refused") -> dict[str, Any]:
        if not isinstance(blob, dict) or blob.get("session") is None:
            return {}
        _check_received(blob.get("objects"), protocol.SESSION_ROOTS, where, "sessionData")
        blob = {k: blob.get(k) for k in ("session", "objects", "vt_global")}
        deserialise(blob, remote_is_trusted=True, fetch_media=self._fetch_media)
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

    def watch_events(self) -> dict[str, Any]:
        """Have the host push the app's events onto :attr:`events` (again after a reconnection):
        those of calls and sessions this client is no party to, and registrations. Returns the
        app's state now (``registrations``, ``peers``, and ``you``: this connection's name).
        """
        state = self.call("anvil.private.watch_events")
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
        """Call a server function by name and return its result (a copy).

        Raises
        ------
        AppOfflineError
            The connection has been down for ``offline_wait`` seconds, or the host refused
            the key.
        UplinkDisconnectedError
            The connection dropped while the call was in flight (or the client was closed).
        """
        pending = self.send_call(command, args, kwargs)
        return self._result(pending, *pending.result())

    async def call_async(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Like :meth:`call`, awaitable from asyncio code (an outage is waited for off the loop)."""
        if not self._online:
            deadline = time.monotonic() + self.offline_wait
            await asyncio.get_running_loop().run_in_executor(
                None, self._wait_online, command, deadline
            )
        pending = self.send_call(command, args, kwargs, wait=False)
        msg, media = await asyncio.wrap_future(pending)
        return self._result(pending, msg, media)

    def _live_call(self, spec: dict[str, Any], method: str, *args: Any, **kwargs: Any) -> Any:
        """Call *method* of the live object *spec* (``task.get_state()``) on the host."""
        target = {k: spec.get(k) for k in ("backend", "id", "mac", "permissions")}
        pending = self.send_call(
            f"{spec.get('backend')}.{method}",
            args,
            kwargs,
            live_object={**target, "method": method},
        )
        return self._result(pending, *pending.result())

    def send_call(
        self,
        command: str,
        args: tuple[Any, ...] | list[Any],
        kwargs: dict[str, Any],
        *,
        wait: bool = True,
        live_object: dict[str, Any] | None = None,
    ) -> _Pending:
        """Send a CALL; the returned future resolves to the raw response and its media.

        With *wait*, a call made while the connection is down waits for it (at most
        ``offline_wait`` seconds); without, it fails at once. With *live_object*, the call is
        a method of that live object (``liveObjectCall``; *command* only names it in events).
        """
        if not isinstance(command, str):
            raise TypeError(f"The function name must be a str, not {type(command).__name__}")
        deadline = time.monotonic() + (self.offline_wait if wait else 0.0)
        self._wait_online(command, deadline)
        enc = serialise({"args": list(args), "kwargs": kwargs}, remote_is_trusted=True)
        state = _current.get()
        nested = state is not None and state.client is self
        if nested and state.generation != self._generation:  # type: ignore[union-attr]
            raise UplinkDisconnectedError(
                f"Cannot call {command!r}: the connection that brought the call being served "
                "was lost (the host has failed that call)"
            )
        call_id = f"{self._id_prefix}{next(self._ids)}"
        msg = protocol.call(
            call_id,
            command,
            enc.message["args"],
            enc.message["kwargs"],
            enc.message.get("objects") or [],
            call_stack_id=state.request_id if nested else None,  # type: ignore[union-attr]
            vt_global=enc.message.get("vt_global"),
            session_data=state.session_on_wire() if nested else None,  # type: ignore[union-attr]
        )
        if live_object is not None:
            del msg["command"]
            msg["liveObjectCall"] = live_object
        media = {mid: m.get_bytes() for mid, m in enc.media} if enc.media else None
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
        pending.state = state if nested else None
        pending.call_id, pending.command = call_id, command
        while True:
            self._pending[call_id] = pending
            try:
                self.transport.send(msg, media)
                return pending
            except ConnectionError as exc:  # dropped just now: nothing went out
                self._pending.pop(call_id, None)
                if nested:
                    raise UplinkDisconnectedError(
                        f"Could not send the call to {command!r}: {exc}"
                    ) from exc
                with self._state:  # the loss is being reported: let it land, then wait
                    if self._online and not self._closed:
                        self._state.wait(0.05)
                self._wait_online(command, deadline)  # raises once it is too late
            except Exception as exc:
                self._pending.pop(call_id, None)
                raise UplinkDisconnectedError(
                    f"Could not send the call to {command!r}: {exc}"
                ) from exc

    def _result(self, pending: _Pending, msg: dict[str, Any], media: Mapping[str, bytes]) -> Any:
        try:
            if "error" in msg:
                raise error_from_wire(msg["error"], where="the server function")
            where = f"The response of {pending.command!r} was refused"
            _check_received(msg.get("objects"), protocol.RESPONSE_ROOTS, where)
            session, blob = None, msg.get("sessionData")
            state = pending.state
            if state is not None and isinstance(blob, dict):
                _check_session(blob, where)
                if state.session_used:
                    session = self._load_session(blob, where=where)
            caps: list[Capability] = []
            deserialise(
                msg,
                media=media,
                remote_is_trusted=True,
                capabilities=caps,
                fetch_media=self._fetch_media,
                live_call=self._live_call,
            )
        except Exception as exc:
            self._emit_made(pending, error=exc)
            raise
        for cap in caps:  # is_valid asks the host about this connection's session
            cap._validity = self._capability_is_valid
        self._apply_updates(pending, msg.get("capUpdates"))
        self._emit_made(pending, result=msg.get("response"))
        if state is not None and isinstance(blob, dict):
            state.adopt_session(session, blob)
        return msg.get("response")

    def _apply_updates(self, pending: _Pending, updates: Any) -> None:
        """Apply the capability updates of a response to the capabilities the call passed."""
        if not updates or not isinstance(updates, dict):
            return
        for cap in pending.caps:
            key = scope_key(cap.scope)
            if key in updates:
                cap._apply_update(updates[key])
                if self.events.active:
                    self.events.emit(CapabilityUpdated(
                        time.time(), pending.call_id, key, updates[key], "received"
                    ))  # fmt: skip


#: The largest ``task_state`` sent to the host (encoded).
MAX_TASK_STATE_BYTES = 1024 * 1024


def _plain_state(run: TaskRun) -> dict[str, Any] | None:
    """A copy of a task's state that can go on the wire (plain JSON, bounded), or ``None``."""
    with run.lock:
        state = dict(run.state)
    try:
        size = len(protocol.encode(state))
    except ProtocolError:
        return None
    return state if size <= MAX_TASK_STATE_BYTES else None


def _check_session(blob: Any, where: str) -> None:
    """The receipt rule for a session blob (checked on arrival, even if it is never rebuilt)."""
    if isinstance(blob, dict) and blob.get("objects"):
        _check_received(blob["objects"], protocol.SESSION_ROOTS, where, "sessionData")


def _check_received(objects: Any, roots: frozenset[str], where: str, what: str = "msg") -> None:
    """The receipt rule: every ``objects`` entry must lie inside *roots*."""
    try:
        protocol.check_objects(objects, roots, what)
    except ProtocolError as exc:
        raise SerializationError(f"{where}: {exc}") from None


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
        if state.session_used:
            state.session.clear()
        else:
            state.replace_session({})
        state.session_id = new_id
        for cap in state.capabilities:
            cap._validity = client._capability_is_valid
    return new_id
