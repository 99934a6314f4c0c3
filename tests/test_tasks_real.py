"""Background tasks across real processes: the REAL ``anvil-uplink`` client and anvil_nb's.

A real ``python -m anvil_nb serve`` is the host; providers and launchers are agent processes
(:mod:`support.agents`): ``real`` runs the unmodified ``anvil-uplink`` 0.7.0, ``nb`` anvil_nb's
``server`` module, and both define the same tasks with ``@S.background_task``. Every pairing
launches, watches and reads results; kill ends an anvil_nb task within a second and leaves
its provider serving, and answers for a real uplink's task as the App Server does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.agents import AGENT_SCRIPT, MODES, WAIT, Agent, HostProc, Spawn, spawner

TASKS = """
import threading, time
try:
    import anvil.server
    STATE = lambda: anvil.server.task_state
except ImportError:
    STATE = lambda: S.task_state

@S.background_task
def rt_count(n):
    for i in range(n):
        STATE()["i"] = i + 1
    ctx = S.context
    return {"n": n, "task": ctx.background_task_id, "client": ctx.client.type}

@S.background_task
def rt_spin(limit):
    started, i = time.monotonic(), 0
    while time.monotonic() - started < limit:  # a busy Python loop
        i += 1
        if i % 1000 == 0:
            STATE()["i"] = i
    return "ran out"

@S.background_task
def rt_fail():
    raise ValueError("task failed on purpose")

@S.callable
def rt_echo(x):
    return x

@S.callable
def rt_start(n):  # launched by server code, handed to whoever called
    return S.launch_background_task("rt_count", n)
"""

WATCH = """
def wait_end(t, limit=20):
    deadline = time.monotonic() + limit
    while t.get_termination_status() is None:
        assert time.monotonic() < deadline, "the task did not end"
        time.sleep(0.02)
    return t.get_termination_status()

def wait_state(t, key, limit=20):
    deadline = time.monotonic() + limit
    while not (t.get_state() or {}).get(key):
        assert time.monotonic() < deadline, "no state"
        time.sleep(0.02)
    return t.get_state()
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostProc]:
    base = tmp_path_factory.mktemp("tasks_host")
    h = HostProc(base / "data", base / "host.log")
    yield h
    code, _ = h.stop()
    assert code == 0, h.log()


@pytest.fixture
def spawn(tmp_path: Path, anvil_uplink_dir: Path) -> Iterator[Spawn]:
    (tmp_path / "agent.py").write_text(AGENT_SCRIPT)
    agents: list[Agent] = []
    yield spawner(tmp_path / "agent.py", tmp_path, anvil_uplink_dir, agents)
    for a in agents:
        a.stop()


def joined(spawn: Spawn, host: HostProc, mode: str, role: str, key: str = "server") -> Agent:
    agent = spawn(
        mode,
        f"{mode}-{role}",
        setup="import time\n" + TASKS if role == "provider" else "import time\n" + WATCH,
    )
    if role != "provider":
        agent.run(WATCH)
    assert (
        agent.connect(host.server_key if key == "server" else host.client_key, host.url) == "READY"
    )
    return agent


@pytest.mark.parametrize(("pmode", "lmode"), [(p, c) for p in MODES for c in MODES])
def test_launch_watch_and_results_across_clients(
    spawn: Spawn, host: HostProc, pmode: str, lmode: str
):
    provider = joined(spawn, host, pmode, "provider")
    launcher = joined(spawn, host, lmode, "launcher")
    try:
        out = launcher.run(
            "t = S.launch_background_task('rt_count', 500)\n"
            "status = wait_end(t)\n"
            "result = [status, t.get_return_value(), t.get_state(), t.get_id(), t.get_task_name()]"
        )
        status, value, state, task_id, name = out
        assert (status, name, state) == ("completed", "rt_count", {"i": 500})
        assert value == {"n": 500, "task": task_id, "client": "background_task"}
        failed = launcher.run(
            "t = S.launch_background_task('rt_fail')\nwait_end(t)\n"
            "result = [t.get_termination_status(), catch(t.get_error)]"
        )
        assert failed[0] == "failed"
        assert failed[1]["raised"] and "task failed on purpose" in failed[1]["message"], failed
    finally:
        provider.stop()
        launcher.stop()


