"""Users through the host: ``anvil_nb.users`` and ``anvil.private.users.*`` from callers.

An in-process host (cheap argon2 parameters) with anvil_nb clients as callers and providers:
signing up and logging in act on the caller's session, which gets a new id each time; a user
travels as a row (``user["email"]``, ``user.get_id()``); ``require_user`` on callables and
endpoints; ``force_login`` only from server code and only with rows the host made; password
work never holds up other connections. HTTP Basic logins and the real client are in
``test_http_real.py``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from argon2 import PasswordHasher
from support.nethost import KEYS, NetHost

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.endpoints import request as server_request
from anvil_nb.core.errors import (
    AuthenticationFailed,
    PasswordNotAcceptable,
    PermissionDenied,
    TooManyPasswordFailures,
    UserExists,
)
from anvil_nb.core.liveobject import LiveObjectProxy
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread

CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
TIMEOUT = 10.0


@pytest.fixture
def host_thread() -> Iterator[HostThread]:
    """The host of ``connect`` (conftest), with cheap argon2 parameters."""
    thread = HostThread(lambda: Host(password_hasher=CHEAP))
    yield thread
    thread.stop()


def users_call(client: Client, name: str, *args: Any, **kwargs: Any) -> Any:
    return client.call(f"anvil.private.users.{name}", *args, **kwargs)


def test_sign_up_logs_the_session_in_and_the_user_is_a_row(connect: Callable[..., Client]):
    client = connect()
    before = client.call("anvil.private.get_session_id")
    user = users_call(client, "signup_with_email", "Ann@Example.com", "correct horse")
    assert isinstance(user, LiveObjectProxy)
    assert user["email"] == "ann@example.com"
    assert user["enabled"] is True
    assert user.get("missing", 7) == 7
    assert isinstance(user.get_id(), str)
    assert "ann@example.com" in repr(user)
    assert user["signed_up"].tzinfo is not None  # the table's datetime columns travel typed
    assert user["last_login"] is None
    after = client.call("anvil.private.get_session_id")
    assert after != before  # a new session id when the user changes (no fixation)
    assert users_call(client, "get_current_user") == user
    users_call(client, "logout")
    assert users_call(client, "get_current_user") is None
    assert client.call("anvil.private.get_session_id") not in (before, after)


def test_login_and_its_refusals(connect: Callable[..., Client]):
    client = connect()
    users_call(client, "signup_with_email", "bob@example.com", "long enough")
    users_call(client, "logout")
    with pytest.raises(UserExists):
        users_call(client, "signup_with_email", "BOB@example.com", "another one")
    with pytest.raises(PasswordNotAcceptable):
        users_call(client, "signup_with_email", "not-an-email", "long enough")
    with pytest.raises(AuthenticationFailed, match="Incorrect email address or password"):
        users_call(client, "login_with_email", "bob@example.com", "wrong")
    with pytest.raises(AuthenticationFailed, match="Incorrect email address or password"):
        users_call(client, "login_with_email", "nobody@example.com", "wrong")
    assert users_call(client, "get_current_user") is None
    user = users_call(client, "login_with_email", "bob@example.com", "long enough")
    assert user["email"] == "bob@example.com"
    assert user["last_login"] >= user["signed_up"]


def test_repeated_wrong_passwords_lock_the_account(connect: Callable[..., Client]):
    client = connect()
    users_call(client, "signup_with_email", "cat@example.com", "the password")
    for _ in range(4):  # three are free; the fourth starts a lock-out
        with pytest.raises(AuthenticationFailed):
            users_call(client, "login_with_email", "cat@example.com", "wrong")
    with pytest.raises(TooManyPasswordFailures, match="try again in"):
        users_call(client, "login_with_email", "cat@example.com", "the password")


def test_a_login_belongs_to_the_caller_s_session_only(connect: Callable[..., Client]):
    ann, other = connect(), connect()
    users_call(ann, "signup_with_email", "dee@example.com", "the password")
    assert users_call(ann, "get_current_user") is not None
    assert users_call(other, "get_current_user") is None


def test_require_user_on_a_callable(connect: Callable[..., Client]):
    registry = FunctionRegistry()
    registry.register("anyone_logged_in", lambda: "in", require_user=True)
    registry.register(
        "only_admins", lambda: "admin", require_user=lambda u: u["email"].startswith("admin")
    )
    connect("server_module", registry)
    caller = connect("browser")
    with pytest.raises(AuthenticationFailed, match="must be logged in"):
        caller.call("anyone_logged_in")
    users_call(caller, "signup_with_email", "eve@example.com", "the password")
    assert caller.call("anyone_logged_in") == "in"
    with pytest.raises(PermissionDenied):
        caller.call("only_admins")
    users_call(caller, "logout")
    users_call(caller, "signup_with_email", "admin@example.com", "the password")
    assert caller.call("only_admins") == "admin"


def test_the_user_of_the_caller_reaches_server_code(connect: Callable[..., Client]):
    registry = FunctionRegistry()

    def whoami() -> Any:
        from anvil_nb import users  # noqa: PLC0415

        user = users.get_user()
        return user["email"] if user is not None else None

    registry.register("whoami", whoami)
    connect("server_module", registry)
    caller = connect("browser")
    assert caller.call("whoami") is None
    users_call(caller, "signup_with_email", "fay@example.com", "the password")
    assert caller.call("whoami") == "fay@example.com"


def test_force_login_is_for_server_code_with_rows_the_host_made(connect: Callable[..., Client]):
    server = connect()
    user = users_call(server, "signup_with_email", "gus@example.com", "the password")
    users_call(server, "logout")
    browser = connect("browser")
    with pytest.raises(PermissionDenied, match="server code"):
        users_call(browser, "force_login", user)
    forged = LiveObjectProxy({**user._spec, "id": "someone-else"})
    with pytest.raises(PermissionDenied, match="not a row"):
        users_call(server, "force_login", forged)
    odd = LiveObjectProxy({**user._spec, "mac": "é" * 64})  # not even ASCII
    with pytest.raises(PermissionDenied, match="not a row"):
        users_call(server, "force_login", odd)
    assert users_call(server, "force_login", user) == user
    assert users_call(server, "get_current_user")["email"] == "gus@example.com"


def test_password_work_does_not_hold_up_other_connections():
    slow = PasswordHasher(time_cost=6, memory_cost=64 * 1024, parallelism=1)
    ht = HostThread(lambda: Host(password_hasher=slow))
    try:
        busy = Client(ht.connect("server_module"), functions=FunctionRegistry()).start()
        other = Client(ht.connect("server_module"), functions=FunctionRegistry()).start()
        done = threading.Event()

        def sign_up() -> None:
            users_call(busy, "signup_with_email", "hal@example.com", "the password")
            done.set()

        worker = threading.Thread(target=sign_up)
        worker.start()
        # the host's loop keeps answering while the hash is computed on the pool
        answered = 0
        while not done.is_set() and answered < 1000:
            assert other.call("anvil.private.echo", "x") == "x"
            answered += 1
        worker.join(TIMEOUT)
        assert done.is_set()
        assert answered > 0
        busy.close()
        other.close()
    finally:
        ht.stop()


# ---------------------------------------------------------------------------------------------
# Endpoints: authenticate_users and require_user over real HTTP


@pytest.fixture
def users_net() -> Iterator[NetHost]:
    net = NetHost()
    net.host.accounts._hasher = CHEAP  # before any app's users are opened
    yield net
    net.stop()


def serve(net: NetHost, *endpoints: tuple[Callable[..., Any], str, dict[str, Any]]) -> Client:
    """A provider serving *endpoints* (``(fn, path, options)``), once the host routes them."""
    return net.serve_endpoints(*endpoints)


def test_authenticate_users_checks_basic_credentials_against_the_users(users_net: NetHost):
    net = users_net
    admin = net.client(KEYS.server_key)
    users_call(admin, "signup_with_email", "ivy@example.com", "the password")
    serve(net, (lambda: server_request.user["email"], "/me", {"authenticate_users": True}))
    url = net.api + "/me"
    missing = requests.get(url, timeout=TIMEOUT)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Basic realm=")
    wrong = requests.get(url, auth=("ivy@example.com", "nope"), timeout=TIMEOUT)
    assert wrong.status_code == 401
    assert "Incorrect email address or password" in wrong.text
    ok = requests.get(url, auth=("ivy@example.com", "the password"), timeout=TIMEOUT)
    assert ok.status_code == 200
    assert ok.text == "ivy@example.com"


def test_a_browser_login_changes_its_cookie_and_require_user_follows_it(users_net: NetHost):
    net = users_net
    admin = net.client(KEYS.server_key)
    users_call(admin, "signup_with_email", "joe@example.com", "the password")

    def login(email: str, password: str) -> str:
        from anvil_nb import users  # noqa: PLC0415

        return users.login_with_email(email, password)["email"]

    def logout() -> None:
        from anvil_nb import users  # noqa: PLC0415

        users.logout()

    serve(
        net,
        (login, "/login", {"methods": ["POST"]}),
        (logout, "/logout", {"methods": ["POST"]}),
        (lambda: "secret", "/private", {"require_user": True}),
    )
    browser = requests.Session()
    assert browser.get(net.api + "/private", timeout=TIMEOUT).status_code == 401
    logged = browser.post(
        net.api + "/login", data={"email": "joe@example.com", "password": "the password"},
        timeout=TIMEOUT,
    )  # fmt: skip
    assert logged.text == "joe@example.com"
    cookie = logged.cookies.get("anvil_nb_session_default")
    assert cookie
    assert browser.get(net.api + "/private", timeout=TIMEOUT).text == "secret"
    out = browser.post(net.api + "/logout", timeout=TIMEOUT)
    assert out.cookies.get("anvil_nb_session_default") not in (None, cookie)
    assert browser.get(net.api + "/private", timeout=TIMEOUT).status_code == 401
    # the cookie from before the logout no longer carries the user (its session ended)
    stale = requests.get(
        net.api + "/private", cookies={"anvil_nb_session_default": cookie}, timeout=TIMEOUT
    )
    assert stale.status_code == 401
