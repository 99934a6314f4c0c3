"""The public API: ``from anvil_nb import server`` mirrors ``anvil.server`` (DESIGN.md).

These tests use the process's default connection, which starts an embedded host on first use;
the autouse fixture in conftest stops it after each test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import anvil_nb
import anvil_nb.client.client
from anvil_nb import server
from anvil_nb.core.serialise import serialise
from anvil_nb.media import BlobMedia, Media
from anvil_nb.users import AuthenticationFailed

# The "Python API" row of DESIGN.md's fixed interfaces, and the reference page's exceptions.
DESIGN_NAMES = {
    "callable", "portable_class", "call", "connect", "disconnect", "Capability",
    "unwrap_capability", "context", "session", "request", "get_session_id", "reset_session",
    "is_app_online", "get_app_origin", "get_api_origin", "FormResponse", "HttpRequest",
    "HttpResponse", "http_endpoint", "background_task", "launch_background_task", "task_state",
    "no_loading_indicator", "CallContext",
    "route",  # the "HTTP endpoints" row: http_endpoint's alias
}  # fmt: skip
REFERENCE_EXCEPTIONS = {
    "AppOfflineError", "BackgroundTaskError", "BackgroundTaskKilled", "BackgroundTaskNotFound",
    "ExecutionTerminatedError", "InternalError", "InvalidResponseError", "NoServerFunctionError",
    "PermissionDenied", "QuotaExceededError", "RuntimeUnavailableError", "SerializationError",
    "ServiceNotAdded", "SessionExpiredError", "TimeoutError", "UplinkDisconnectedError",
}  # fmt: skip
# What anvil_nb adds: the exception root, the wrapped-error class, an awaitable call, the parts
# of CallContext and portable classes that user code names in annotations, and anvil-uplink's
# wait_forever.
EXTRAS = {
    "AnvilError", "AnvilWrappedError", "call_async", "ClientInfo", "Location", "StackFrame",
    "SerializationInfo", "wait_forever",
    # anvil.server's, beyond the fixed list (also the real client's), and the kill check
    "list_background_tasks", "get_background_task", "task_killed",
}  # fmt: skip


def test_exported_names_are_exactly_the_public_api():
    assert set(server.__all__) == DESIGN_NAMES | REFERENCE_EXCEPTIONS | EXTRAS


@pytest.mark.parametrize(
    "name", sorted((DESIGN_NAMES | REFERENCE_EXCEPTIONS | EXTRAS) - {"context", "request"})
)
def test_every_public_name_has_a_docstring(name):
    assert (getattr(server, name).__doc__ or "").strip()


def test_capability_has_the_reference_members():
    cap = server.Capability(["x"])
    for member in ("narrow", "send_update", "set_update_handler", "is_valid", "scope"):
        assert hasattr(cap, member)
    assert server.Capability.ANY is not None


def test_media_interface():
    m = BlobMedia("text/plain", b"hello", name="h.txt")
    assert isinstance(m, Media)
    assert (m.get_bytes(), m.content_type, m.name, m.length) == (b"hello", "text/plain", "h.txt", 5)


def test_version_matches_package_json():
    package = json.loads((Path(__file__).parents[1] / "package.json").read_text())
    assert anvil_nb.__version__ == package["version"]


def test_importing_the_api_loads_no_server_framework():
    code = "import sys; from anvil_nb import server; print(sorted(m for m in ('tornado', 'jupyter_server', 'ipywidgets') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# The embedded default


def test_callable_and_call_work_with_no_setup():
    @server.callable
    def add(a, b):
        return a + b

    assert not server.is_app_online()
    assert server.call("add", 1, b=2) == 3
    assert server.is_app_online()


def test_decorator_forms():
    @server.callable("named.thing")
    def f():
        return "named"

    @server.callable(require_user=True)
    def needs_user():
        return "never"

    server.callable("direct")(lambda: "direct")
    assert server.call("named.thing") == "named"
    assert server.call("direct") == "direct"
    with pytest.raises(AuthenticationFailed, match="must be logged in"):
        server.call("needs_user")  # as the real client: anvil.users.AuthenticationFailed


def test_the_person_example_arrives_as_a_new_object():
    @server.portable_class
    class Person:
        def __init__(self, name, age):
            self.name, self.age = name, age

        def greet(self):
            return f"Hello, {self.name}"

    @server.callable
    def birthday(p):
        p.age += 1
        return p

    ann = Person("Ann", 30)
    older = server.call("birthday", ann)
    assert isinstance(older, Person) and older is not ann
    assert (older.age, ann.age, older.greet()) == (31, 30, "Hello, Ann")


def test_context_outside_a_call():
    ctx = server.context
    assert ctx.type == "server_module"
    assert ctx.remote_caller is None and ctx.client is None


def test_context_inside_a_call_from_this_process():
    @server.callable
    def ctx():
        c = server.context
        return [c.type, c.client.type, c.remote_caller.type, c.remote_caller.is_trusted]

    assert server.call("ctx") == ["server_module", "server_module", "server_module", True]


def test_session_outside_a_call_is_a_clear_error():
    with pytest.raises(RuntimeError, match="only available inside a server function"):
        server.session["x"] = 1


def test_session_and_session_id_across_calls_from_this_process():
    @server.callable
    def visit():
        server.session["visits"] = server.session.get("visits", 0) + 1
        return server.session["visits"], server.get_session_id()

    first, second = server.call("visit"), server.call("visit")
    assert (first[0], second[0]) == (1, 2)
    assert first[1] == second[1] == server.get_session_id()


def test_reset_session_outside_a_call_starts_a_new_session():
    @server.callable
    def visit():
        server.session["visits"] = server.session.get("visits", 0) + 1
        return server.session["visits"]

    server.call("visit")
    before = server.get_session_id()
    server.reset_session()
    assert server.get_session_id() != before
    assert server.call("visit") == 1


def test_origins_of_a_host_without_http():
    assert server.get_app_origin() is None
    assert server.get_api_origin() is None


def test_no_loading_indicator_is_a_context_manager():
    with server.no_loading_indicator:
        pass


def test_form_response_travels_under_anvils_name():
    enc = serialise({"response": server.FormResponse("Form1", 1, x=2)})
    assert enc.message["objects"][-1]["typeName"] == "anvil.server._LoadAppResponse"


def test_task_state_is_a_mapping_not_a_function():
    # task_state["progress"] = 1 is how a task reports; outside a task it says where it works
    assert not callable(server.task_state)
    with pytest.raises(RuntimeError, match="inside a background task"):
        server.task_state["progress"] = 1


def test_background_task_registers_the_real_client_s_name():
    @server.background_task
    def nightly():
        return 1

    @server.background_task("named_job")
    def job():
        return 2

    names = anvil_nb.client.client.functions.names()
    assert "task:nightly" in names and "task:named_job" in names
    assert nightly() == 1 and job() == 2  # the functions themselves, unchanged


def test_http_endpoint_registers_the_real_client_s_name_and_serves_its_kwargs():
    @server.http_endpoint("/hello/:name", methods=["GET"])
    def hello(name, greeting="hi"):
        return {"text": f"{greeting} {name}", "path": server.request.path}

    assert hello.__name__ == "hello"  # the function itself is returned, unchanged
    assert server.route is server.http_endpoint
    request = {
        "method": "GET", "path": "/hello/ann", "query_params": {"greeting": "hey"},
        "form_params": {}, "origin": None, "headers": {}, "remote_address": "127.0.0.1",
        "body": None, "username": None, "password": None,
    }  # fmt: skip
    # a trusted caller may call an endpoint's registration as the host does
    answer = server.call("http:/hello/ann", **request)
    assert answer == {
        "status": 200,
        "body": {"text": "hey ann", "path": "/hello/ann"},
        "headers": {},
    }
    assert server.call("http:/hello/ann", **{**request, "method": "POST"})["status"] == 405


def test_server_request_exists_but_is_only_readable_in_an_endpoint_call():
    assert hasattr(server, "request")
    with pytest.raises(RuntimeError, match="only available inside an HTTP endpoint call"):
        server.request.path  # noqa: B018


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        server.no_such_thing  # noqa: B018


def test_connect_to_a_host_that_is_not_there_says_so():
    with pytest.raises(server.AppOfflineError, match=r"ws://127\.0\.0\.1:1/_/uplink"):
        server.connect("key", "ws://127.0.0.1:1/_/uplink", quiet=True)
