"""Exceptions of anvil_nb, and how errors cross the wire.

Every exception anvil_nb raises on its own account derives from one root, so a user can catch
:class:`AnvilError` or something narrower::

    AnvilError
    ├── AnvilWrappedError          a remote error whose type has no class of its own here
    │   ├── NoServerFunctionError
    │   ├── CookieError
    │   ├── UserExists                 the anvil.users classes (see below)
    │   ├── PasswordNotAcceptable
    │   ├── AuthenticationFailed
    │   │   └── EmailNotConfirmed, AccountIsNotEnabled, TooManyPasswordFailures
    │   └── ValueError, OSError, ... a remote built-in error (also that built-in type)
    ├── AppOfflineError
    ├── BackgroundTaskError, BackgroundTaskKilled, BackgroundTaskNotFound, NotRunningTask
    ├── ExecutionTerminatedError, InternalError, InvalidResponseError, InvalidObjectError
    ├── PermissionDenied, QuotaExceededError, RuntimeUnavailableError, ServiceNotAdded
    ├── SerializationError, SessionExpiredError, StackOverflow
    ├── TimeoutError               (also a subclass of the built-in ``TimeoutError``)
    ├── UplinkDisconnectedError
    └── ProtocolError              a malformed frame; never sent to a peer as a type

On the wire an error is ``{"type", "message", "trace"}`` (PROTOCOL.md §3). anvil_nb's own
classes travel as ``anvil.server.<Name>`` so the real ``anvil-uplink`` client raises its own
class of that name; the users classes, which mirror the real client's ``anvil.users``
exceptions (hierarchy included: all are wrapped errors there), travel as
``anvil.users.<Name>``; other exceptions travel under their bare class name, as the real client
sends them. On receipt, :func:`error_from_wire` rebuilds

* anvil_nb's own classes and types registered with :func:`register_exception_type` as
  themselves;
* a built-in exception type (``ValueError``, ``OSError``, ...) as a class that is both that
  built-in type and :class:`AnvilWrappedError` (named like the built-in, e.g. ``ValueError``,
  one class per built-in type), so ``except ValueError`` and ``except AnvilWrappedError`` both
  catch it, as ``except AnvilWrappedError`` does with the real ``anvil-uplink`` client. The one
  exception is ``KeyError``, which arrives as a plain ``KeyError`` as in the real client;
* anything else as an :class:`AnvilWrappedError` that keeps the remote type name.

The remote trace is kept on ``.remote_trace`` and shown as a note, labelled as remote.
"""

from __future__ import annotations

import builtins
import os
import threading
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypedDict

__all__ = [
    "AccountIsNotEnabled",
    "AnvilError",
    "AnvilWrappedError",
    "AppOfflineError",
    "AuthenticationFailed",
    "BackgroundTaskError",
    "BackgroundTaskKilled",
    "BackgroundTaskNotFound",
    "CookieError",
    "EmailNotConfirmed",
    "ExecutionTerminatedError",
    "InternalError",
    "InvalidObjectError",
    "InvalidResponseError",
    "NoServerFunctionError",
    "NotRunningTask",
    "PasswordNotAcceptable",
    "PermissionDenied",
    "ProtocolError",
    "QuotaExceededError",
    "RuntimeUnavailableError",
    "SerializationError",
    "ServiceNotAdded",
    "SessionExpiredError",
    "StackOverflow",
    "TimeoutError",
    "TooManyPasswordFailures",
    "UplinkDisconnectedError",
    "UserExists",
    "error_from_wire",
    "error_to_wire",
    "register_exception_type",
    "wrapped_builtin_class",
]


class WireError(TypedDict, total=False):
    """An error as it crosses the wire (PROTOCOL.md §3)."""

    type: str
    message: str
    trace: list[list[Any]]


class AnvilError(Exception):
    """Root of every exception anvil_nb raises on its own account."""

    #: The name this class travels under on the wire; ``None`` means the bare class name.
    wire_type: str | None = None

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = str(message)
        #: ``[[filename, line], ...]`` innermost first, when the error came from a remote peer.
        self.remote_trace: list[list[Any]] = []


