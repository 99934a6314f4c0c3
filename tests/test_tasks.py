"""Background tasks through a host: launch, state, results, errors, kill, records.

An in-process host with anvil_nb clients as providers and launchers (the real ``anvil-uplink``
client is in ``test_tasks_real.py``). Tasks synchronise with the test through
``threading.Event``s and their ``task_state``; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support.waiting import wait_until

from anvil_nb import server
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.core.errors import (
    BackgroundTaskError,
    BackgroundTaskKilled,
    BackgroundTaskNotFound,
    NoServerFunctionError,
    PermissionDenied,
    SerializationError,
)
from anvil_nb.host.dispatcher import Host
from anvil_nb.host.inprocess import HostThread
from anvil_nb.host.tasks import MAX_KEPT_BYTES

TIMEOUT = 10.0
LAUNCH = "anvil.private.background_tasks.launch"


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


def tasks_registry(gate: threading.Event) -> FunctionRegistry:
    registry = FunctionRegistry()

    def count_to(n: int) -> dict[str, Any]:
        for i in range(n):
            server.task_state["progress"] = (i + 1) / n
        ctx = server.context
        return {
            "n": n, "task": ctx.background_task_id, "client": ctx.client.type,
            "caller": ctx.remote_caller.type, "trusted": ctx.remote_caller.is_trusted,
            "session": server.get_session_id(),
        }  # fmt: skip

    def wait_for_gate() -> str:
        server.task_state["waiting"] = True
        assert gate.wait(TIMEOUT)
        return "opened"

    def spin() -> None:
        i = 0
        while True:  # a busy Python loop: only a kill ends it
            i += 1
            server.task_state["i"] = i

    def fail() -> None:
        server.task_state["before"] = "the error"
        raise ValueError("the task failed")

    def huge() -> str:
        return "x" * (MAX_KEPT_BYTES + 1)

    for name, fn in [
        ("count_to", count_to),
        ("wait_for_gate", wait_for_gate),
        ("spin", spin),
        ("fail", fail),
        ("huge", huge),
    ]:
        registry.register("task:" + name, fn)

    def mint(scope: str) -> Any:  # a capability made in the task's own session
        return server.Capability([scope])

    def takes(cap: Any) -> list[Any]:
        return list(cap.scope)

    registry.register("task:mint", mint)
    registry.register("task:takes", takes)
    registry.register(
        "unwrap", lambda cap: server.unwrap_capability(cap, ["doc", server.Capability.ANY])
    )
    registry.register("echo", lambda x: x)
    registry.register("hand_out", lambda t: t)  # gives a task object to whoever calls
    return registry


@pytest.fixture
def provider(connect: Callable[..., Client], gate: threading.Event) -> Client:
    return connect("uplink", tasks_registry(gate))


def finished(task: Any) -> bool:
    return task.get_termination_status() is not None


def test_a_task_runs_in_its_own_session_with_a_background_task_context(connect, provider):
    launcher = connect()
    task = launcher.call(LAUNCH, "count_to", 1000)
    wait_until(lambda: finished(task), TIMEOUT, "the task to end")
    assert task.get_termination_status() == "completed"
    assert task.is_completed() is True
    assert task.is_running() is False
    result = task.get_return_value()
    assert result["n"] == 1000
    assert result["task"] == task.get_id()
    assert (result["client"], result["caller"], result["trusted"]) == (
        "background_task", "background_task", True,
    )  # fmt: skip
    assert result["session"] != launcher.call("anvil.private.get_session_id")
    assert task.get_state() == {"progress": 1.0}  # the final state is kept
    assert task.get_task_name() == "count_to"
    assert task.get_start_time().tzinfo is not None
    assert task.get_error() is None


def test_state_is_readable_while_it_runs_and_the_launcher_does_not_wait(connect, provider, gate):
    task = connect().call(LAUNCH, "wait_for_gate")  # returns at once: the task waits for the gate
    wait_until(lambda: task.get_state().get("waiting"), TIMEOUT, "the task's state")
    assert task.is_running() is True
    assert task.is_completed() is False
    assert task.get_return_value() is None
    assert task.get_error() is None
    assert task.get_termination_status() is None
    gate.set()
    wait_until(lambda: finished(task), TIMEOUT, "the task to end")
    assert task.get_return_value() == "opened"


def test_a_failing_task_raises_its_error_from_every_outcome_method(connect, provider):
    task = connect().call(LAUNCH, "fail")
    wait_until(lambda: finished(task), TIMEOUT, "the task to fail")
    assert task.get_termination_status() == "failed"
    for method in (task.is_completed, task.get_return_value, task.get_error):
        with pytest.raises(ValueError, match="the task failed"):
            method()
    assert task.get_state() == {"before": "the error"}


def test_kill_ends_a_busy_task_within_a_second_and_the_provider_keeps_serving(connect, provider):
    launcher = connect()
    task = launcher.call(LAUNCH, "spin")
    wait_until(lambda: task.get_state().get("i", 0) > 1000, TIMEOUT, "the task to spin")
    started = time.monotonic()
    task.kill()
    assert task.get_termination_status() == "killed"

    def stopped() -> bool:  # the task's thread on the provider's side is gone
        return not any(t.name.startswith("anvil_nb-task-") for t in threading.enumerate())

    wait_until(stopped, 1.0, "the task's thread to end within 1 s of kill()")
    assert time.monotonic() - started < 1.0
    for method in (task.is_completed, task.get_return_value, task.get_error):
        with pytest.raises(BackgroundTaskKilled):
            method()
    assert launcher.call("echo", "still serving") == "still serving"
    task.kill()  # a second kill changes nothing
    assert task.get_termination_status() == "killed"


def test_untrusted_callers_cannot_launch_list_get_or_kill(connect, provider, gate):
    browser = connect("browser")
    for command, args in ((LAUNCH, ("count_to", 1)), ("anvil.private.background_tasks.list", ()),
                          ("anvil.private.background_tasks.get_by_id", ("t1",))):  # fmt: skip
        with pytest.raises(BackgroundTaskError):
            browser.call(command, *args)
    # ... but a task object handed to them can be watched, not killed
    task = connect().call(LAUNCH, "wait_for_gate")
    theirs = browser.call("hand_out", task)
    wait_until(lambda: theirs.get_state().get("waiting"), TIMEOUT, "the state, seen by the browser")
    with pytest.raises(BackgroundTaskError):
        theirs.kill()
    for forged in ({**theirs._spec, "mac": "é" * 64}, {**theirs._spec, "id": '"t-other"'}):
        with pytest.raises(PermissionDenied, match="not a background task"):
            browser._live_call(forged, "get_state")
    gate.set()
    wait_until(lambda: finished(theirs), TIMEOUT, "the task to end")
    assert theirs.get_return_value() == "opened"


def test_records_outlive_the_launcher_and_can_be_listed_and_found(connect, provider):
    launcher = connect()
    task = launcher.call(LAUNCH, "count_to", 3)
    task_id = task.get_id()
    launcher.close()
    other = connect()
    found = other.call("anvil.private.background_tasks.get_by_id", task_id)
    wait_until(lambda: finished(found), TIMEOUT, "the task to end")
    assert found.get_return_value()["n"] == 3
    listed = other.call("anvil.private.background_tasks.list")
    assert task_id in [t.get_id() for t in listed]
    with pytest.raises(BackgroundTaskNotFound):
        other.call("anvil.private.background_tasks.get_by_id", "t-no-such-task")


def test_a_task_whose_provider_is_lost_is_missing(connect, provider, gate):
    task = connect().call(LAUNCH, "wait_for_gate")
    wait_until(lambda: task.get_state().get("waiting"), TIMEOUT, "the task to start")
    provider.close()
    wait_until(lambda: task.get_termination_status() == "missing", TIMEOUT, "missing")
    with pytest.raises(BackgroundTaskError, match="missing"):
        task.get_return_value()
    gate.set()


def test_an_unknown_task_name_and_an_oversized_return_value(connect, provider):
    launcher = connect()
    with pytest.raises(NoServerFunctionError, match="nothing_like_it"):
        launcher.call(LAUNCH, "nothing_like_it")
    task = launcher.call(LAUNCH, "huge")
    wait_until(lambda: finished(task), TIMEOUT, "the task to end")
    with pytest.raises(Exception, match="over the 1,048,576 a task record keeps"):
        task.get_return_value()


def test_capabilities_go_into_a_task_and_come_back_signed_for_the_reader(connect, provider):
    launcher = connect()
    cap = server.Capability(["doc", 7])
    task = launcher.call(LAUNCH, "takes", cap)
    wait_until(lambda: finished(task), TIMEOUT, "the task to end")
    assert task.get_return_value() == ["doc", 7]
    minted = launcher.call(LAUNCH, "mint", "doc")
    wait_until(lambda: finished(minted), TIMEOUT, "the task to end")
    back = minted.get_return_value()  # made in a session that has ended ...
    assert back.is_valid  # ... handed over signed for the reader's own session
    assert launcher.call("unwrap", back.narrow([8])) == ["doc", 8]


def test_task_state_and_task_killed_outside_a_task():
    with pytest.raises(RuntimeError, match="only available inside a background task"):
        server.task_state["x"] = 1
    assert server.task_killed() is False
    assert "outside" in repr(server.task_state)


def test_records_survive_a_host_restart(tmp_path: Path, gate: threading.Event):
    data = tmp_path / "data"
    first = HostThread(lambda: Host(data_dir=data))
    try:
        provider = Client(first.connect("uplink"), functions=tasks_registry(gate)).start()
        launcher = Client(first.connect("server_module"), functions=FunctionRegistry()).start()
        done = launcher.call(LAUNCH, "count_to", 2)
        wait_until(lambda: finished(done), TIMEOUT, "the task to end")
        running = launcher.call(LAUNCH, "wait_for_gate")
        wait_until(lambda: running.get_state().get("waiting"), TIMEOUT, "the task to start")
        ids = done.get_id(), running.get_id()
        launcher.close()
        provider.close()
    finally:
        first.stop()
        gate.set()
    second = HostThread(lambda: Host(data_dir=data))
    try:
        client = Client(second.connect("server_module"), functions=FunctionRegistry()).start()
        again = client.call("anvil.private.background_tasks.get_by_id", ids[0])
        assert again.get_return_value()["n"] == 2
        lost = client.call("anvil.private.background_tasks.get_by_id", ids[1])
        assert lost.get_termination_status() == "missing"
        client.close()
    finally:
        second.stop()


def test_the_server_face_launches_lists_and_finds(gate: threading.Event):
    registry = tasks_registry(gate)
    ht = HostThread(Host)
    try:
        provider = Client(ht.connect("uplink"), functions=registry).start()
        launcher = Client(ht.connect("server_module"), functions=FunctionRegistry()).start()
        from anvil_nb import runtime  # noqa: PLC0415

        runtime.set_client(launcher)
        try:
            task = server.launch_background_task("count_to", 4)
            wait_until(lambda: finished(task), TIMEOUT, "the task to end")
            assert server.get_background_task(task.get_id()).get_return_value()["n"] == 4
            assert [t.get_id() for t in server.list_background_tasks()] == [task.get_id()]
        finally:
            runtime.disconnect()
        provider.close()
    finally:
        ht.stop()


# ---------------------------------------------------------------------------------------------
# The record stores


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    from anvil_nb.host.tasks import MemoryTaskStore, SQLiteTaskStore  # noqa: PLC0415

    made = (
        MemoryTaskStore()
        if request.param == "memory"
        else SQLiteTaskStore(tmp_path / "app.sqlite3")
    )
    yield made
    made.close()


def test_a_store_keeps_lists_marks_and_prunes_records(store: Any):
    from anvil_nb.host.tasks import TaskRecord  # noqa: PLC0415

    for i in range(5):
        store.put(TaskRecord(id=f"t{i}", app="a", name=f"n{i}", started=100.0 + i))
    store.put(TaskRecord(id="other", app="b", name="x", started=1.0))
    assert [r.id for r in store.list("a")] == ["t4", "t3", "t2", "t1", "t0"]  # newest first
    done = store.get("a", "t1")
    done.status, done.ended, done.result = "completed", 200.0, {"response": 1, "objects": []}
    store.put(done)
    assert store.get("a", "t1").result == {"response": 1, "objects": []}
    assert store.get("b", "t1") is None
    assert store.mark_missing(300.0) == 5  # t0, t2, t3, t4 and b's
    assert store.get("a", "t0").status == "missing"
    assert store.get("a", "t1").status == "completed"  # finished records are left as they were
    # prune: finished records that ended before the cutoff, and beyond the newest `keep`
    assert store.prune("a", before=250.0, keep=10) == 1  # t1 ended at 200
    assert store.prune("a", before=0.0, keep=2) == 2
    assert len(store.list("a")) == 2
    assert len(store.list("b")) == 1


def test_kept_values_are_bounded():
    from anvil_nb.host.tasks import kept  # noqa: PLC0415

    assert kept({"a": 1}, "state") == {"a": 1}
    big = kept("x" * (MAX_KEPT_BYTES + 1), "return value")
    assert big["type"] == "anvil.server.SerializationError"
    assert "return value" in big["message"]
    assert kept(object(), "state")["type"] == "anvil.server.SerializationError"


def test_housekeeping_prunes_finished_records():
    from anvil_nb.host.tasks import KEEP_COUNT, KEEP_SECONDS, TaskRecord  # noqa: PLC0415

    host = Host()
    try:
        app = host.app()
        now = time.time()
        for i in range(KEEP_COUNT + 5):
            app.tasks.put(
                TaskRecord(
                    id=f"t{i}",
                    app=app.name,
                    name="n",
                    started=now - 10 + i * 1e-6,
                    status="completed",
                    ended=now - 5,
                )
            )
        app.tasks.put(
            TaskRecord(
                id="old",
                app=app.name,
                name="n",
                started=0,
                status="failed",
                ended=now - KEEP_SECONDS - 1,
            )
        )
        app.tasks.put(TaskRecord(id="running", app=app.name, name="n", started=0))
        host.housekeeping()
        kept_ids = {r.id for r in app.tasks.list(app.name)}
        assert "old" not in kept_ids and "running" in kept_ids
        assert len(kept_ids) == KEEP_COUNT + 1  # the newest finished ones, and the running one
    finally:
        host.close()


def test_the_admin_view_of_tasks_lists_reads_state_and_kills(host_thread, connect, provider):
    launcher = connect()
    done = launcher.call(LAUNCH, "count_to", 2)
    wait_until(lambda: finished(done), TIMEOUT, "the task to end")
    spinning = launcher.call(LAUNCH, "spin")
    wait_until(lambda: spinning.get_state().get("i"), TIMEOUT, "the task to spin")
    host = host_thread.host
    listed = host_thread.run(host.tasks, "default")
    assert [(t["name"], t["status"]) for t in listed] == [
        ("spin", "running"),
        ("count_to", "completed"),
    ]
    assert listed[1]["state"] == {"progress": 1.0}
    live = asyncio.run_coroutine_threadsafe(
        host.task_state("default", listed[0]["id"]), host_thread.loop
    )
    assert live.result(TIMEOUT)["i"] > 0
    assert host_thread.run(host.kill_task, "default", listed[0]["id"]) is True
    assert spinning.get_termination_status() == "killed"
    assert host_thread.run(host.kill_task, "default", listed[0]["id"]) is False  # not running


def test_admin_tasks_over_http_need_the_server_key(gate: threading.Event):
    from support.nethost import KEYS, NetHost  # noqa: PLC0415

    net = NetHost()
    try:
        net.client(registry=tasks_registry(gate))
        launcher = net.client()
        task = launcher.call(LAUNCH, "wait_for_gate")
        wait_until(lambda: task.get_state().get("waiting"), TIMEOUT, "the task to start")
        base = f"http://127.0.0.1:{net.port}/_/admin/tasks"
        key = {"Authorization": f"Bearer {KEYS.server_key}"}
        assert requests.get(base, timeout=TIMEOUT).status_code == 403
        listed = requests.get(base, headers=key, timeout=TIMEOUT).json()
        assert [(t["name"], t["status"], t["state"]) for t in listed] == [
            ("wait_for_gate", "running", {"waiting": True})
        ]
        assert requests.get(base + "?app=nowhere", headers=key, timeout=TIMEOUT).status_code == 404
        bad = requests.post(base + "/kill", data=b"{", headers=key, timeout=TIMEOUT)
        assert bad.status_code == 400
        assert (
            requests.post(
                base, json={"id": task.get_id()}, headers=key, timeout=TIMEOUT
            ).status_code
            == 405
        )
        killed = requests.post(
            base + "/kill", json={"id": task.get_id()}, headers=key, timeout=TIMEOUT
        )
        assert killed.json() == {"killed": task.get_id()}
        assert task.get_termination_status() == "killed"
        again = requests.post(
            base + "/kill", json={"id": task.get_id()}, headers=key, timeout=TIMEOUT
        )
        assert again.status_code == 404
    finally:
        gate.set()
        net.stop()


def test_a_killed_task_s_finally_runs_and_an_async_task_only_reads_killed(connect):
    cleaned = threading.Event()
    release, ended = threading.Event(), threading.Event()
    registry = FunctionRegistry()

    def tidy() -> None:
        try:
            while True:
                server.task_state["alive"] = True
        finally:
            cleaned.set()  # the kill raised in the task's thread, so this ran

    async def waits() -> str:  # async: not stopped by kill (docs/tasks.md), only recorded
        import asyncio as aio  # noqa: PLC0415

        while not release.is_set():
            await aio.sleep(0.01)
        ended.set()
        return "done"

    registry.register("task:tidy", tidy)
    registry.register("task:waits", waits)
    connect("uplink", registry)
    launcher = connect()
    task = launcher.call(LAUNCH, "tidy")
    wait_until(lambda: task.get_state().get("alive"), TIMEOUT, "the task to run")
    task.kill()
    assert cleaned.wait(TIMEOUT)
    slow = launcher.call(LAUNCH, "waits")
    try:
        slow.kill()
        assert slow.get_termination_status() == "killed"
    finally:
        release.set()
    assert ended.wait(TIMEOUT)  # it ran on to its end (and its late answer was dropped)


def test_a_hostile_provider_cannot_slip_objects_into_a_task_s_state(gate: threading.Event):
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from support.nethost import KEYS, NetHost  # noqa: PLC0415
    from support.ws import RawWS  # noqa: PLC0415

    net = NetHost()
    raw = None
    try:
        raw = RawWS(net.url)
        assert raw.hello(KEYS.server_key).get("auth") == "OK"
        raw.send({"type": "REGISTER", "name": "task:evil"})
        launcher = net.client()
        assert launcher.call("anvil.private.echo", 1) == 1  # the REGISTER has landed
        task = launcher.call(LAUNCH, "evil")
        launch = raw.recv()
        assert launch["type"] == "LAUNCH_BACKGROUND"
        answers = [
            # a capability the host never issued
            [
                {
                    "type": ["Capability"],
                    "path": ["response", "x"],
                    "scope": ["doc"],
                    "mac": "forged",
                }
            ],
            # an entry outside the response
            [
                {
                    "type": ["DateTime"],
                    "path": ["sessionData"],
                    "value": "2020-01-01 00:00:00.000000+0000",
                }
            ],
        ]
        with ThreadPoolExecutor(1) as pool:
            for objects in answers:
                asked = pool.submit(task.get_state)
                query = raw.recv()
                assert query["type"] == "GET_TASK_STATE" and query["task"] == launch["id"]
                raw.send({"id": query["id"], "response": {"x": 1}, "objects": objects})
                with pytest.raises((PermissionDenied, SerializationError)):
                    asked.result(TIMEOUT)
        raw.send({"id": "bgquery-not-asked", "response": {}, "objects": []})  # dropped
        with pytest.raises(PermissionDenied):  # a live-object call that is not one
            launcher._live_call({"backend": ["x"], "id": None}, "get_state")
        assert task.get_termination_status() is None  # still running: nothing broke
        assert launcher.call("anvil.private.echo", 2) == 2
    finally:
        if raw is not None:
            raw.close()
        net.stop()
