"""The load client, the floor server and the anvil_nb provider of ``bench/bench_http.py``, each
run as a subprocess.

Roles::

    python bench/http_peers.py client --url http://127.0.0.1:P/_/api/add/2/3 -n 16
    python bench/http_peers.py floor --port 0      # prints "floor ready at http://127.0.0.1:P"
    python bench/http_peers.py provider --url ws://127.0.0.1:P/_/uplink --key SERVER_KEY

**Client**: one asyncio event loop, *n* keep-alive HTTP/1.1 connections (``asyncio.Protocol``,
TCP_NODELAY), each sending ``GET <path> HTTP/1.1`` (``Host`` the only header) back to back: the
next request is written from ``data_received`` as soon as the previous response is complete.
Responses are parsed by hand: status line, headers, then a ``Content-Length`` body or a
``Transfer-Encoding: chunked`` one. The first response of every connection is checked strictly
(status 200 and a JSON body equal to ``--expect``, ``{"sum": 5}``); after that a response
counts as an error unless its status is 200 and its body the same bytes as the first one.
Then it prints ``client ready``, reads one job from stdin, ``run START END``
(``time.monotonic()``, the same clock in every process of the machine), sends requests until
END, and prints ``result {json}``: requests that started at or after START and ended by END
(``calls``), their p50 and p99 latency (µs), the errors (and the first one), and the size of one
request and of one response as sent and received (bytes, headers included).

**Floor**: a bare tornado ``RequestHandler`` serving ``GET /add/(.*)/(.*)`` with the JSON
``{"sum": a + b}`` (orjson), one process, tornado's defaults otherwise (TCP_NODELAY as tornado
sets it, an ``Etag``).

**Provider**: a kernel-like anvil_nb provider, as ``relay_peers.py provider --kind kernel``
(everything ``%load_ext anvil_nb`` turns on: ``kernel.join(url, key)`` and
``widgets.shared_feed()``), serving ``@server.http_endpoint("/add/:a/:b")`` that returns
``{"sum": int(a) + int(b)}``. It prints ``provider ready`` once joined (the bench then waits for
a GET through the host to answer 200) and on exit ``feed saw N calls``.

Servers run until SIGTERM, SIGINT or end of file on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from relay_peers import _parse_job, _summary, _until_stopped

# ---------------------------------------------------------------------------------------------
# The client


class HttpError(Exception):
    """A response the client could not parse, or a connection that closed."""


def parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    """Take one complete response off the front of *buf*: its status, body and size on the wire;
    ``None`` (and *buf* untouched) if it is not complete yet.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1."):
        raise HttpError(f"not an HTTP/1.x response: {bytes(buf[:80])!r}")
    status = int(head[9:12])
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        total = end + 4 + int(head[i + 17 : j if j >= 0 else len(head)])
        if len(buf) < total:
            return None
        body = bytes(buf[end + 4 : total])
        del buf[:total]
        return status, body, total
    i = head.find(b"\r\ntransfer-encoding:")
    j = head.find(b"\r\n", i + 2) if i >= 0 else -1
    if i >= 0 and b"chunked" in head[i : j if j >= 0 else len(head)]:
        return _parse_chunked(buf, end + 4, status)
    if status in (204, 304) or 100 <= status < 200:
        del buf[: end + 4]
        return status, b"", end + 4
    raise HttpError("a response with neither Content-Length nor chunked transfer encoding")


def _parse_chunked(buf: bytearray, pos: int, status: int) -> tuple[int, bytes, int] | None:
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        pos = eol + 2
        if size == 0:  # the last chunk, then trailers up to an empty line
            end = buf.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            total = end + 4
            del buf[:total]
            return status, bytes(body), total
        if len(buf) < pos + size + 2:
            return None
        body += buf[pos : pos + size]
        pos += size + 2


class _Run:
    """What the connections share during a run: the window, the latencies, the errors."""

    def __init__(self, start: float, end: float, expected: bytes):
        self.start = start
        self.end = end
        self.expected = expected
        self.latencies: list[float] = []
        self.errors = 0
        self.first_error = ""