class AnvilWrappedError(AnvilError):
    """A remote error whose type has no class of its own on this side.

    A remote error of a built-in type arrives as a subclass of this class that is also that
    built-in type (``except ValueError`` and ``except AnvilWrappedError`` both catch a remote
    ``ValueError``); a remote error of any other unknown type arrives as this class itself.

    Attributes
    ----------
    remote_type : str or None
        The type name the remote side reported, e.g. ``"MyError"``.
    error_obj : dict
        The error exactly as it arrived.
    """

    def __init__(self, message: str = "", remote_type: str | None = None) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.error_obj: dict[str, Any] = {"message": self.message, "trace": []}
        if remote_type is not None:
            self.error_obj["type"] = remote_type

    def __repr__(self) -> str:
        if type(self) is AnvilWrappedError and self.remote_type:
            return f"AnvilWrappedError({self.remote_type}: {self.message!r})"
        return super().__repr__()


class ProtocolError(AnvilError):
    """A frame or message that does not follow the uplink protocol."""


# The classes of the "anvil.server" reference page, and the few the protocol adds. Their wire
# names are "anvil.server.<Name>" -- never change them: the real client maps them to its classes.
class AppOfflineError(AnvilError):
    """The app (the host) cannot be reached."""

    wire_type = "anvil.server.AppOfflineError"


class BackgroundTaskError(AnvilError):
    """A background task failed, or cannot be launched or queried by this caller."""

    wire_type = "anvil.server.BackgroundTaskError"


class BackgroundTaskKilled(AnvilError):
    """The background task was killed."""

    wire_type = "anvil.server.BackgroundTaskKilled"


class BackgroundTaskNotFound(AnvilError):
    """No background task has that id."""

    wire_type = "anvil.server.BackgroundTaskNotFound"


class NotRunningTask(AnvilError):
    """The task asked about is not running on this connection."""

    wire_type = "anvil.server.NotRunningTask"


class ExecutionTerminatedError(AnvilError):
    """The server code running the call was terminated."""

    wire_type = "anvil.server.ExecutionTerminatedError"


class InternalError(AnvilError):
    """Something went wrong inside anvil_nb itself."""

    wire_type = "anvil.server.InternalError"


class InvalidResponseError(AnvilError):
    """A response could not be understood."""

    wire_type = "anvil.server.InvalidResponseError"


class InvalidObjectError(AnvilError):
    """An object (a Capability, a live object) is no longer valid, e.g. its session expired."""

    wire_type = "anvil.server.InvalidObjectError"


class NoServerFunctionError(AnvilWrappedError):
    """No server function matching the name has been registered."""

    wire_type = "anvil.server.NoServerFunctionError"


class CookieError(AnvilWrappedError):
    """A cookie could not be read or written."""

    wire_type = "anvil.server.CookieError"


class PermissionDenied(AnvilError):
    """The caller is not allowed to do this (untrusted caller, bad capability, no user)."""

    wire_type = "anvil.server.PermissionDenied"


class QuotaExceededError(AnvilError):
    """A resource limit was exceeded."""

    wire_type = "anvil.server.QuotaExceededError"


class RuntimeUnavailableError(AnvilError):
    """The runtime that should run the call is not available."""

    wire_type = "anvil.server.RuntimeUnavailableError"


class SerializationError(AnvilError):
    """A value cannot be sent over the wire, or a received value cannot be rebuilt."""

    wire_type = "anvil.server.SerializationError"


class ServiceNotAdded(AnvilError):
    """The app uses a service that this host does not provide."""

    wire_type = "anvil.server.ServiceNotAdded"


class SessionExpiredError(AnvilError):
    """The session was idle for too long and has expired; a new one has been started."""

    wire_type = "anvil.server.SessionExpiredError"


class StackOverflow(AnvilError):
    """Server calls were nested too deeply."""

    wire_type = "anvil.server.StackOverflow"


class TimeoutError(AnvilError, builtins.TimeoutError):
    """The call did not complete within its time limit."""

    wire_type = "anvil.server.TimeoutError"


class UplinkDisconnectedError(AnvilError):
    """The connection that was serving the call went away."""

    wire_type = "anvil.server.UplinkDisconnectedError"


# The exceptions of anvil.users, as the real client defines them (every one a wrapped error
# there, the login failures under AuthenticationFailed). Their wire names are
# "anvil.users.<Name>": the real client maps those to its classes.
class UserExists(AnvilWrappedError):
    """A user with that email address already exists."""

    wire_type = "anvil.users.UserExists"


class AuthenticationFailed(AnvilWrappedError):
    """A login failed: the email address or the password is wrong (or see the subclasses)."""

    wire_type = "anvil.users.AuthenticationFailed"


class EmailNotConfirmed(AuthenticationFailed):
    """The account's email address has not been confirmed yet."""

    wire_type = "anvil.users.EmailNotConfirmed"


