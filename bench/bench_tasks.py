"""Benchmark of background tasks: what a launch costs, and how soon kill() stops a task.

Run: ``.venv/bin/python bench/bench_tasks.py`` (``--rounds 3 --seconds 3 --threads 1,8
--kills 20``).

Processes, all on 127.0.0.1: ``python -m anvil_nb serve --port 0`` (a temporary data dir, so
task records go to SQLite as in use), and a provider (``bench/bench_tasks.py provider``: an
anvil_nb script with the server key) serving

* ``task:noop`` (returns at once), ``task:spin`` (a busy Python loop that only a kill ends),
* ``add(a, b)`` (a plain callable, the yardstick), and ``task_threads()`` (how many task
  threads run in it now).

This process launches, with N threads each holding its own anvil_nb ``Client`` (server key):

* **launches/s**: ``launch_background_task("noop")`` back to back for ``--seconds``; a launch
  returns when the host has answered with the task object (the task may still run). Beside it,
  in the same round, **calls/s** of ``add(2, 3)`` from the same threads: the ratio says what a
  launch costs over a plain call (a record written, a session made, the task's own thread on
  the provider, the live object signed);
* **launch to done**: one launch, then ``get_termination_status()`` polled until
  ``"completed"`` (p50 over the launches of one thread);
* **kill latency**: ``--kills`` times, a ``spin`` task is launched and its state awaited, then
  ``kill()`` is called and ``task_threads()`` polled (every 2 ms) until the provider's task
  thread is gone: the time from calling ``kill()`` to that (p50, p99, max).

Medians over ``--rounds`` rounds. Every subprocess is stopped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_relay import CLIENT_KEY, PYTHON, SERVER_KEY, Proc  # noqa: E402

PROVIDER = """provider ready"""


def provider(url: str) -> int:
    """The provider process: serves the tasks and callables until stdin closes."""
    from anvil_nb import server  # noqa: PLC0415

    server.connect(SERVER_KEY, url=url, quiet=True)

    @server.background_task
    def noop() -> int:
        return 1

    @server.background_task
    def spin() -> None:
        i = 0
        while True:
            i += 1
            if i % 10_000 == 0:
                server.task_state["i"] = i

    @server.callable
    def add(a: int, b: int) -> int:
        return a + b

    @server.callable
    def task_threads() -> int:
        return sum(t.name.startswith("anvil_nb-task-") for t in threading.enumerate())

    server.call("add", 1, 1)  # registered (a round trip after the REGISTER frames)
    print(PROVIDER, flush=True)
    sys.stdin.read()  # until the bench closes our stdin
    return 0


def _client(url: str) -> Any:
    from anvil_nb.client.client import Client, FunctionRegistry  # noqa: PLC0415
    from anvil_nb.client.websocket import WebSocketTransport  # noqa: PLC0415

    return Client(WebSocketTransport(url, SERVER_KEY), functions=FunctionRegistry()).start()


def _rate(clients: list[Any], seconds: float, work: Any) -> float:
    """Operations per second of *work(client)* run back to back on each client's thread."""
    counts = [0] * len(clients)
    stop = time.monotonic() + seconds

    def loop(i: int) -> None:
        while time.monotonic() < stop:
            work(clients[i])
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(clients))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started)


def _launch_to_done(client: Any, n: int = 50) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        task = client.call("anvil.private.background_tasks.launch", "noop")
        while task.get_termination_status() != "completed":
            pass
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kill_latency(client: Any, kills: int) -> list[float]:
    out = []
    for _ in range(kills):
        task = client.call("anvil.private.background_tasks.launch", "spin")
        deadline = time.monotonic() + 10
        while not (task.get_state() or {}).get("i"):
            if time.monotonic() > deadline:
                raise RuntimeError("the spin task never reported its state")
        t0 = time.perf_counter()
        task.kill()
        while client.call("task_threads"):
            if time.perf_counter() - t0 > 10:
                raise RuntimeError("a killed task ran on for 10 s")
            time.sleep(0.002)
        out.append(time.perf_counter() - t0)
    return out


def measure(url: str, threads: list[int], seconds: float, kills: int) -> dict[str, Any]:
    """One round: launches/s and calls/s for each thread count, launch to done, kill latency."""
    figures: dict[str, Any] = {}
    for n in threads:
        clients = [_client(url) for _ in range(n)]
        try:
            figures[f"calls/s @{n}"] = _rate(clients, seconds, lambda c: c.call("add", 2, 3))
            figures[f"launches/s @{n}"] = _rate(
                clients, seconds, lambda c: c.call("anvil.private.background_tasks.launch", "noop")
            )
        finally:
            for c in clients:
                c.close()
    one = _client(url)
    try:
        figures["launch to done (ms)"] = _launch_to_done(one) * 1000
        lat = sorted(_kill_latency(one, kills))
        figures["kill p50 (ms)"] = statistics.median(lat) * 1000
        figures["kill p99 (ms)"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        figures["kill max (ms)"] = lat[-1] * 1000
    finally:
        one.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``provider URL``, be the provider)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", nargs="?", default="bench", choices=["bench", "provider"])
    parser.add_argument("url", nargs="?")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--kills", type=int, default=20)
    args = parser.parse_args(argv)
    if args.role == "provider":
        return provider(args.url)
    with tempfile.TemporaryDirectory(prefix="anvil_nb-bench-tasks-") as data:
        host = Proc(
            "host",
            [PYTHON, "-m", "anvil_nb", "serve", "--port", "0", "--data-dir", data,
             "--server-key", SERVER_KEY, "--client-key", CLIENT_KEY],
            "anvil_nb host ready",
        )  # fmt: skip
        prov = None
        try:
            url = host.ready_line.split("(uplink ", 1)[1].rstrip(")")
            prov = Proc("provider", [PYTHON, __file__, "provider", url], PROVIDER)
            rounds = [
                measure(url, [int(n) for n in args.threads.split(",")], args.seconds, args.kills)
                for _ in range(args.rounds)
            ]
        finally:
            if prov is not None:
                prov.stop()
            host.stop(grace=0.0)
    print(f"{'figure':<22} {'median':>10}   rounds")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        print(
            f"{key:<22} {statistics.median(values):>10,.1f}   "
            + ", ".join(f"{v:,.1f}" for v in values)
        )
    for n in args.threads.split(","):
        ratio = statistics.median(r[f"launches/s @{n}"] / r[f"calls/s @{n}"] for r in rounds)
        print(f"launches/calls @{n}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
