"""``anvil_nb.server``: the server-function API, mirroring ``anvil.server``.

Examples
--------
>>> from anvil_nb import server
>>> @server.callable
... def add(a, b):
...     return a + b
>>> server.call("add", 1, 2)
3

Functions registered with :func:`callable` are served by this process; :func:`call` routes a
call through the host (an embedded one is started when this process has none) with a full
serialise/deserialise copy both ways. Inside a server function, :data:`context` says who
called, :data:`session` holds the caller's session, and capabilities passed in are checked with
:func:`unwrap_capability`.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar, overload

from anvil_nb import runtime
from anvil_nb.client import capture
from anvil_nb.client.client import Client, current_call, functions, reset_current_session
from anvil_nb.client.endpoints import HttpRequest, HttpResponse, make_endpoint, request
from anvil_nb.core.capability import Capability, unwrap_capability
from anvil_nb.core.context import CallContext, ClientInfo, Location, StackFrame
from anvil_nb.core.errors import (
    AnvilError,
    AnvilWrappedError,
    AppOfflineError,
    BackgroundTaskError,
    BackgroundTaskKilled,
    BackgroundTaskNotFound,
    ExecutionTerminatedError,
    InternalError,
    InvalidResponseError,
    NoServerFunctionError,
    PermissionDenied,
    QuotaExceededError,
    RuntimeUnavailableError,
    SerializationError,
    ServiceNotAdded,
    SessionExpiredError,
    TimeoutError,
    UplinkDisconnectedError,
)
from anvil_nb.core.portable import SerializationInfo, portable_class

__all__ = [
    "AnvilError",
    "AnvilWrappedError",
    "AppOfflineError",
    "BackgroundTaskError",
    "BackgroundTaskKilled",
    "BackgroundTaskNotFound",
    "CallContext",
    "Capability",
    "ClientInfo",
    "ExecutionTerminatedError",
    "FormResponse",
    "HttpRequest",
    "HttpResponse",
    "InternalError",
    "InvalidResponseError",
    "Location",
    "NoServerFunctionError",
    "PermissionDenied",
    "QuotaExceededError",
    "RuntimeUnavailableError",
    "SerializationError",
    "SerializationInfo",
    "ServiceNotAdded",
    "SessionExpiredError",
    "StackFrame",
    "TimeoutError",
    "UplinkDisconnectedError",
    "background_task",
    "call",
    "call_async",
    "callable",
    "connect",
    "context",
    "disconnect",
    "get_api_origin",
    "get_app_origin",
    "get_background_task",
    "get_session_id",
    "http_endpoint",
    "is_app_online",
    "launch_background_task",
    "list_background_tasks",
    "no_loading_indicator",
    "portable_class",
    "request",
    "reset_session",
    "route",
    "session",
    "task_killed",
    "task_state",
    "unwrap_capability",
    "wait_forever",
]

F = TypeVar("F", bound=Callable[..., Any])


# ---------------------------------------------------------------------------------------------
# Registering and calling


@overload
def callable(fn: F, /) -> F: ...
@overload
def callable(name: str | None = None, /, *, require_user: Any = None) -> Callable[[F], F]: ...


def callable(fn_or_name: Any = None, /, *, require_user: Any = None) -> Any:
    """Make a function callable by name from anywhere connected to the host.

    Use it as ``@callable``, ``@callable("name")`` or ``@callable(require_user=True)``. The
    name defaults to the function's ``__name__`` and may be a regular expression (it must then
    match the whole called name). Registering a new function under a taken name replaces it.

    Parameters
    ----------
    fn_or_name : callable or str, optional
        The function, or the name to register it under.
    require_user : bool or callable, optional
        Refuse calls (``PermissionDenied``) unless a user is logged in.

    Returns
    -------
    callable
        The function itself, unchanged.
    """
    if builtins.callable(fn_or_name) and not isinstance(fn_or_name, str):
        _register(fn_or_name.__name__, fn_or_name, require_user)
        return fn_or_name
    name = fn_or_name

    def decorate(fn: F) -> F:
        _register(name or fn.__name__, fn, require_user)
        return fn

    return decorate


def _client() -> Client:
    """The connection to use: the one serving the current call, else this process's."""
    state = current_call()
    if state is not None:
        return state.client
    client = runtime.current_client()
    assert client is not None
    return client


def _register(name: str, fn: Callable[..., Any], require_user: Any) -> None:
    functions.register(name, fn, require_user)
    _mark(fn, name)


