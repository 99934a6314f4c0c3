"""The exception tree and how errors cross the wire (PROTOCOL.md §3).

Every class on Anvil's ``anvil.server`` reference page exists under :class:`AnvilError` and is
exported by ``anvil_nb.server``. On the wire an error is ``{"type", "message", "trace"}``:
anvil_nb's own classes travel as ``anvil.server.<Name>``, other classes under their bare name,
and the trace is ``[[filename, line], ...]`` innermost first without anvil_nb's own frames. On
receipt anvil_nb's own and registered classes are rebuilt as themselves; a built-in type as a
class that is both that built-in and ``AnvilWrappedError`` (``KeyError`` excepted: plain, as in
the real ``anvil-uplink`` client); anything else as an ``AnvilWrappedError`` carrying the remote
type name. The remote trace is kept and shown as a note labelled remote.
"""

from __future__ import annotations

import builtins
import copy
import pickle
import traceback

import pytest

import anvil_nb
from anvil_nb import server
from anvil_nb.core import errors
from anvil_nb.core.errors import (
    AnvilError,
    AnvilWrappedError,
    PermissionDenied,
    UplinkDisconnectedError,
    error_from_wire,
    error_to_wire,
    register_exception_type,
)

REFERENCE_PAGE_CLASSES = [
    "AppOfflineError",
    "BackgroundTaskError",
    "BackgroundTaskKilled",
    "BackgroundTaskNotFound",
    "ExecutionTerminatedError",
    "InternalError",
    "InvalidResponseError",
    "NoServerFunctionError",
    "PermissionDenied",
    "QuotaExceededError",
    "RuntimeUnavailableError",
    "SerializationError",
    "ServiceNotAdded",
    "SessionExpiredError",
    "TimeoutError",
    "UplinkDisconnectedError",
]

#: Every class anvil_nb sends under an ``anvil.server.`` name.
OWN_CLASSES = sorted(
    name
    for name in errors.__all__
    if isinstance(getattr(errors, name), type)
    and issubclass(getattr(errors, name), AnvilError)
    and (getattr(errors, name).wire_type or "").startswith("anvil.server.")
)

THIS_FILE = __file__.replace("\\", "/")
PACKAGE_DIR = str(anvil_nb.__file__).replace("\\", "/").rsplit("/", 1)[0] + "/"


class MyError(Exception):
    """A user's exception class, unknown to the other side."""


class NeedsTwoArguments(Exception):
    def __init__(self, a, b):
        super().__init__(a, b)


def raise_inner():
    raise ValueError("from the inner function")


def call_inner():
    raise_inner()


INNER_LINE = raise_inner.__code__.co_firstlineno + 1
OUTER_LINE = call_inner.__code__.co_firstlineno + 1