class AccountIsNotEnabled(AuthenticationFailed):
    """The account exists but has been disabled."""

    wire_type = "anvil.users.AccountIsNotEnabled"


class TooManyPasswordFailures(AuthenticationFailed):
    """Too many wrong passwords in a row: the account refuses logins for a while."""

    wire_type = "anvil.users.TooManyPasswordFailures"


class PasswordNotAcceptable(AnvilWrappedError):
    """A sign-up or a new password was refused (too short, or an invalid email address)."""

    wire_type = "anvil.users.PasswordNotAcceptable"


# ---------------------------------------------------------------------------------------------
# Wire form

_BY_WIRE_NAME: dict[str, type[BaseException]] = {}


def register_exception_type(name: str, cls: type[BaseException]) -> None:
    """Rebuild remote errors whose wire type is *name* as *cls* on this side.

    Parameters
    ----------
    name : str
        The type name as it travels on the wire (for your own classes: the bare class name,
        which is what the remote side sends for them).
    cls : type
        An exception class whose constructor takes the message as its only argument.

    Registering a built-in name overrides the default for it: after
    ``register_exception_type("ValueError", ValueError)`` a remote ``ValueError`` arrives as a
    plain ``ValueError`` rather than one that is also an :class:`AnvilWrappedError`.
    """
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise TypeError(f"register_exception_type needs an exception class, not {cls!r}")
    _BY_WIRE_NAME[name] = cls


for _cls in list(globals().values()):
    if isinstance(_cls, type) and issubclass(_cls, AnvilError) and _cls.wire_type:
        _BY_WIRE_NAME[_cls.wire_type] = _cls
# The App Server's name for a write to a closed uplink socket (PROTOCOL.md §3).
_BY_WIRE_NAME["anvil.server.UplinkDisconnected"] = UplinkDisconnectedError
# The one built-in the real anvil-uplink client rebuilds as itself (a plain KeyError, not an
# AnvilWrappedError): so does anvil_nb, so that ``except AnvilWrappedError`` means the same.
_BY_WIRE_NAME["KeyError"] = KeyError


def wire_type_of(exc: BaseException) -> str:
    """The type name *exc* travels under."""
    if isinstance(exc, AnvilWrappedError) and type(exc) is AnvilWrappedError:
        return exc.remote_type or "AnvilWrappedError"
    wire = getattr(type(exc), "wire_type", None)
    return wire if isinstance(wire, str) else type(exc).__name__


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def trace_of(tb: TracebackType | None) -> list[list[Any]]:
    """``[[filename, line], ...]`` for a traceback, innermost frame first.

    Frames of anvil_nb itself are left out: the caller wants to see the user's code.
    """
    return [
        [fs.filename.replace("\\", "/"), fs.lineno]
        for fs in reversed(traceback.extract_tb(tb))
        if not fs.filename.startswith(_PACKAGE_DIR)
    ]


def error_to_wire(exc: BaseException) -> WireError:
    """The wire form of *exc*: type, message and trace (innermost first)."""
    # str(KeyError('k')) is "'k'"; send the key itself, and the remote KeyError re-quotes it.
    keyerror = isinstance(exc, KeyError) and len(exc.args) == 1
    message = str(exc.args[0]) if keyerror else str(exc)
    remote = getattr(exc, "remote_trace", None) or []
    return {
        "type": wire_type_of(exc),
        "message": message,
        "trace": trace_of(exc.__traceback__) + remote,
    }


def _builtin_exception(name: str) -> type[BaseException] | None:
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, Warning):
        return cls
    return None


# Remote errors of built-in types: one class per built-in type, both AnvilWrappedError and the
# built-in, so that ``except AnvilWrappedError`` catches what it catches with anvil-uplink and
# ``except ValueError`` still works.

#: Built-ins whose constructor does not take a message alone: the arguments that build one from
#: the remote message (the message becomes ``reason``; ``str()`` is the remote message).
_CONSTRUCTOR_ARGS: dict[type[BaseException], Callable[[str], tuple[Any, ...]]] = {
    UnicodeDecodeError: lambda message: ("unknown", b"", 0, 0, message),
    UnicodeEncodeError: lambda message: ("unknown", "", 0, 0, message),
    UnicodeTranslateError: lambda message: ("", 0, 0, message),
}

_wrapped_lock = threading.Lock()
#: built-in type -> its wrapped class, or None when it cannot have one (``ExceptionGroup``).
_wrapped_classes: dict[type[BaseException], type[AnvilWrappedError] | None] = {}