def call(fn_name: str, *args: Any, **kwargs: Any) -> Any:
    """Call the server function registered as *fn_name* and return its result.

    Arguments and result are copied (serialised and rebuilt) on the way, also when the
    function runs in this process. Errors raised by the function are raised here, as the same
    class when it is known on this side.

    Raises
    ------
    NoServerFunctionError
        Nothing is registered under that name.
    """
    return _client().call(fn_name, *args, **kwargs)


async def call_async(fn_name: str, *args: Any, **kwargs: Any) -> Any:
    """Like :func:`call`, but awaitable from asyncio code."""
    return await _client().call_async(fn_name, *args, **kwargs)


def connect(
    key: str,
    url: str = "wss://anvil.works/uplink",
    quiet: bool = False,
    init_session: Callable[[], Any] | None = None,
    extra_headers: dict[str, str] | None = None,
) -> None:
    """Join a host over the network as an uplink (the signature of ``anvil.server.connect``).

    With the host's server key this process is a trusted uplink and serves its
    ``@server.callable`` functions; with the client key it is an untrusted caller. The
    connection is re-established (and every function registered again) whenever it drops,
    after 1 s and then backing off up to 10 s, unless the host refused the key.

    From then on this process stays with that host and never starts an embedded one. Calls
    in flight when the connection drops fail with ``UplinkDisconnectedError``; calls made
    while it is down wait for it to come back, at most ``anvil_nb.client.client.OFFLINE_WAIT``
    seconds (10 by default; set it before connecting), then fail with ``AppOfflineError``
    naming the host. After a refused key every call fails at once with
    ``AppOfflineError("Anvil fatal error: Incorrect uplink key")``.

    Parameters
    ----------
    key : str
        The host's server key or client key.
    url : str
        The host's uplink URL, e.g. ``"ws://127.0.0.1:3030/_/uplink"``.
    quiet : bool
        Do not print the line that says the connection is up.
    init_session : callable, optional
        Called once the connection is up, before this function returns.
    extra_headers : dict, optional
        Headers added to the WebSocket upgrade request.

    Raises
    ------
    AppOfflineError
        The host cannot be reached, or refused the key. A process that had no connection
        yet is then left without one (its calls raise this error too; it does not fall back
        to an embedded host); one that had a connection keeps it.
    """
    from anvil_nb.client.websocket import WebSocketTransport  # noqa: PLC0415 - loads tornado

    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    label = script if script and script not in ("-c", "-m") else "python"
    client = Client(WebSocketTransport(url, key, extra_headers=extra_headers, label=label))
    try:
        client.start()
    except AppOfflineError:
        if runtime.current_client(start=False) is None:
            runtime.set_client(client if client.fatal is not None else None, remote=url)
        raise
    runtime.set_client(client, remote=url)
    if not quiet:
        role = "SERVER" if client.own_type == "uplink" else "CLIENT"
        print(f"Connected to {url} as {role}", flush=True)
    if init_session is not None:
        init_session()


def disconnect() -> None:
    """Close this process's connection to its host (and stop an embedded host).

    Everything ends: calls in flight fail, and the process is as if it had never connected
    (a later ``server.call`` starts an embedded host, a later ``connect`` joins a host).
    """
    runtime.disconnect()
    capture.uninstall()  # a kernel's output capture (``%load_ext``) ends with its connection


def wait_forever() -> None:
    """Block the calling thread while this process's connection to its host lasts.

    The last line of an uplink script that serves functions, as in ``anvil-uplink``::

        server.connect(SERVER_KEY, url="ws://127.0.0.1:3030/_/uplink")

        @server.callable
        def greet(name): ...

        server.wait_forever()

    The connection keeps serving calls (and reconnecting after a drop) meanwhile. It returns
    once the connection is closed for good: ``server.disconnect()`` from another thread (or
    from a server function). Ctrl-C raises ``KeyboardInterrupt`` out of it, as in
    ``anvil-uplink``; the connection ends with the process. It waits on the connection's state,
    without polling.

    Raises
    ------
    RuntimeError
        This process has no connection (call :func:`connect` first).
    AppOfflineError
        Joining the host failed, or the host refused the key (also while waiting).
    """
    client = runtime.current_client(start=False)
    if client is None:
        if runtime.joined_url() is not None:
            runtime.current_client()  # raises the AppOfflineError that says joining failed
        raise RuntimeError(
            "server.wait_forever() needs a connection: call server.connect(key, url=...) first"
        )
    while True:
        if client.fatal is not None:
            raise AppOfflineError(f"Anvil fatal error: {client.fatal}")
        if client.closed:
            current = runtime.current_client(start=False)
            if current is None or current is client:
                return  # server.disconnect(): the process has no connection any more
            client = current  # server.connect(...) replaced it: wait on the new one
            continue
        # The client notifies this condition on every change of its connection state (close
        # included); the timeout only keeps Ctrl-C prompt where lock waits are not interruptible.
        with client._state:
            if not client.closed and client.fatal is None:
                client._state.wait(1.0)