def caught(exc: BaseException) -> BaseException:
    """*exc* after being raised and caught here, so it has a traceback."""
    try:
        raise exc
    except BaseException as e:
        return e


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test register wire types without leaking them into other tests."""
    monkeypatch.setattr(errors, "_BY_WIRE_NAME", dict(errors._BY_WIRE_NAME))


# ---------------------------------------------------------------------------------------------
# The classes


def test_the_reference_page_list_is_covered_by_the_wire_classes() -> None:
    assert set(REFERENCE_PAGE_CLASSES) <= set(OWN_CLASSES)


@pytest.mark.parametrize("name", REFERENCE_PAGE_CLASSES)
def test_reference_page_class_exists_in_errors_and_server_under_anvil_error(name: str) -> None:
    cls = getattr(errors, name)

    assert isinstance(cls, type)
    assert issubclass(cls, AnvilError)
    assert issubclass(cls, Exception)
    assert getattr(server, name) is cls
    assert name in errors.__all__
    assert name in server.__all__


def test_anvil_error_and_wrapped_error_are_exported_by_server() -> None:
    assert server.AnvilError is AnvilError
    assert server.AnvilWrappedError is AnvilWrappedError
    assert issubclass(AnvilWrappedError, AnvilError)


def test_anvil_timeout_error_is_also_the_builtin_timeout_error() -> None:
    assert issubclass(errors.TimeoutError, builtins.TimeoutError)
    assert errors.TimeoutError is not builtins.TimeoutError
    with pytest.raises(builtins.TimeoutError):
        raise errors.TimeoutError("too slow")
    with pytest.raises(AnvilError):
        raise errors.TimeoutError("too slow")


@pytest.mark.parametrize("name", OWN_CLASSES)
def test_own_class_keeps_its_message(name: str) -> None:
    exc = getattr(errors, name)("the message")

    assert exc.message == "the message"
    assert str(exc) == "the message"


# ---------------------------------------------------------------------------------------------
# error_to_wire


@pytest.mark.parametrize("name", OWN_CLASSES)
def test_own_class_goes_on_the_wire_as_anvil_server_name(name: str) -> None:
    exc = caught(getattr(errors, name)("it went wrong"))

    wire = error_to_wire(exc)

    assert wire["type"] == f"anvil.server.{name}"
    assert wire["message"] == "it went wrong"
    assert isinstance(wire["trace"], list)
    assert wire["trace"]
    for entry in wire["trace"]:
        assert isinstance(entry, list)
        assert len(entry) == 2
        assert isinstance(entry[0], str)
        assert isinstance(entry[1], int)
    assert wire["trace"][0][0] == THIS_FILE


def test_trace_lists_frames_innermost_first() -> None:
    try:
        call_inner()
    except ValueError as e:
        exc = e

    wire = error_to_wire(exc)

    assert wire["type"] == "ValueError"
    assert wire["message"] == "from the inner function"
    assert wire["trace"][0] == [THIS_FILE, INNER_LINE]
    assert wire["trace"][1] == [THIS_FILE, OUTER_LINE]
    assert wire["trace"][2][0] == THIS_FILE  # this test function, the outermost frame
    assert len(wire["trace"]) == 3


def test_trace_leaves_out_frames_of_the_anvil_nb_package() -> None:
    try:
        register_exception_type("NotAClass", 5)  # type: ignore[arg-type]
    except TypeError as e:
        exc = e
    raw = [fs.filename.replace("\\", "/") for fs in traceback.extract_tb(exc.__traceback__)]
    assert any(f.startswith(PACKAGE_DIR) for f in raw), "the error should come from anvil_nb"

    wire = error_to_wire(exc)

    assert wire["trace"]
    assert all(not entry[0].startswith(PACKAGE_DIR) for entry in wire["trace"])
    assert [entry[0] for entry in wire["trace"]] == [THIS_FILE]


def test_error_without_traceback_has_an_empty_trace() -> None:
    wire = error_to_wire(PermissionDenied("no"))

    assert wire == {"type": "anvil.server.PermissionDenied", "message": "no", "trace": []}


def test_user_exception_class_travels_under_its_bare_name() -> None:
    wire = error_to_wire(caught(MyError("mine")))

    assert wire["type"] == "MyError"
    assert wire["message"] == "mine"


def test_builtin_exception_travels_under_its_bare_name() -> None:
    wire = error_to_wire(caught(ValueError("kaboom")))

    assert wire["type"] == "ValueError"
    assert wire["message"] == "kaboom"


def test_key_error_sends_the_key_itself_as_message() -> None:
    wire = error_to_wire(caught(KeyError("k")))

    assert wire["type"] == "KeyError"
    assert wire["message"] == "k"


def test_wrapped_error_is_sent_on_under_its_remote_type_with_its_remote_trace() -> None:
    received = error_from_wire({"type": "MyError", "message": "deep", "trace": [["remote.py", 7]]})

    wire = error_to_wire(caught(received))

    assert wire["type"] == "MyError"
    assert wire["message"] == "deep"
    assert wire["trace"][0][0] == THIS_FILE
    assert wire["trace"][-1] == ["remote.py", 7]


# ---------------------------------------------------------------------------------------------
# error_from_wire


def test_anvil_server_type_is_rebuilt_as_that_class() -> None:
    exc = error_from_wire(
        {"type": "anvil.server.PermissionDenied", "message": "not you", "trace": []}
    )

    assert type(exc) is PermissionDenied
    assert exc.message == "not you"
    assert str(exc) == "not you"


def test_builtin_value_error_is_rebuilt_as_a_value_error_that_is_also_a_wrapped_error() -> None:
    exc = error_from_wire({"type": "ValueError", "message": "kaboom", "trace": []})

    assert isinstance(exc, ValueError)
    assert isinstance(exc, AnvilWrappedError)
    assert type(exc).__name__ == "ValueError"
    assert str(exc) == "kaboom"
    assert exc.message == "kaboom"
    assert exc.remote_type == "ValueError"
    assert exc.error_obj == {"type": "ValueError", "message": "kaboom", "trace": []}
    assert repr(exc) == "ValueError('kaboom')"


def test_remote_builtin_error_is_caught_by_the_builtin_and_by_anvil_wrapped_error() -> None:
    wire = {"type": "ValueError", "message": "kaboom", "trace": []}

    with pytest.raises(ValueError, match="kaboom"):
        raise error_from_wire(wire)
    with pytest.raises(AnvilWrappedError, match="kaboom"):
        raise error_from_wire(wire)
    with pytest.raises(AnvilError):
        raise error_from_wire(wire)


def test_key_error_is_rebuilt_as_a_plain_key_error_as_the_real_client_does() -> None:
    # anvil-uplink's _named_exceptions rebuilds KeyError as itself, not as AnvilWrappedError.
    exc = error_from_wire({"type": "KeyError", "message": "k", "trace": []})

    assert type(exc) is KeyError
    assert not isinstance(exc, AnvilWrappedError)
    assert exc.args == ("k",)
    assert str(exc) == "'k'"


BUILTIN_ERRORS = sorted(
    name
    for name, cls in vars(builtins).items()
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, Warning)
)
#: Built-ins that cannot be combined with AnvilWrappedError (they need their sub-exceptions).
UNCOMBINABLE = {"ExceptionGroup"}


@pytest.mark.parametrize("name", sorted(set(BUILTIN_ERRORS) - {"KeyError"} - UNCOMBINABLE))
def test_every_builtin_error_is_rebuilt_as_that_builtin_and_a_wrapped_error(name: str) -> None:
    builtin = getattr(builtins, name)

    exc = error_from_wire({"type": name, "message": "the message", "trace": [["r.py", 4]]})

    assert isinstance(exc, builtin)
    assert isinstance(exc, AnvilWrappedError)
    assert type(exc).__name__ == builtin.__name__  # IOError and EnvironmentError are OSError
    assert type(exc) is errors.wrapped_builtin_class(builtin)
    assert str(exc) == "the message"
    assert exc.message == "the message"
    assert exc.remote_type == name
    assert exc.remote_trace == [["r.py", 4]]
    assert any("Remote traceback" in n for n in exc.__notes__)
    assert error_to_wire(exc)["type"] == builtin.__name__


@pytest.mark.parametrize("name", sorted(UNCOMBINABLE))
def test_builtin_that_cannot_be_combined_arrives_as_a_plain_wrapped_error(name: str) -> None:
    exc = error_from_wire({"type": name, "message": "m", "trace": [["a.py", 1]]})

    assert type(exc) is AnvilWrappedError
    assert exc.remote_type == name
    assert exc.message == "m"
    assert exc.remote_trace == [["a.py", 1]]


def test_one_class_per_builtin_type() -> None:
    first = error_from_wire({"type": "ValueError", "message": "a"})
    second = error_from_wire({"type": "ValueError", "message": "b"})
    other = error_from_wire({"type": "TypeError", "message": "c"})

    assert type(first) is type(second)
    assert type(first) is not type(other)
    assert not isinstance(other, ValueError)


def test_subclass_relations_of_the_builtins_hold() -> None:
    exc = error_from_wire({"type": "FileNotFoundError", "message": "no such file"})

    with pytest.raises(OSError):
        raise exc
    assert isinstance(exc, FileNotFoundError)
    assert exc.errno is None
    assert str(exc) == "no such file"


def test_remote_timeout_error_is_the_builtin_not_anvils_own_timeout_error() -> None:
    exc = error_from_wire({"type": "TimeoutError", "message": "slow"})

    assert isinstance(exc, builtins.TimeoutError)
    assert isinstance(exc, AnvilWrappedError)
    assert not isinstance(exc, errors.TimeoutError)
    assert error_to_wire(exc)["type"] == "TimeoutError"


@pytest.mark.parametrize(
    "name", ["UnicodeDecodeError", "UnicodeEncodeError", "UnicodeTranslateError"]
)
def test_builtin_with_a_special_constructor_keeps_the_remote_message(name: str) -> None:
    exc = error_from_wire({"type": name, "message": "bad byte", "trace": []})

    assert isinstance(exc, getattr(builtins, name))
    assert isinstance(exc, UnicodeError)
    assert isinstance(exc, AnvilWrappedError)
    assert type(exc).__name__ == name
    assert str(exc) == "bad byte"
    assert exc.reason == "bad byte"
    assert exc.remote_type == name


def test_traceback_names_the_builtin() -> None:
    exc = error_from_wire({"type": "ValueError", "message": "kaboom", "trace": []})

    shown = traceback.format_exception_only(type(exc), exc)[0]

    assert shown.rstrip("\n").endswith("ValueError: kaboom")


def test_remote_builtin_error_survives_pickle_and_copy() -> None:
    exc = error_from_wire(
        {"type": "ValueError", "message": "kaboom", "trace": [["r.py", 9]]}, where="the uplink"
    )

    for again in (pickle.loads(pickle.dumps(exc)), copy.copy(exc), copy.deepcopy(exc)):
        assert type(again) is type(exc)
        assert str(again) == "kaboom"
        assert again.remote_type == "ValueError"
        assert again.remote_trace == [["r.py", 9]]
        assert again.__notes__ == exc.__notes__


def test_remote_builtin_error_is_sent_on_under_its_builtin_name_with_its_remote_trace() -> None:
    received = error_from_wire({"type": "ValueError", "message": "deep", "trace": [["r.py", 7]]})

    wire = error_to_wire(caught(received))

    assert wire["type"] == "ValueError"
    assert wire["message"] == "deep"
    assert wire["trace"][0][0] == THIS_FILE
    assert wire["trace"][-1] == ["r.py", 7]


def test_registering_a_builtin_name_makes_it_arrive_plain(registry: None) -> None:
    register_exception_type("ValueError", ValueError)

    exc = error_from_wire({"type": "ValueError", "message": "plain", "trace": []})

    assert type(exc) is ValueError
    assert str(exc) == "plain"


def test_remote_builtin_error_through_a_real_call_is_caught_both_ways() -> None:
    @server.callable
    def fails(kind):
        if kind == "value":
            raise ValueError("bad value")
        raise FileNotFoundError("no such file: x.txt")

    with pytest.raises(ValueError, match="bad value") as info:
        server.call("fails", "value")
    assert isinstance(info.value, AnvilWrappedError)
    assert info.value.remote_type == "ValueError"
    assert any("Remote traceback" in n for n in info.value.__notes__)
    with pytest.raises(AnvilWrappedError, match="no such file") as info:
        server.call("fails", "file")
    assert isinstance(info.value, FileNotFoundError)
    assert type(info.value).__name__ == "FileNotFoundError"


def test_unknown_type_becomes_a_wrapped_error_keeping_the_remote_type() -> None:
    exc = error_from_wire({"type": "MyError", "message": "mine", "trace": []})

    assert type(exc) is AnvilWrappedError
    assert exc.remote_type == "MyError"
    assert exc.message == "mine"
    assert "mine" in str(exc)
    assert "MyError" in repr(exc)
    assert exc.error_obj["type"] == "MyError"
    assert exc.error_obj["message"] == "mine"


def test_registered_type_is_rebuilt_as_the_registered_class(registry: None) -> None:
    register_exception_type("MyError", MyError)

    exc = error_from_wire({"type": "MyError", "message": "mine", "trace": []})

    assert type(exc) is MyError
    assert str(exc) == "mine"


def test_register_exception_type_refuses_what_is_not_an_exception_class(registry: None) -> None:
    with pytest.raises(TypeError):
        register_exception_type("Nope", int)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_exception_type("Nope", ValueError("an instance"))  # type: ignore[arg-type]


def test_app_server_name_uplink_disconnected_is_rebuilt_as_uplink_disconnected_error() -> None:
    exc = error_from_wire(
        {"type": "anvil.server.UplinkDisconnected", "message": "gone", "trace": []}
    )

    assert type(exc) is UplinkDisconnectedError
    assert exc.message == "gone"


def test_missing_type_becomes_a_wrapped_error() -> None:
    exc = error_from_wire({"message": "no type given"})

    assert type(exc) is AnvilWrappedError
    assert exc.message == "no type given"
    assert exc.remote_type is None


def test_error_that_is_not_a_dict_becomes_a_wrapped_error_with_its_str() -> None:
    exc = error_from_wire("something broke")

    assert type(exc) is AnvilWrappedError
    assert exc.message == "something broke"
    assert str(exc) == "something broke"


@pytest.mark.parametrize("name", ["KeyboardInterrupt", "SystemExit", "GeneratorExit"])
def test_a_peer_cannot_make_a_non_exception_base_exception_raise_here(name: str) -> None:
    exc = error_from_wire({"type": name, "message": "stop", "trace": []})

    assert type(exc) is AnvilWrappedError
    assert exc.remote_type == name


def test_remote_trace_is_kept_and_shown_as_a_remote_note() -> None:
    trace = [["inner.py", 3], ["outer.py", 30]]

    exc = error_from_wire(
        {"type": "ValueError", "message": "kaboom", "trace": trace}, where="the uplink"
    )

    assert exc.remote_trace == trace
    notes = getattr(exc, "__notes__", [])
    assert len(notes) == 1
    note = notes[0]
    assert "Remote traceback" in note
    assert "the uplink" in note
    # Shown like a Python traceback: most recent call last.
    assert note.index('"outer.py", line 30') < note.index('"inner.py", line 3')


def test_wrapped_error_keeps_the_remote_trace_too() -> None:
    exc = error_from_wire({"type": "MyError", "message": "m", "trace": [["x.py", 1]]})

    assert type(exc) is AnvilWrappedError
    assert exc.remote_trace == [["x.py", 1]]
    assert any("Remote traceback" in n for n in exc.__notes__)


def test_malformed_trace_entries_do_not_stop_the_error_being_rebuilt() -> None:
    # A trace is peer-controlled; a bad entry must not turn the remote error into a TypeError.
    exc = error_from_wire(
        {"type": "ValueError", "message": "kaboom", "trace": [5, None, ["ok.py", 2]]}
    )

    assert isinstance(exc, ValueError)
    assert isinstance(exc, AnvilWrappedError)
    assert str(exc) == "kaboom"
    assert exc.remote_trace == [["ok.py", 2]]


def test_registered_class_needing_more_arguments_falls_back_to_a_wrapped_error(
    registry: None,
) -> None:
    register_exception_type("NeedsTwoArguments", NeedsTwoArguments)

    exc = error_from_wire({"type": "NeedsTwoArguments", "message": "m", "trace": [["a.py", 1]]})

    assert type(exc) is AnvilWrappedError
    assert exc.remote_type == "NeedsTwoArguments"
    assert exc.message == "m"
    assert exc.remote_trace == [["a.py", 1]]


@pytest.mark.parametrize("name", OWN_CLASSES)
def test_own_class_round_trips_through_the_wire(name: str) -> None:
    cls = getattr(errors, name)

    back = error_from_wire(error_to_wire(caught(cls("round trip"))))

    assert type(back) is cls
    assert back.message == "round trip"
    assert str(back) == "round trip"
    assert back.remote_trace
    assert back.remote_trace[0][0] == THIS_FILE
