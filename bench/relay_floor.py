"""The floor for ``bench/bench_relay.py``: a bare two-hop WebSocket relay on tornado.

Nothing here belongs to anvil_nb; it is the least a WebSocket relay between a caller and a
provider can do, so that anvil_nb's network path can be measured against it on the same
machine:

* the **relay** (:func:`make_relay_app`): a tornado server with a caller route (``/caller``)
  and a provider route (``/provider``). It parses each caller frame just enough (orjson) to
  note which connection its ``id`` came from, forwards the frame as it is to the provider, and
  forwards the provider's reply, as it is, to the caller connection that sent that ``id``;
* the **provider** (:func:`run_provider`): one connection to ``/provider`` that answers each
  request ``{"id": ..., "args": [x], ...}`` with ``{"id": ..., "response": x}`` on its I/O loop;
* a **caller** (:class:`FloorCaller`): one connection to ``/caller`` with the same threading
  model as anvil_nb's ``Client`` over ``WebSocketTransport``: an I/O thread of its own running
  tornado, and a blocking :meth:`FloorCaller.call` from any thread that queues the frame to the
  I/O loop and waits on a future.

Every WebSocket has TCP_NODELAY set, as anvil_nb's have. Request ids must be unique across
callers (:class:`FloorCaller` prefixes them with its name): the relay does not rewrite them.

As subprocesses::

    python bench/relay_floor.py serve --port 0          # prints "relay ready at ws://127.0.0.1:PORT"
    python bench/relay_floor.py provider --url ws://127.0.0.1:PORT/provider

Both print one line on stdout when ready and exit with status 0 on SIGTERM, on SIGINT, or when
their stdin reaches end of file (so they never outlive a parent that gave them a pipe).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import signal
import sys
import threading
from typing import Any

import orjson
import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket

__all__ = ["FloorCaller", "make_relay_app", "run_provider", "run_relay"]


# ---------------------------------------------------------------------------------------------
# The relay


class _Relay:
    def __init__(self) -> None:
        self.provider: ProviderHandler | None = None
        self.pending: dict[Any, CallerHandler] = {}


class CallerHandler(tornado.websocket.WebSocketHandler):
    """``/caller``: forwards each request to the provider, remembering where it came from."""

    def initialize(self, relay: _Relay) -> None:
        self.relay = relay

    def open(self) -> None:
        self.set_nodelay(True)

    def check_origin(self, origin: str) -> bool:  # noqa: ARG002
        return True

    def on_message(self, message: str | bytes) -> None:
        rid = orjson.loads(message)["id"]
        provider = self.relay.provider
        if provider is None:
            self.write_message(orjson.dumps({"id": rid, "error": "no provider"}))
            return
        self.relay.pending[rid] = self
        provider.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        pending = self.relay.pending
        for rid in [rid for rid, h in pending.items() if h is self]:
            del pending[rid]


class ProviderHandler(tornado.websocket.WebSocketHandler):
    """``/provider``: forwards each reply to the caller connection that sent its id."""

    def initialize(self, relay: _Relay) -> None:
        self.relay = relay

    def open(self) -> None:
        self.set_nodelay(True)
        self.relay.provider = self

    def check_origin(self, origin: str) -> bool:  # noqa: ARG002
        return True

    def on_message(self, message: str | bytes) -> None:
        caller = self.relay.pending.pop(orjson.loads(message)["id"], None)
        if caller is not None:
            with contextlib.suppress(tornado.websocket.WebSocketClosedError):
                caller.write_message(message, binary=isinstance(message, bytes))

    def on_close(self) -> None:
        if self.relay.provider is self:
            self.relay.provider = None


def make_relay_app() -> tornado.web.Application:
    """The relay's tornado application (``/caller`` and ``/provider``)."""
    relay = _Relay()
    return tornado.web.Application(
        [
            ("/caller", CallerHandler, {"relay": relay}),
            ("/provider", ProviderHandler, {"relay": relay}),
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
# The provider


async def run_provider(url: str, stop: asyncio.Event) -> None:
    """Answer every request on *url* with its first argument, until *stop* is set."""
    ws = await tornado.websocket.websocket_connect(url)
    ws.protocol.set_nodelay(True)  # type: ignore[union-attr]
    print("provider ready", flush=True)

    async def answer() -> None:
        while True:
            frame = await ws.read_message()
            if frame is None:
                return
            msg = orjson.loads(frame)
            ws.write_message(orjson.dumps({"id": msg["id"], "response": msg["args"][0]}))

    reader = asyncio.ensure_future(answer())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([reader, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in (reader, stopped):
        task.cancel()
    ws.close()


# ---------------------------------------------------------------------------------------------
# A caller


class FloorCaller:
    """One caller connection to the relay's ``/caller`` URL, with an I/O thread of its own.

    Parameters
    ----------
    url : str
        e.g. ``ws://127.0.0.1:PORT/caller``.
    name : str
        Prefix of this caller's request ids (unique among the relay's callers).
    timeout : float
        Seconds a call may take before it raises ``TimeoutError``.
    """

    def __init__(self, url: str, name: str, timeout: float = 30.0):
        self.timeout = timeout
        self._prefix = name
        self._ids = itertools.count(1)
        self._pending: dict[str, concurrent.futures.Future[Any]] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"floor-{name}", daemon=True)
        self._thread.start()
        try:
            self._ws = asyncio.run_coroutine_threadsafe(self._connect(url), self._loop).result(20)
        except BaseException:
            self._stop_loop()
            raise
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), self._loop)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    @staticmethod
    async def _connect(url: str) -> tornado.websocket.WebSocketClientConnection:
        ws = await tornado.websocket.websocket_connect(url)
        ws.protocol.set_nodelay(True)  # type: ignore[union-attr]
        return ws

    async def _read(self) -> None:
        while True:
            frame = await self._ws.read_message()
            if frame is None:
                break
            msg = orjson.loads(frame)
            future = self._pending.pop(msg["id"], None)
            if future is not None:
                future.set_result(msg)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(ConnectionError("relay connection closed"))

    def call(self, arg: Any) -> Any:
        """Send ``{"id", "command": "echo", "args": [arg]}`` and return the provider's response."""
        rid = f"{self._prefix}-{next(self._ids)}"
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._pending[rid] = future
        data = orjson.dumps({"type": "CALL", "id": rid, "command": "echo", "args": [arg]})
        self._loop.call_soon_threadsafe(self._ws.write_message, data)
        msg = future.result(self.timeout)
        if "error" in msg:
            raise RuntimeError(msg["error"])
        return msg["response"]

    def close(self) -> None:
        """Close the connection and stop the I/O thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._ws.close)
            with contextlib.suppress(concurrent.futures.TimeoutError, ConnectionError):
                self._reader.result(5)
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


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
        await run_provider(args.url, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A bare tornado two-hop WebSocket relay.")
    roles = parser.add_subparsers(dest="role", required=True)
    serve = roles.add_parser("serve", help="run the relay on 127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    provider = roles.add_parser("provider", help="answer requests on the relay's /provider")
    provider.add_argument("--url", required=True, help="ws://127.0.0.1:PORT/provider")
    asyncio.run(_main(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