class HttpConn(asyncio.Protocol):
    """One keep-alive connection: one request at a time, the next as soon as a response ends."""

    def __init__(self, request: bytes):
        self.request = request
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.t0 = 0.0
        self.run: _Run | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.resp_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"the server closed the connection ({exc})"))

    def send(self) -> None:
        assert self.transport is not None
        self.t0 = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            while True:
                parsed = parse_response(self.buf)
                if parsed is None:
                    return
                self._on_response(*parsed)
        except Exception as exc:  # a response we cannot read: the run (or the check) fails
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)

    def _on_response(self, status: int, body: bytes, size: int) -> None:
        t1 = time.monotonic()
        run, waiter = self.run, self.waiter
        if run is None:  # the strict first request: the caller checks it
            if waiter is not None and not waiter.done():
                waiter.set_result((status, body, size))
            return
        if status != 200 or body != run.expected:
            run.errors += 1
            if not run.first_error:
                run.first_error = f"status {status}, body {body[:200]!r}"
        elif self.t0 >= run.start and t1 <= run.end:
            run.latencies.append(t1 - self.t0)
        if t1 < run.end:
            self.send()
        elif waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def first(self, expect: Any) -> bytes:
        """Send one request and check its answer strictly; the body's bytes."""
        self.waiter = asyncio.get_running_loop().create_future()
        self.send()
        status, body, size = await asyncio.wait_for(self.waiter, 30)
        if status != 200:
            raise HttpError(f"first request: status {status}, body {body[:300]!r}")
        try:
            got = json.loads(body)
        except ValueError:
            raise HttpError(f"first request: not JSON: {body[:300]!r}") from None
        if got != expect:
            raise HttpError(f"first request: {got!r}, expected {expect!r}")
        self.resp_bytes = size
        return body

    async def run_until(self, run: _Run) -> None:
        self.run = run
        self.waiter = asyncio.get_running_loop().create_future()
        self.send()
        await self.waiter


async def http_client(url: str, n: int, expect: Any) -> int:
    """The client (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise SystemExit(f"--url must be http://HOST:PORT/PATH, not {url!r}")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    conns: list[HttpConn] = []
    for _ in range(n):
        _, conn = await loop.create_connection(
            lambda: HttpConn(request), parts.hostname, parts.port
        )
        conns.append(conn)
    bodies = [await c.first(expect) for c in conns]
    print("client ready", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    job, start, end = _parse_job(line)
    if job != "run":
        raise SystemExit("the HTTP client only runs windows")
    run = _Run(start, end, bodies[0])
    outcome = await asyncio.gather(*(c.run_until(run) for c in conns), return_exceptions=True)
    failed = [o for o in outcome if isinstance(o, BaseException)]
    if failed and not run.first_error:
        run.first_error = repr(failed[0])
    print(
        _summary(
            run.latencies,
            len(request),
            conns[0].resp_bytes,
            errors=run.errors + len(failed),
            first_error=run.first_error,
        ),
        flush=True,
    )
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return 0


# ---------------------------------------------------------------------------------------------
# The floor


def floor(port: int) -> int:
    """A bare tornado handler for ``GET /add/(.*)/(.*)`` (see the module docstring)."""
    import orjson  # noqa: PLC0415
    import tornado.httpserver  # noqa: PLC0415
    import tornado.netutil  # noqa: PLC0415
    import tornado.web  # noqa: PLC0415

    class AddHandler(tornado.web.RequestHandler):
        def get(self, a: str, b: str) -> None:
            self.set_header("Content-Type", "application/json")
            self.finish(orjson.dumps({"sum": int(a) + int(b)}))

    async def serve() -> None:
        done = _until_stopped()
        app = tornado.web.Application([(r"/add/(.*)/(.*)", AddHandler)])
        sockets = tornado.netutil.bind_sockets(port, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(app)
        server.add_sockets(sockets)
        print(f"floor ready at http://127.0.0.1:{sockets[0].getsockname()[1]}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, done.wait)
        server.stop()

    asyncio.run(serve())
    return 0


# ---------------------------------------------------------------------------------------------
# The anvil_nb provider


def provider(url: str, key: str) -> int:
    """A kernel-like provider serving ``/add/:a/:b`` (see the module docstring)."""
    from anvil_nb import server  # noqa: PLC0415
    from anvil_nb.jupyter import kernel  # noqa: PLC0415
    from anvil_nb.widgets import shared_feed  # noqa: PLC0415

    done = _until_stopped()
    kernel.join(url, key)
    feed = shared_feed()

    @server.http_endpoint("/add/:a/:b")
    def add(a: str, b: str) -> dict[str, int]:
        return {"sum": int(a) + int(b)}

    print("provider ready", flush=True)
    done.wait(24 * 3600)
    with contextlib.suppress(OSError):  # the parent is gone: nobody reads it
        print(f"feed saw {feed.calls.total} calls", flush=True)
    kernel.leave()
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    client = roles.add_parser("client", help="n keep-alive connections; one job from stdin")
    client.add_argument("--url", required=True)
    client.add_argument("-n", type=int, default=1)
    client.add_argument("--expect", default='{"sum": 5}', help="the JSON body expected")
    fl = roles.add_parser("floor", help="a bare tornado handler until stopped")
    fl.add_argument("--port", type=int, default=0)
    prov = roles.add_parser("provider", help="a kernel-like anvil_nb provider until stopped")
    prov.add_argument("--url", required=True)
    prov.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    if args.role == "floor":
        return floor(args.port)
    if args.role == "provider":
        return provider(args.url, args.key)
    return asyncio.run(http_client(args.url, args.n, json.loads(args.expect)))


if __name__ == "__main__":
    sys.exit(main())
