"""Benchmark of the in-process hot path: serialise, route through the host, deserialise.

Run: ``.venv/bin/python bench/bench_inprocess.py``. Prints per-message serialisation cost and
the latency (p50/p99) and throughput of ``call`` between two clients of one embedded host, with
1 and 16 concurrent callers. The network benchmark (ratios against a bare tornado relay) is
``bench/bench_relay.py``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import threading
import time

import orjson

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.core.portable import portable_class
from anvil_nb.core.serialise import deserialise, serialise
from anvil_nb.host.inprocess import HostThread


@portable_class("bench.Point")
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


MESSAGE = {
    "args": [
        {"name": "Ann", "tags": ["a", "b", "c"], "score": 1.5, "when": dt.date(2024, 1, 2)},
        Point(1, 2),
    ],
    "kwargs": {"limit": 10, "big": 2**40},
}


def bench_serialise(n: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    for _ in range(n):
        data = orjson.dumps(serialise(MESSAGE).message)
    t1 = time.perf_counter()
    for _ in range(n):
        deserialise(orjson.loads(data))
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6


def bench_calls(ht: HostThread, concurrency: int, seconds: float) -> tuple[float, float, float]:
    registry = FunctionRegistry()
    registry.register("echo", lambda x: x)
    provider = Client(ht.connect(), functions=registry).start()
    callers = [
        Client(ht.connect("client_uplink"), functions=FunctionRegistry()).start()
        for _ in range(concurrency)
    ]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop = time.perf_counter() + seconds

    def run(i: int) -> None:
        c, out = callers[i], latencies[i]
        while time.perf_counter() < stop:
            t = time.perf_counter()
            c.call("echo", "hello")
            out.append(time.perf_counter() - t)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    for c in [*callers, provider]:
        c.close()
    flat = sorted(x for xs in latencies for x in xs)
    p50 = statistics.median(flat) * 1e6
    p99 = flat[int(len(flat) * 0.99)] * 1e6
    return p50, p99, len(flat) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each call run")
    args = parser.parse_args()
    enc, dec = bench_serialise(20000)
    print(f"serialise+encode {enc:.1f} us/msg   decode+deserialise {dec:.1f} us/msg")
    ht = HostThread()
    try:
        for conc in (1, 16):
            p50, p99, rate = bench_calls(ht, conc, args.seconds)
            print(
                f"in-process call, {conc:2d} callers: p50 {p50:7.1f} us  p99 {p99:7.1f} us  {rate:8.0f} calls/s"
            )
    finally:
        ht.stop()


if __name__ == "__main__":
    main()