# ---------------------------------------------------------------------------------------------
# The current call: context, session, request


def _default_context() -> CallContext:
    client = runtime.current_client(start=False)
    return CallContext(type=client.own_type if client is not None else "server_module")


class _CallDict(MutableMapping[str, Any]):
    """A dict of the call being served (its session, its task's state), reached by *get*:
    ``None`` outside such a call, where using it raises ``RuntimeError`` saying *where*.
    """

    def __init__(self, name: str, get: Callable[[], dict[str, Any] | None], where: str):
        self._name, self._get, self._where = name, get, where

    def _data(self) -> dict[str, Any]:
        data = self._get()
        if data is None:
            raise RuntimeError(f"server.{self._name} is only available {self._where}")
        return data

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(dict(self._data()))

    def __len__(self) -> int:
        return len(self._data())

    def __repr__(self) -> str:
        data = self._get()
        shown = (
            repr(data) if data is not None else f"(outside {self._where.removeprefix('inside ')})"
        )
        return f"<server.{self._name} {shown}>"


def _session_of_call() -> dict[str, Any] | None:
    state = current_call()
    return state.session if state is not None else None


def _state_of_task() -> dict[str, Any] | None:
    run = getattr(current_call(), "task", None)
    return run.state if run is not None else None


#: The session of the current call: a dict-like object that travels with the call. It is copied
#: into each call and the changed copy is kept by the host when the call returns; values must be
#: serialisable, and a call that stores something that is not fails.
session: MutableMapping[str, Any] = _CallDict(
    "session", _session_of_call, "inside a server function call"
)


def __getattr__(name: str) -> Any:
    # ``server.context`` depends on the call being served.
    if name == "context":
        state = current_call()
        return state.context if state is not None else _default_context()
    raise AttributeError(f"module 'anvil_nb.server' has no attribute {name!r}")


def get_session_id() -> str | None:
    """The id of the current session (of the call being served, or of this connection)."""
    state = current_call()
    if state is not None and state.session_id:
        return state.session_id
    return call("anvil.private.get_session_id")


def reset_session() -> None:
    """Replace the current session with a new, empty one (capabilities of the old one stop working)."""
    reset_current_session(_client())


def is_app_online() -> bool:
    """Whether this process is connected to its host now (False while it reconnects)."""
    client = runtime.current_client(start=False)
    return client is not None and client.connected


def get_app_origin() -> str | None:
    """The origin URL of the app (``None`` for a host that listens on no HTTP port)."""
    return call("anvil.private.get_app_origin")


def get_api_origin() -> str | None:
    """The origin of the app's HTTP endpoints (the app origin + ``/_/api``)."""
    return call("anvil.private.get_api_origin")


class _NoLoadingIndicator(contextlib.AbstractContextManager):  # type: ignore[type-arg]
    """Hide the browser's loading indicator during the calls inside ``with``; no-op here."""

    def __exit__(self, *exc: object) -> None:
        return None

    def __repr__(self) -> str:
        return "<server.no_loading_indicator>"


#: A context manager that hides the browser's loading indicator; server-side it does nothing.
no_loading_indicator = _NoLoadingIndicator()


# ---------------------------------------------------------------------------------------------
# HTTP


@portable_class("anvil.server._LoadAppResponse")  # never change: the Anvil client knows this name
class FormResponse:
    """Open a form as a new page, from a ``route``: ``FormResponse("Form1", *args, **kwargs)``."""

    def __init__(self, form: str, *args: Any, **kwargs: Any):
        self.form = form
        self.args = list(args)
        self.kwargs = kwargs


