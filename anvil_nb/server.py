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
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar, overload

from anvil_nb import runtime
from anvil_nb.client import capture
from anvil_nb.client.client import Client, current_call, functions, reset_current_session
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
    "get_session_id",
    "http_endpoint",
    "is_app_online",
    "launch_background_task",
    "no_loading_indicator",
    "portable_class",
    "request",
    "reset_session",
    "session",
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

    client = Client(WebSocketTransport(url, key, extra_headers=extra_headers))
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


class _SessionProxy(MutableMapping[str, Any]):
    """``server.session``: the session of the call being served, as a dict.

    It is copied into each call and the changed copy is kept by the host when the call returns;
    values must be serialisable, and a call that stores something that is not fails.
    """

    def _data(self) -> dict[str, Any]:
        state = current_call()
        if state is None:
            raise RuntimeError("server.session is only available inside a server function call")
        return state.session

    def __getitem__(self, key: str) -> Any:
        return self._data()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._data()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __repr__(self) -> str:
        state = current_call()
        return (
            f"<server.session {state.session!r}>" if state else "<server.session (outside a call)>"
        )


#: The session of the current call: a dict-like object that travels with the call.
session: MutableMapping[str, Any] = _SessionProxy()


def __getattr__(name: str) -> Any:
    # ``server.context`` and ``server.request`` depend on the call being served.
    if name == "context":
        state = current_call()
        return state.context if state is not None else _default_context()
    if name == "request":
        raise NotImplementedError(
            "server.request is only available in HTTP endpoint calls, which "
            "this version of anvil_nb does not serve yet"
        )
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


class HttpRequest:
    """The HTTP request an endpoint is serving (``server.request``)."""

    def __init__(self, **fields: Any):
        self.path: str = fields.get("path", "")
        self.method: str = fields.get("method", "GET")
        self.query_params: dict[str, Any] = fields.get("query_params", {})
        self.form_params: dict[str, Any] = fields.get("form_params", {})
        self.origin: str | None = fields.get("origin")
        self.headers: dict[str, str] = fields.get("headers", {})
        self.remote_address: str | None = fields.get("remote_address")
        self.body: Any = fields.get("body")
        self.username: str | None = fields.get("username")
        self.password: str | None = fields.get("password")

    @property
    def body_json(self) -> Any:
        """The body parsed as JSON, or ``None``."""
        import json  # noqa: PLC0415

        if self.body is None:
            return None
        return json.loads(self.body.get_bytes())


class HttpResponse:
    """A response an HTTP endpoint returns: status, body and headers."""

    def __init__(self, status: int = 200, body: Any = "", headers: dict[str, str] | None = None):
        self.status = status
        self.body = body
        self.headers: dict[str, str] = dict(headers or {})


@portable_class("anvil.server._LoadAppResponse")  # never change: the Anvil client knows this name
class FormResponse:
    """Open a form as a new page, from a ``route``: ``FormResponse("Form1", *args, **kwargs)``."""

    def __init__(self, form: str, *args: Any, **kwargs: Any):
        self.form = form
        self.args = list(args)
        self.kwargs = kwargs


def _later(feature: str) -> NotImplementedError:
    return NotImplementedError(f"{feature} is not available yet in this version of anvil_nb")


def http_endpoint(path: str, **options: Any) -> Callable[[F], F]:
    """Serve a function as an HTTP endpoint under ``/_/api/<path>``."""
    raise _later("@server.http_endpoint (HTTP endpoints)")


def background_task(fn: Any = None, /, **options: Any) -> Any:
    """Register a function that can run as a background task."""
    raise _later("@server.background_task (background tasks)")


def launch_background_task(fn_name: str, *args: Any, **kwargs: Any) -> Any:
    """Launch a background task and return its task object at once."""
    raise _later("server.launch_background_task (background tasks)")


def task_state() -> Any:
    """The state of the background task this code runs in."""
    raise _later("server.task_state (background tasks)")