@pytest.mark.parametrize("lmode", MODES)
def test_kill_ends_an_anvil_nb_task_within_a_second(spawn: Spawn, host: HostProc, lmode: str):
    provider = joined(spawn, host, "nb", "provider")
    launcher = joined(spawn, host, lmode, "launcher")
    try:
        launcher.run("t = S.launch_background_task('rt_spin', 60)\nresult = wait_state(t, 'i')")
        started = time.monotonic()
        assert launcher.run("t.kill()\nresult = t.get_termination_status()") == "killed"
        # the provider's task thread has ended (it checks from inside the provider)
        assert provider.run(
            "import threading\n"
            "deadline = time.monotonic() + 1.0\n"
            "while any(x.name.startswith('anvil_nb-task-') for x in threading.enumerate()):\n"
            "    assert time.monotonic() < deadline, 'the task still runs'\n"
            "    time.sleep(0.01)\n"
            "result = True"
        )
        assert time.monotonic() - started < 1.0 + WAIT / 10  # one round trip of slack
        assert_killed(launcher.run("result = catch(t.get_return_value)"))
        assert launcher.run("result = S.call('rt_echo', 'still serving')") == "still serving"
    finally:
        provider.stop()
        launcher.stop()


def assert_killed(outcome: dict) -> None:
    """``BackgroundTaskKilled`` (anvil-uplink 0.7.0 does not register that class, so a real
    launcher sees the type only by name, as an ``AnvilWrappedError``)."""
    assert outcome["raised"], outcome
    assert "BackgroundTaskKilled" in outcome["is"] or outcome["name"] == "AnvilWrappedError", (
        outcome
    )
    assert "was killed" in outcome["message"], outcome


def test_killing_a_real_uplink_task_answers_as_the_app_server_does(spawn: Spawn, host: HostProc):
    provider = joined(spawn, host, "real", "provider")
    launcher = joined(spawn, host, "nb", "launcher")
    try:
        launcher.run("t = S.launch_background_task('rt_spin', 3)\nresult = wait_state(t, 'i')")
        assert launcher.run("t.kill()\nresult = t.get_termination_status()") == "killed"
        assert_killed(launcher.run("result = catch(t.get_return_value)"))
        # the real client cannot stop it (it logs a banner) and keeps serving
        assert launcher.run("result = S.call('rt_echo', 'still serving')") == "still serving"
    finally:
        provider.stop()
        launcher.stop()


@pytest.mark.parametrize("mode", MODES)
def test_an_untrusted_caller_watches_a_task_it_was_given_but_cannot_kill_it(
    spawn: Spawn, host: HostProc, mode: str
):
    provider = joined(spawn, host, "nb", "provider")
    caller = joined(spawn, host, mode, "caller", key="client")
    try:
        out = caller.run(
            "t = S.call('rt_start', 9)\nstatus = wait_end(t)\n"
            "result = [status, t.get_return_value()['n'], catch(t.kill)]"
        )
        assert out[:2] == ["completed", 9], out
        assert out[2]["raised"] and "BackgroundTaskError" in out[2]["is"], out
    finally:
        provider.stop()
        caller.stop()


@pytest.mark.parametrize("mode", MODES)
def test_untrusted_launches_are_refused(spawn: Spawn, host: HostProc, mode: str):
    provider = joined(spawn, host, "nb", "provider")
    caller = joined(spawn, host, mode, "caller", key="client")
    try:
        refused = caller.run("result = catch(S.launch_background_task, 'rt_count', 1)")
        assert refused["raised"] and "BackgroundTaskError" in refused["is"], refused
    finally:
        provider.stop()
        caller.stop()


def test_records_outlive_the_launcher_and_a_host_restart(spawn: Spawn, tmp_path: Path):
    first = HostProc(tmp_path / "data", tmp_path / "host1.log")
    second: HostProc | None = None
    try:
        provider = joined(spawn, first, "real", "provider")
        launcher = joined(spawn, first, "real", "launcher")
        task_id = launcher.run(
            "t = S.launch_background_task('rt_count', 7)\nwait_end(t)\nresult = t.get_id()"
        )
        launcher.stop()  # the launcher goes; the record stays
        code, _ = first.stop()
        assert code == 0, first.log()
        provider.stop()
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        second = HostProc.restart(first, port)
        reader = joined(spawn, second, "nb", "reader")
        out = reader.run(
            f"t = S.get_background_task({task_id!r})\n"
            "result = [t.get_termination_status(), t.get_return_value()['n'],"
            " [x.get_id() for x in S.list_background_tasks()]]"
        )
        assert out == ["completed", 7, [task_id]], out
    finally:
        for h in (first, second):
            if h is not None and h.proc.poll() is None:
                h.stop()
