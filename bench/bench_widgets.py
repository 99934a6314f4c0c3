"""How much the live widgets absorb: events per second into a full dashboard, renders, memory.

Run: ``.venv/bin/python bench/bench_widgets.py``. A dashboard (all four views, 100 ms render
interval) is fed 100,000 call events (50,000 calls, started and finished) as fast as one thread
can emit them; the script reports the events/s absorbed, how many renders happened, and the
memory the feed and views hold afterwards (tracemalloc), which the ring buffers bound.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

from anvil_nb.core.events import CallFinished, CallStarted, EventBus, SessionChanged
from anvil_nb.widgets import Feed, dashboard


def run(n_events: int, trace_memory: bool) -> None:
    if trace_memory:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if trace_memory else 0
    bus = EventBus()
    feed = Feed(bus=bus)
    board = dashboard(feed)
    views = board.children
    client = {"type": "client_uplink", "ip": "127.0.0.1"}
    t0 = time.perf_counter()
    for i in range(n_events // 2):
        call_id = f"c{i}"
        bus.emit(
            CallStarted(
                time.time(),
                call_id,
                "greet",
                client,
                ("client_uplink",),
                False,
                "s1",
                args=("ann", i),
            )
        )
        bus.emit(CallFinished(time.time(), call_id, "greet", 0.001, True, result=f"hi {i}"))
        if i % 100 == 0:
            bus.emit(SessionChanged(time.time(), f"s{i % 1000}", "saved", {"n": i}))
    elapsed = time.perf_counter() - t0
    # Let pending renders finish (the throttle fires at most once per interval).
    deadline = time.monotonic() + 2
    while any(v.throttle._pending for v in views) and time.monotonic() < deadline:
        time.sleep(0.02)
    renders = sum(v.throttle.renders for v in views)
    if not trace_memory:
        print(
            f"{n_events:,} events in {elapsed:.2f} s: {n_events / elapsed:,.0f} events/s absorbed"
        )
        print(f"renders: {renders} ({renders / elapsed:.1f}/s across 4 views; at most 10/s each)")
        print(f"calls kept: {len(feed.calls.rows())} of {feed.calls.total} (ring buffer)")
        return
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    print(f"memory held by the feed and views after {n_events:,} events: {held / 1e6:.1f} MB")


def main(n_events: int = 100_000) -> None:
    run(n_events, trace_memory=False)  # speed, untraced
    run(n_events, trace_memory=True)  # memory (tracemalloc slows Python several times over)


if __name__ == "__main__":
    main()
