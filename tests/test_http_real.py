"""HTTP endpoints served by uplink processes: the REAL ``anvil-uplink`` client and anvil_nb's.

A real ``python -m anvil_nb serve`` (temp data dir) is the host; each provider is an agent
process (see :mod:`support.agents`): ``real`` runs the unmodified ``anvil-uplink`` 0.7.0,
``nb`` runs anvil_nb's ``server`` module. Both define their endpoints with the same snippet
(``@S.http_endpoint``), and the same HTTP requests (``requests``, over 127.0.0.1) must get the
same answers. A browser session's data survives a restart of the host.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.agents import AGENT_SCRIPT, MODES, WAIT, Agent, HostProc, Spawn, spawner
from support.waiting import wait_until

ENDPOINTS = """
try:
    import anvil.users as U
except ImportError:  # an nb agent, where anvil is not importable
    from anvil_nb import users as U

@S.http_endpoint("/me", authenticate_users=True)
def me():
    u = S.request.user
    return {"email": u["email"], "id": u.get_id()}

@S.route("/routed/:x")
def routed_by_route(x):
    return "routed " + x

@S.http_endpoint("/books/:id")
def book(id, **params):
    r = S.request
    return {"id": id, "params": params, "path": r.path, "method": r.method,
            "agent": r.headers.get("user-agent", "")[:8]}

@S.http_endpoint("/made", methods=["POST"])
def made():
    return S.HttpResponse(201, "made", {"X-Made": "yes"})

@S.http_endpoint("/png")
def png():
    return BlobMedia("image/png", b"\\x89PNG-bytes")

@S.http_endpoint("/cors", enable_cors=True)
def cors():
    return {"open": True}

@S.http_endpoint("/creds", require_credentials=True)
def creds():
    return [S.request.username, S.request.password]

@S.http_endpoint("/broken")
def broken():
    raise ValueError("internal-detail-42")

@S.http_endpoint("/count")
def count():
    s = session()
    s["n"] = s.get("n", 0) + 1
    return s["n"]

@S.http_endpoint("/json", methods=["POST"])
def body():
    return {"got": S.request.body_json}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProc]:
    base = tmp_path_factory.mktemp("http_host")
    h = HostProc(base / "data", base / "host.log")
    yield h
    code, _ = h.stop()
    assert code == 0, h.log()


@pytest.fixture(scope="module")
def agents_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("http_agents")
    (folder / "agent.py").write_text(AGENT_SCRIPT)
    return folder


@pytest.fixture
def spawn(agents_dir: Path, tmp_path: Path, anvil_uplink_dir: Path) -> Iterator[Spawn]:
    agents: list[Agent] = []
    yield spawner(agents_dir / "agent.py", tmp_path, anvil_uplink_dir, agents)
    for a in agents:
        a.stop()


def routed(host: HostProc, path: str) -> bool:
    """Whether the host serves *path* yet (404 until the provider's REGISTER has landed)."""
    return requests.get(api(host, path), timeout=WAIT).status_code != 404


def api(host: HostProc, path: str) -> str:
    return host.http_url + "_/api" + path


def provider(spawn: Spawn, host: HostProc, mode: str) -> Agent:
    agent = spawn(mode, f"{mode}-http-provider")
    agent.run(ENDPOINTS)
    assert agent.connect(host.server_key, host.url) == "READY"
    wait_until(lambda: routed(host, "/books/1"), WAIT, "the endpoints to be routed")
    return agent


@pytest.mark.parametrize("mode", MODES)
def test_endpoints_answer_the_same_from_either_client(spawn: Spawn, host: HostProc, mode: str):
    agent = provider(spawn, host, mode)
    try:
        got = requests.get(api(host, "/books/42?x=1"), timeout=WAIT)
        assert got.status_code == 200, got.text
        assert got.headers["Content-Type"] == "application/json"
        assert got.json() == {
            "id": "42", "params": {"x": "1"}, "path": "/books/42", "method": "GET",
            "agent": "python-r",
        }  # fmt: skip
        made = requests.post(api(host, "/made"), timeout=WAIT)
        assert (made.status_code, made.text, made.headers["X-Made"]) == (201, "made", "yes")
        png = requests.get(api(host, "/png"), timeout=WAIT)
        assert (png.headers["Content-Type"], png.content) == ("image/png", b"\x89PNG-bytes")
        posted = requests.post(api(host, "/json"), json={"a": [1]}, timeout=WAIT)
        assert posted.json() == {"got": {"a": [1]}}
        # @route: the real client registers route:/..., anvil_nb http:/...; both are served
        assert requests.get(api(host, "/routed/yes"), timeout=WAIT).text == "routed yes"
    finally:
        agent.stop()


