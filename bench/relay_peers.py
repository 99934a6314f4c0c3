"""The callers and the providers of ``bench/bench_relay.py``, each run as a subprocess.

Roles::

    python bench/relay_peers.py callers --kind ws --url URL --key KEY -n 16
    python bench/relay_peers.py callers --kind anvil_nb --url URL --key KEY -n 16
    python bench/relay_peers.py provider --kind plain --url URL --key SERVER_KEY
    python bench/relay_peers.py provider --kind kernel --url URL --key SERVER_KEY

**Callers** open *n* connections, make one checked call on each, print ``callers ready``, then
read one job from stdin and print its outcome as ``result {json}``, and exit:

* ``run START END``: call back to back until END (``time.monotonic()``, the same clock in every
  process of the machine); calls that start at or after START and end by END count. The result
  holds the latencies' p50 and p99 (µs), the number of calls in the window, and the size of
  one CALL frame and of one response frame as sent and received;
* ``count TOTAL EVERY`` (``--kind ws`` only): make TOTAL calls in all, printing
  ``progress DONE`` after every EVERY (and ``progress 0`` first).

``--kind ws``: one asyncio event loop, *n* ``websockets`` connections, each speaking the uplink
protocol as a client: hello (``anvil_nb.core.protocol.hello``) with the key, wait for ``auth``,
then ``CALL add(2, 3)`` (``protocol.call``: ``{"type": "CALL", "id", "command", "args",
"kwargs", "objects"}``) back to back with an id counter of its own (``c<conn>-<k>``), matching
each response by id; JSON text frames, TCP_NODELAY. The same program drives the floor and
anvil_nb. ``--kind anvil_nb``: *n* threads, each with its own anvil_nb
``Client(WebSocketTransport(url, key))`` calling ``client.call("add", 2, 3)`` back to back.

**Providers** serve ``add(a, b) -> a + b``, print ``provider ready`` once a call of it through
the host succeeds, and run until SIGTERM, SIGINT or end of file on stdin:

* ``plain``: ``Client(WebSocketTransport(url, key), functions=registry).start()``;
* ``kernel``: everything ``%load_ext anvil_nb`` turns on: ``kernel.join(url, key)`` (a
  trusted ``server_module``, output capture, the process's connection, watching the app's
  events), ``widgets.shared_feed()`` (the widget feed), and ``add`` registered in the
  process-wide registry. On exit it prints ``feed saw N calls`` (the feed's call log count),
  which shows the feed was fed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from anvil_nb.core import protocol

ARGS = [2, 3]
EXPECTED = 5


def _summary(latencies: list[float], req: int, resp: int, **extra: Any) -> str:
    flat = sorted(latencies)
    calls = len(flat)
    out: dict[str, Any] = {
        "calls": calls,
        "p50_us": statistics.median(flat) * 1e6 if flat else float("nan"),
        "p99_us": flat[min(calls - 1, int(calls * 0.99))] * 1e6 if flat else float("nan"),
        "req_bytes": req,
        "resp_bytes": resp,
        **extra,
    }
    return "result " + orjson.dumps(out).decode()


def _parse_job(line: str) -> tuple[str, float, float]:
    parts = line.split()
    if len(parts) != 3 or parts[0] not in ("run", "count"):
        raise SystemExit(0 if not parts else f"unknown job: {line!r}")
    return parts[0], float(parts[1]), float(parts[2])


# ---------------------------------------------------------------------------------------------
# websockets callers: one event loop, n connections


class _WsConn:
    """One uplink connection of the ``websockets`` callers."""

    def __init__(self, ws: Any, index: int):
        self.ws = ws
        self.prefix = f"c{index}-"
        self.k = 0
        self.req_bytes = 0
        self.resp_bytes = 0

    async def call(self) -> tuple[float, float]:
        """One ``add(2, 3)``; when it started and ended (``time.monotonic()``)."""
        self.k += 1
        rid = self.prefix + str(self.k)
        frame = orjson.dumps(protocol.call(rid, "add", ARGS, {}, []))
        ws, loads = self.ws, orjson.loads
        t0 = time.monotonic()
        await ws.send(frame, text=True)
        while True:
            data = await ws.recv(decode=False)
            msg = loads(data)
            if msg.get("id") == rid:
                break
        t1 = time.monotonic()
        if msg.get("response") != EXPECTED:
            raise RuntimeError(f"call {rid} failed: {msg!r}")
        if not self.req_bytes:  # the first call's (id "c<conn>-1"): the same in every system
            self.req_bytes, self.resp_bytes = len(frame), len(data)
        return t0, t1


async def _ws_open(url: str, key: str, index: int) -> _WsConn:
    from websockets.asyncio.client import connect  # noqa: PLC0415

    ws = await connect(url, compression=None, ping_interval=None, max_size=None)
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await ws.send(orjson.dumps(protocol.hello(key)), text=True)
    reply = orjson.loads(await ws.recv(decode=False))
    if "auth" not in reply:
        raise RuntimeError(f"connection {index}: no auth: {reply!r}")
    return _WsConn(ws, index)


async def _ws_run(conns: list[_WsConn], start: float, end: float) -> str:
    latencies: list[float] = []

    async def loop(conn: _WsConn) -> None:
        clock, out = time.monotonic, latencies
        while clock() < end:
            t0, t1 = await conn.call()
            if t0 >= start and t1 <= end:
                out.append(t1 - t0)

    await asyncio.gather(*(loop(c) for c in conns))
    return _summary(latencies, conns[0].req_bytes, conns[0].resp_bytes)


async def _ws_count(conns: list[_WsConn], total: int, every: int) -> str:
    issued = done = 0
    print("progress 0", flush=True)

    async def loop(conn: _WsConn) -> None:
        nonlocal issued, done
        while issued < total:
            issued += 1
            await conn.call()  # no latencies kept: this process's memory stays flat too
            done += 1
            if done % every == 0:
                print(f"progress {done}", flush=True)

    await asyncio.gather(*(loop(c) for c in conns))
    return _summary([], conns[0].req_bytes, conns[0].resp_bytes, done=done)


async def ws_callers(url: str, key: str, n: int) -> int:
    """The ``--kind ws`` callers (see the module docstring)."""
    conns = list(await asyncio.gather(*(_ws_open(url, key, i) for i in range(n))))
    for c in conns:
        await c.call()
    print("callers ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    job, a, b = _parse_job(line)
    if job == "run":
        result = await _ws_run(conns, a, b)
    else:
        result = await _ws_count(conns, int(a), int(b))
    print(result, flush=True)
    await asyncio.gather(*(c.ws.close() for c in conns), return_exceptions=True)
    return 0


# ---------------------------------------------------------------------------------------------
# anvil_nb callers: n threads, each with its own Client


def anvil_callers(url: str, key: str, n: int) -> int:
    """The ``--kind anvil_nb`` callers (see the module docstring)."""
    from anvil_nb.client.client import Client, FunctionRegistry  # noqa: PLC0415
    from anvil_nb.client.websocket import WebSocketTransport  # noqa: PLC0415

    clients = []
    try:
        for _ in range(n):
            clients.append(
                Client(WebSocketTransport(url, key), functions=FunctionRegistry()).start()
            )
        for c in clients:
            if c.call("add", *ARGS) != EXPECTED:
                raise RuntimeError("add(2, 3) did not return 5")
        print("callers ready", flush=True)
        job, start, end = _parse_job(sys.stdin.readline())
        if job != "run":
            raise SystemExit("--kind anvil_nb callers only run windows")
        latencies: list[list[float]] = [[] for _ in range(n)]
        errors: list[BaseException] = []

        def loop(call: Callable[..., Any], out: list[float]) -> None:
            clock = time.monotonic
            try:
                while True:
                    t0 = clock()
                    if t0 >= end:
                        return
                    if call("add", *ARGS) != EXPECTED:
                        raise RuntimeError("add(2, 3) did not return 5")
                    t1 = clock()
                    if t0 >= start and t1 <= end:
                        out.append(t1 - t0)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=loop, args=(c.call, latencies[i]), name=f"caller-{i}")
            for i, c in enumerate(clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        flat = [x for xs in latencies for x in xs]
        # The frames are made inside Client: the same fields as --kind ws sends (one more: the
        # id is the client's own), sizes not measured here.
        print(_summary(flat, -1, -1), flush=True)
    finally:
        for c in clients:
            c.close()
    return 0


# ---------------------------------------------------------------------------------------------
# Providers


def _until_stopped() -> threading.Event:
    """An event set on SIGTERM, SIGINT or end of file on stdin."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):  # unbuffered: no lock held at exit
                pass
        done.set()

    threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()
    return done