def http_endpoint(
    path: str,
    methods: list[str] | None = None,
    authenticate_users: bool = False,
    require_credentials: bool = False,
    cross_site_session: bool = False,
    enable_cors: bool | str = False,
    *,
    require_user: Any = None,
) -> Callable[[F], F]:
    """Serve a function as an HTTP endpoint at ``{app origin}/_/api{path}``.

    ``:name`` segments of *path* (``"/books/:id"``) are passed as keyword arguments, as are the
    query-string and form parameters (all strings); :data:`request` is the request. The return
    value is the response: a string (``text/plain``), a Media (its own type), an
    :class:`HttpResponse` (status and headers of your choosing) or anything JSON can hold.

    Parameters
    ----------
    methods : list of str, optional
        The methods served (default GET and POST); others get 405.
    authenticate_users : bool
        Log the request in with its HTTP Basic credentials (the app's users, unless its session
        is logged in already): ``request.user``; wrong or missing credentials get 401.
    require_credentials : bool
        Refuse (401) a request without HTTP Basic credentials; they are in
        ``request.username`` and ``request.password`` for the function to check.
    cross_site_session : bool
        Run a request from another site in the browser's cookie session (by default such a
        request gets a fresh session).
    enable_cors : bool or str
        Answer CORS preflights and allow other origins (``True``: any; a string: that origin).
    require_user : bool or callable
        Refuse (401) a request with no logged-in user, or (403) one the predicate refuses.
    """

    def decorate(fn: F) -> F:
        name, wrapper = make_endpoint(
            fn, path, methods=methods, authenticate_users=authenticate_users,
            require_credentials=require_credentials, cross_site_session=cross_site_session,
            enable_cors=enable_cors, require_user=require_user,
        )  # fmt: skip
        functions.register(name, wrapper)
        _mark(fn, name)
        return fn

    return decorate


def _mark(fn: Any, name: str) -> None:
    """Note on *fn* the name a decorator registered it under (``%%callable`` then registers
    nothing more for it, and withdraws the name when the cell no longer defines it).
    """
    with contextlib.suppress(AttributeError, TypeError):
        fn._anvil_nb_names = (*getattr(fn, "_anvil_nb_names", ()), name)


#: The newer name of :func:`http_endpoint` (Anvil's ``@anvil.server.route``), served at the same
#: ``_/api`` paths.
route = http_endpoint


def background_task(fn_or_name: Any = None, /) -> Any:
    """Register a function that can run as a background task (``task:NAME`` on the wire).

    Use it as ``@background_task`` or ``@background_task("name")``; launch it with
    :func:`launch_background_task`. While it runs, :data:`task_state` is a dict it assigns
    into (readable live by whoever holds the task), and ``server.context.background_task_id``
    is its id.
    """

    def decorate(fn: F, name: str | None = None) -> F:
        registered = "task:" + (name or fn.__name__)
        functions.register(registered, fn)
        _mark(fn, registered)
        return fn

    if isinstance(fn_or_name, str) or fn_or_name is None:
        return lambda fn: decorate(fn, fn_or_name)
    return decorate(fn_or_name)


def launch_background_task(fn_name: str, *args: Any, **kwargs: Any) -> Any:
    """Start the background task *fn_name* in a new session and return its task object at once.

    The task object has the methods of Anvil's ``BackgroundTask``: ``get_id``, ``get_state``,
    ``get_return_value``, ``get_error``, ``get_termination_status`` (``None``, ``"completed"``,
    ``"failed"``, ``"killed"`` or ``"missing"``), ``is_running``, ``is_completed``,
    ``get_task_name``, ``get_start_time`` and ``kill``. Server code only (others get
    ``BackgroundTaskError``).
    """
    return call("anvil.private.background_tasks.launch", fn_name, *args, **kwargs)


def list_background_tasks(all_environments: bool = False) -> list[Any]:
    """Every background task of this app the host keeps a record of (newest first)."""
    return call("anvil.private.background_tasks.list", all_environments=all_environments)


def get_background_task(task_id: str) -> Any:
    """The task object of the background task *task_id* (``BackgroundTaskNotFound`` if none)."""
    return call("anvil.private.background_tasks.get_by_id", task_id)


def task_killed() -> bool:
    """Whether the background task this code runs in has been killed.

    A kill stops a task at its next Python bytecode; a task that waits in C code (a long
    ``time.sleep``, a blocking read) can check this between shorter waits. False outside a task.
    """
    run = getattr(current_call(), "task", None)
    return bool(run is not None and run.killed)


#: The state of the background task this code runs in: a dict it assigns into
#: (``server.task_state["progress"] = 0.5``), plain JSON values only.
task_state: MutableMapping[str, Any] = _CallDict(
    "task_state", _state_of_task, "inside a background task"
)