@pytest.mark.parametrize("mode", MODES)
def test_refusals_are_the_same_from_either_client(spawn: Spawn, host: HostProc, mode: str):
    agent = provider(spawn, host, mode)
    try:
        wrong = requests.get(api(host, "/made"), timeout=WAIT)
        assert wrong.status_code == 405
        assert wrong.headers["Allow"] == "POST"
        assert requests.get(api(host, "/books"), timeout=WAIT).status_code == 404
        broken = requests.get(api(host, "/broken"), timeout=WAIT)
        assert broken.status_code == 500
        assert "internal-detail-42" not in broken.text and "ValueError" not in broken.text
        anonymous = requests.get(api(host, "/creds"), timeout=WAIT)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic realm=")
        named = requests.get(api(host, "/creds"), auth=("ann", "pw"), timeout=WAIT)
        assert named.json() == ["ann", "pw"]
        bad_json = requests.post(
            api(host, "/json"), data=b"{", headers={"Content-Type": "application/json"},
            timeout=WAIT,
        )  # fmt: skip
        assert bad_json.status_code == 400
    finally:
        agent.stop()


@pytest.mark.parametrize("mode", MODES)
def test_cors_preflight_from_either_client(spawn: Spawn, host: HostProc, mode: str):
    agent = provider(spawn, host, mode)
    try:
        pre = requests.options(
            api(host, "/cors"),
            headers={"Origin": "https://a.example", "Access-Control-Request-Headers": "X-Key"},
            timeout=WAIT,
        )
        assert pre.status_code == 200
        assert pre.headers["Access-Control-Allow-Origin"] == "*"
        assert "x-key" in pre.headers["Access-Control-Allow-Headers"]
        assert (
            requests.get(api(host, "/cors"), timeout=WAIT).headers["Access-Control-Allow-Origin"]
            == "*"
        )
    finally:
        agent.stop()


@pytest.mark.parametrize("mode", MODES)
def test_users_from_either_client_and_basic_auth(spawn: Spawn, host: HostProc, mode: str):
    agent = provider(spawn, host, mode)
    email = f"{mode}-user@example.com"
    try:
        signed = agent.run(
            f"u = U.signup_with_email({email!r}, 'the password')\n"
            "result = [u['email'], u.get_id(), U.get_user()['email']]"
        )
        assert signed[0] == signed[2] == email
        assert agent.run("U.logout()\nresult = U.get_user()") is None
        wrong = agent.run(f"result = catch(U.login_with_email, {email!r}, 'wrong')")
        assert wrong["raised"] and wrong["name"] == "AuthenticationFailed", wrong
        me = requests.get(api(host, "/me"), auth=(email, "the password"), timeout=WAIT)
        assert me.json() == {"email": email, "id": signed[1]}
        refused = requests.get(api(host, "/me"), auth=(email, "wrong"), timeout=WAIT)
        assert refused.status_code == 401
    finally:
        agent.stop()


def test_users_managed_from_a_shell_log_in_on_the_running_host(spawn: Spawn, host: HostProc):
    agent = provider(spawn, host, "real")
    try:

        def users_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "anvil_nb", "users", *args, "--data-dir", str(host.data_dir)],
                input=stdin, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        added = users_cli("add", "cli@example.com", "--password-stdin", stdin="from the shell\n")
        assert added.returncode == 0, added.stderr
        me = requests.get(
            api(host, "/me"), auth=("cli@example.com", "from the shell"), timeout=WAIT
        )
        assert me.status_code == 200, me.text
        assert me.json()["email"] == "cli@example.com"
        listed = users_cli("list", "--json")
        assert "cli@example.com" in listed.stdout and "argon2" not in listed.stdout
        off = users_cli("disable", "cli@example.com")
        assert off.returncode == 0, off.stderr
        refused = agent.run(
            "result = catch(U.login_with_email, 'cli@example.com', 'from the shell')"
        )
        assert refused["raised"] and refused["name"] == "AccountIsNotEnabled", refused
        gone = requests.get(
            api(host, "/me"), auth=("cli@example.com", "from the shell"), timeout=WAIT
        )
        assert gone.status_code == 401
    finally:
        agent.stop()


def test_a_browser_session_survives_a_host_restart(spawn: Spawn, tmp_path: Path):
    first = HostProc(tmp_path / "data", tmp_path / "host1.log")
    second: HostProc | None = None
    try:
        agent = provider(spawn, first, "real")
        browser = requests.Session()
        assert browser.get(api(first, "/count"), timeout=WAIT).json() == 1
        assert browser.get(api(first, "/count"), timeout=WAIT).json() == 2
        code, _ = first.stop()
        assert code == 0, first.log()
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        second = HostProc.restart(first, port)

        def counted() -> Any:  # the real client reconnects by itself, 1 s after a close
            response = browser.get(api(second, "/count"), timeout=WAIT)
            return response.json() if response.status_code == 200 else None

        assert wait_until(counted, 30, "the provider to serve /count again", interval=0.2) == 3
        agent.stop()
    finally:
        for h in (first, second):
            if h is not None and h.proc.poll() is None:
                h.stop()