def _rebuild_wrapped(builtin_name: str, message: str, remote_type: str | None) -> BaseException:
    """Unpickle a remote built-in error (see ``__reduce__`` in :func:`wrapped_builtin_class`)."""
    builtin = _builtin_exception(builtin_name)
    cls = wrapped_builtin_class(builtin) if builtin is not None else None
    if cls is None:
        return AnvilWrappedError(message, remote_type=remote_type)
    return cls(message, remote_type=remote_type)


def _make_wrapped_class(builtin: type[BaseException]) -> type[AnvilWrappedError] | None:
    name = builtin.__name__
    base: type[BaseException] = builtin
    namespace: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"A remote {name}: both the built-in {name} and AnvilWrappedError.",
        "wire_type": name,
    }
    make_args = _CONSTRUCTOR_ARGS.get(builtin)
    if make_args is not None:
        # A base between AnvilError and the built-in that turns the message into the
        # built-in's own arguments; str() is then the remote message, not the built-in's text.
        def __init__(self: BaseException, message: str = "") -> None:
            builtin.__init__(self, *make_args(message))

        base = type(name, (builtin,), {"__module__": __name__, "__init__": __init__})
        namespace["__str__"] = lambda self: self.message

    def __reduce__(self: AnvilWrappedError) -> tuple[Any, ...]:
        # The class cannot be imported by name, so pickling goes through a function that can.
        return (_rebuild_wrapped, (name, self.message, self.remote_type), self.__dict__)

    namespace["__reduce__"] = __reduce__
    try:
        cls = type(name, (AnvilWrappedError, base), namespace)
        cls("probe", remote_type=name)
    except Exception:  # e.g. ExceptionGroup, which needs its sub-exceptions
        return None
    return cls


def wrapped_builtin_class(builtin: type[BaseException]) -> type[AnvilWrappedError] | None:
    """The class a remote error of the built-in type *builtin* is raised as.

    It derives from both :class:`AnvilWrappedError` and *builtin*, is named like *builtin*, and
    is made once per built-in type. ``None`` for a built-in that cannot be combined so (such a
    remote error arrives as a plain :class:`AnvilWrappedError` with its ``remote_type``).
    """
    with _wrapped_lock:
        if builtin not in _wrapped_classes:
            _wrapped_classes[builtin] = _make_wrapped_class(builtin)
        return _wrapped_classes[builtin]


def error_from_wire(error: Any, where: str = "the remote side") -> BaseException:
    """Rebuild the exception described by a wire error.

    Parameters
    ----------
    error : dict
        ``{"type", "message", "trace"}``; any field may be missing.
    where : str
        Who raised it, for the note that labels the trace as remote.

    Returns
    -------
    BaseException
        An instance of the same class for anvil_nb's own and registered classes (and
        ``KeyError``); for another built-in type an instance of
        :func:`wrapped_builtin_class` (that built-in and :class:`AnvilWrappedError` at once);
        else an :class:`AnvilWrappedError` carrying the remote type name.
    """
    if not isinstance(error, dict):
        error = {"message": str(error)}
    type_name = error.get("type")
    message = str(error.get("message", ""))
    raw_trace = error.get("trace") if isinstance(error.get("trace"), list) else []
    # The trace comes from the peer: keep only well-formed [filename, line] entries.
    trace = [
        [str(t[0]), t[1]]
        for t in raw_trace
        if isinstance(t, (list, tuple)) and len(t) >= 2 and isinstance(t[1], int)
    ]
    cls: type[BaseException] | None = None
    wrapped: type[AnvilWrappedError] | None = None
    if isinstance(type_name, str):
        cls = _BY_WIRE_NAME.get(type_name)
        if cls is None:
            builtin = _builtin_exception(type_name)
            wrapped = wrapped_builtin_class(builtin) if builtin is not None else None
    exc: BaseException
    if cls is None:
        exc = (wrapped or AnvilWrappedError)(
            message, remote_type=type_name if isinstance(type_name, str) else None
        )
        exc.error_obj = dict(error)
    else:
        try:
            exc = cls(message)
        except Exception:  # a class that wants other arguments: keep the type name at least
            exc = AnvilWrappedError(message, remote_type=type_name)
    exc.remote_trace = list(trace)  # type: ignore[attr-defined]
    if trace and hasattr(exc, "add_note"):  # Python >= 3.11
        lines = "".join(f'\n  File "{t[0]}", line {t[1]}' for t in reversed(trace))
        exc.add_note(f"Remote traceback from {where} (most recent call last):{lines}")
    return exc
