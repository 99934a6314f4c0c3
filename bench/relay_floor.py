"""The floor for ``bench/bench_relay.py``: a bare two-hop WebSocket relay.

Nothing here belongs to anvil_nb. It is the least a relay of the uplink protocol's shape can
do between callers and a worker, so that anvil_nb's network path can be measured against it on
the same machine with the same callers (``bench/relay_peers.py callers``):

* the **relay** (:func:`make_relay_app`): a tornado server with a caller route (``/caller``)
  and a worker route (``/worker``). A caller's first frame is its hello (``{"key", "v"}``),
  which the relay answers itself with an ``auth`` message of the host's shape. After that the
  relay parses each caller frame just enough (orjson) to note which connection its ``id`` came
  from, forwards the frame as it is to the worker, and forwards the worker's reply, as it is,
  to the caller connection that sent that ``id``;
* the **worker** (:func:`run_worker`): one ``websockets`` connection to ``/worker`` that
  answers each CALL ``{"id", "args": [a, b], ...}`` with ``{"id", "response": a + b,
  "objects": []}`` (the frame anvil_nb's host sends back, byte for byte) on its event loop.

Frames are JSON text frames both ways, and every socket has TCP_NODELAY set. Request ids must be
unique across callers (the callers prefix them with their connection's number): the relay does
not rewrite them.

As subprocesses::

    python bench/relay_floor.py serve --port 0    # prints "relay ready at ws://127.0.0.1:PORT"
    python bench/relay_floor.py worker --url ws://127.0.0.1:PORT/worker

Both print one line on stdout when ready and exit with status 0 on SIGTERM, on SIGINT, or when
their stdin reaches end of file (so they never outlive a parent that gave them a pipe).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import threading
from typing import Any

import orjson
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

__all__ = ["make_relay_app", "run_relay", "run_worker"]

#: What the relay answers a caller's hello with: the shape of anvil_nb's (and Anvil's) ``auth``.
AUTH = orjson.dumps(
    {
        "auth": "OK",
        "priv": "client",
        "app-info": {
            "id": "floor",
            "branch": "master",
            "environment": {"description": "Notebook", "tags": []},
        },
    }
).decode()


# ---------------------------------------------------------------------------------------------
# The relay


class _Relay:
    def __init__(self) -> None:
        self.worker: WorkerHandler | None = None
        self.pending: dict[Any, CallerHandler] = {}


class CallerHandler(tornado.websocket.WebSocketHandler):
    """``/caller``: answers the hello, then forwards each request to the worker, remembering
    which connection it came from.
    """

    def initialize(self, relay: _Relay) -> None:
        self.relay = relay
        self.greeted = False

    def open(self) -> None:
        self.set_nodelay(True)

    def check_origin(self, origin: str) -> bool:  # noqa: ARG002
        return True

    def on_message(self, message: str | bytes) -> None:
        msg = orjson.loads(message)
        if not self.greeted:  # the hello: {"key": ..., "v": ...}
            self.greeted = True
            self.write_message(AUTH)
            return
        rid = msg["id"]
        worker = self.relay.worker
        if worker is None:
            self.write_message(orjson.dumps({"id": rid, "error": {"message": "no worker"}}))
            return
        self.relay.pending[rid] = self
        worker.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        pending = self.relay.pending
        for rid in [rid for rid, h in pending.items() if h is self]:
            del pending[rid]


class WorkerHandler(tornado.websocket.WebSocketHandler):
    """``/worker``: forwards each reply to the caller connection that sent its id."""

    def initialize(self, relay: _Relay) -> None:
        self.relay = relay

    def open(self) -> None:
        self.set_nodelay(True)
        self.relay.worker = self

    def check_origin(self, origin: str) -> bool:  # noqa: ARG002
        return True

    def on_message(self, message: str | bytes) -> None:
        caller = self.relay.pending.pop(orjson.loads(message)["id"], None)
        if caller is not None:
            with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                caller.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        if self.relay.worker is self:
            self.relay.worker = None


def make_relay_app() -> tornado.web.Application:
    """The relay's tornado application (``/caller`` and ``/worker``)."""
    relay = _Relay()
    return tornado.web.Application(
        [
            ("/caller", CallerHandler, {"relay": relay}),
            ("/worker", WorkerHandler, {"relay": relay}),
        ]
    )


async def run_relay(port: int, stop: asyncio.Event, host: str = "127.0.0.1") -> None:
    """Serve the relay on *host*:*port* (0: a free port) until *stop* is set."""
    sockets = tornado.netutil.bind_sockets(port, host)
    server = tornado.httpserver.HTTPServer(make_relay_app())
    server.add_sockets(sockets)
    print(f"relay ready at ws://{host}:{sockets[0].getsockname()[1]}", flush=True)
    await stop.wait()
    server.stop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), timeout=3)


# ---------------------------------------------------------------------------------------------
# The worker


def set_nodelay(ws: Any) -> None:
    """TCP_NODELAY on a ``websockets`` connection's socket."""
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def run_worker(url: str, stop: asyncio.Event) -> None:
    """Answer every CALL on *url* with the sum of its two arguments, until *stop* is set."""
    from websockets.asyncio.client import connect  # noqa: PLC0415 - only the worker needs it
    from websockets.exceptions import ConnectionClosed  # noqa: PLC0415

    ws = await connect(url, compression=None, ping_interval=None, max_size=None)
    set_nodelay(ws)
    print("worker ready", flush=True)

    async def answer() -> None:
        loads, dumps, recv, send = orjson.loads, orjson.dumps, ws.recv, ws.send
        with contextlib.suppress(ConnectionClosed):
            while True:
                msg = loads(await recv(decode=False))  # a text frame, as bytes: no str made
                a, b = msg["args"]
                await send(dumps({"id": msg["id"], "response": a + b, "objects": []}), text=True)

    reader = asyncio.ensure_future(answer())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([reader, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in (reader, stopped):
        task.cancel()
    await ws.close()


# ---------------------------------------------------------------------------------------------
# Command line


def _stop_on_signal_or_eof(stop: asyncio.Event) -> None:
    """Set *stop* on SIGTERM, SIGINT or end of file on stdin."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):  # unbuffered: no lock held at exit
                pass
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    _stop_on_signal_or_eof(stop)
    if args.role == "serve":
        await run_relay(args.port, stop)
    else:
        await run_worker(args.url, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A bare tornado two-hop WebSocket relay.")
    roles = parser.add_subparsers(dest="role", required=True)
    serve = roles.add_parser("serve", help="run the relay on 127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    worker = roles.add_parser("worker", help="answer CALLs on the relay's /worker (websockets)")
    worker.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/worker")
    asyncio.run(_main(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