def _check_served(call: Callable[..., Any], timeout: float = 20.0) -> None:
    """Call ``add`` through the host until it answers (the registration has landed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if call("add", *ARGS) == EXPECTED:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _add(a: Any, b: Any) -> Any:
    return a + b


def provider(kind: str, url: str, key: str) -> int:
    """Serve ``add`` as a plain or a kernel-like provider (see the module docstring)."""
    done = _until_stopped()
    feed = None
    if kind == "plain":
        from anvil_nb.client.client import Client, FunctionRegistry  # noqa: PLC0415
        from anvil_nb.client.websocket import WebSocketTransport  # noqa: PLC0415

        registry = FunctionRegistry()
        registry.register("add", _add)
        client = Client(WebSocketTransport(url, key), functions=registry).start()
        close = client.close
    else:
        from anvil_nb.client.client import functions  # noqa: PLC0415
        from anvil_nb.jupyter import kernel  # noqa: PLC0415
        from anvil_nb.widgets import shared_feed  # noqa: PLC0415

        client = kernel.join(url, key).client
        feed = shared_feed()
        functions.register("add", _add)
        close = kernel.leave
    _check_served(client.call)
    print("provider ready", flush=True)
    done.wait(24 * 3600)
    if feed is not None:
        with contextlib.suppress(OSError):  # the parent is gone: nobody reads it
            print(f"feed saw {feed.calls.total} calls", flush=True)
    close()
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    callers = roles.add_parser("callers", help="n callers; one job from stdin")
    callers.add_argument("--kind", choices=["ws", "anvil_nb"], required=True)
    callers.add_argument("--url", required=True)
    callers.add_argument("--key", required=True)
    callers.add_argument("-n", type=int, default=1)
    prov = roles.add_parser("provider", help="serve add(a, b) until stopped")
    prov.add_argument("--kind", choices=["plain", "kernel"], required=True)
    prov.add_argument("--url", required=True)
    prov.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    if args.role == "provider":
        return provider(args.kind, args.url, args.key)
    if args.kind == "ws":
        return asyncio.run(ws_callers(args.url, args.key, args.n))
    return anvil_callers(args.url, args.key, args.n)


if __name__ == "__main__":
    sys.exit(main())
