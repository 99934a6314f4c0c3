"""What one connection may cost a real ``anvil-nb serve``, in memory, time and log (F5, F8-F10).

* F5: slow consumers (clients that send calls and never read) cost the host at most their
  ``--max-queued-bytes`` each, get ``QuotaExceededError`` for the rest, and a bystander's calls
  keep their latency meanwhile.
* F8: WebSockets that never say hello, idle TCP connections and half-sent HTTP requests are
  closed after ``--handshake-timeout``; with its file descriptors exhausted the host neither
  spins nor floods its log, and serves again once the idle sockets are gone.
* F10: a frozen provider (SIGSTOP: no TCP close) is declared lost within
  ``--ping-interval + --ping-timeout``: its pending callers get ``UplinkDisconnectedError``.
* F9 (transport): a peer's long strings reach the log clipped, and a flood of bad frames costs
  a few lines.

The slow consumers are plain sockets with a small receive buffer and a hand-made upgrade
(tornado's client always reads). Every wait has a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.peers import WAIT, ProviderProc
from support.processes import ServeProc
from support.waiting import wait_until
from support.ws import RawWS

MiB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# A WebSocket client on a plain socket: it reads only when told to


def _mask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if not n:
        return b""
    pad = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


def frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class SocketWS:
    """A WebSocket over a blocking socket with a small receive buffer; it never reads unless
    :meth:`read_frames` is called, so the host sees a client that does not read.
    """

    def __init__(self, port: int, path: str = "/_/uplink", rcvbuf: int = 4096):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(WAIT)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # byte by byte: nothing of the frames is read
            byte = self.sock.recv(1)
            assert byte, f"closed during the upgrade: {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, msg: Any) -> None:
        self.sock.sendall(frame(msg if isinstance(msg, bytes) else orjson.dumps(msg)))

    def send_many(self, msgs: list[Any]) -> None:
        self.sock.sendall(b"".join(frame(orjson.dumps(m)) for m in msgs))

    def _exactly(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def read_frames(self, timeout: float = WAIT) -> Iterator[tuple[int, bytes]]:
        """``(opcode, payload)`` of each frame the host sent, until it closes (or *timeout*)."""
        deadline = time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                b0, b1 = self._exactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack("!H", self._exactly(2))
                elif n == 127:
                    (n,) = struct.unpack("!Q", self._exactly(8))
                payload = self._exactly(n)
            except (EOFError, ConnectionResetError):
                return
            yield b0 & 0x0F, payload
            if b0 & 0x0F == 8:  # close
                return

    def json_frames(self, timeout: float = WAIT) -> Iterator[dict[str, Any]]:
        for opcode, payload in self.read_frames(timeout):
            if opcode == 1:
                yield orjson.loads(payload)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def call(call_id: str, command: str, *args: Any) -> dict[str, Any]:
    return {"type": "CALL", "id": call_id, "command": command, "args": list(args), "kwargs": {}}


def admin_state(host: ServeProc) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{host.http_url}_/admin/state", headers={"Authorization": f"Bearer {host.server_key}"}
    )
    with urllib.request.urlopen(request, timeout=WAIT) as answer:  # noqa: S310 - our own host
        return orjson.loads(answer.read())


class PeakRSS:
    """Samples the host's RSS every 20 ms on a thread of its own."""

    def __init__(self, host: ServeProc):
        self.host = host
        self.peak = host.rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, self.host.rss_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


# ---------------------------------------------------------------------------------------------
# F5: slow consumers

QUEUED = 4 * MiB
CONSUMERS = 3
CALLS = 300


class Bystander:
    """A client calling the host's own echo and a function of a provider of its own."""

    def __init__(self, host: ServeProc, raw_ws: Callable[..., RawWS]):
        self.provider = raw_ws(host.url)
        assert self.provider.hello(host.server_key).get("auth") == "OK"
        self.provider.send({"type": "REGISTER", "name": "bystander_echo"})
        self.caller = raw_ws(host.url)
        assert self.caller.hello(host.client_key).get("auth") == "OK"
        self.rounds = 0
        self.slowest = 0.0

    def round(self) -> None:
        """Two calls; both must succeed. Records the slowest latency."""
        self.rounds += 1
        start = time.monotonic()
        self.caller.send(call(f"e{self.rounds}", "anvil.private.echo", self.rounds))
        assert self.caller.response(f"e{self.rounds}").get("response") == self.rounds
        self.caller.send(call(f"b{self.rounds}", "bystander_echo", self.rounds))
        incoming = self.provider.recv()
        assert incoming.get("command") == "bystander_echo", incoming
        self.provider.send({"id": incoming["id"], "response": incoming["args"][0]})
        answer = self.caller.response(f"b{self.rounds}")
        assert answer.get("response") == self.rounds, answer
        self.slowest = max(self.slowest, time.monotonic() - start)


def flood(host: ServeProc, raw_ws: Callable[..., RawWS], base: Path) -> dict[str, Any]:
    """Slow consumers pipeline calls for 1 MiB each and read nothing; a bystander keeps calling.

    Returns the peak RSS over the host's baseline, the bystander's figures, and what each
    consumer finally read.
    """
    provider = ProviderProc("nb", host, base, None)
    consumers: list[SocketWS] = []
    try:
        bystander = Bystander(host, raw_ws)
        bystander.round()
        baseline = host.rss_bytes()
        rss = PeakRSS(host)
        for _ in range(CONSUMERS):
            ws = SocketWS(host.port)
            ws.send({"key": host.client_key, "v": 8})
            ws.send_many([call(f"c{i}", "text", MiB) for i in range(CALLS)])
            consumers.append(ws)

        def in_flight() -> int:
            return sum(p["calls_in_flight"] for p in admin_state(host)["peers"])

        def flood_over() -> bool:  # and the bystander has called all along, ten times at least
            bystander.round()
            return in_flight() == 0 and bystander.rounds > 10

        wait_until(in_flight, WAIT, "the calls to be in flight")
        wait_until(flood_over, 40, "every call of the slow consumers to be answered")
        peak = rss.stop()
        answers = []
        for ws in consumers:  # now read: every call was answered, most with QuotaExceededError
            seen: dict[str, Any] = {}
            for msg in ws.json_frames(timeout=WAIT):
                if str(msg.get("id", "")).startswith("c"):
                    seen[msg["id"]] = msg
                if len(seen) == CALLS:
                    break
            answers.append(seen)
        return {"growth": peak - baseline, "bystander": bystander, "answers": answers}
    finally:
        for ws in consumers:
            ws.close()
        provider.stop()


def _flood_host(serve_proc: Callable[..., ServeProc]) -> ServeProc:
    return serve_proc(
        "--max-queued-bytes", str(QUEUED),
        "--ping-interval", "30", "--ping-timeout", "30",  # the consumers stay while measured
    )  # fmt: skip


def test_slow_consumers_are_refused_and_a_bystander_keeps_its_latency(
    serve_proc: Callable[..., ServeProc], raw_ws: Callable[..., RawWS], tmp_path: Path
):
    host = _flood_host(serve_proc)
    result = flood(host, raw_ws, tmp_path)
    bystander = result["bystander"]
    assert bystander.rounds > 10
    assert bystander.slowest < 2.0, f"a bystander call took {bystander.slowest:.2f} s"
    for seen in result["answers"]:
        assert len(seen) == CALLS, f"{CALLS - len(seen)} calls were never answered"
        relayed = [m for m in seen.values() if m.get("response") == "x" * MiB]
        refused = [
            m
            for m in seen.values()
            if (m.get("error") or {}).get("type", "").endswith("QuotaExceededError")
        ]
        assert relayed, "no response reached the consumer"
        assert len(refused) >= CALLS // 2, f"only {len(refused)} calls were refused"
        assert len(relayed) + len(refused) == CALLS
    assert "Traceback" not in host.log()


def test_slow_consumers_cost_the_host_at_most_their_queue_bound(
    serve_proc: Callable[..., ServeProc], raw_ws: Callable[..., RawWS], tmp_path: Path
):
    host = _flood_host(serve_proc)
    result = flood(host, raw_ws, tmp_path)
    # each consumer's queue, plus a few 1 MiB frames in flight through the host
    bound = CONSUMERS * QUEUED + 16 * MiB
    assert result["growth"] < bound, (
        f"RSS grew by {result['growth'] / MiB:.0f} MiB (bound {bound / MiB:.0f} MiB)"
    )


# ---------------------------------------------------------------------------------------------
# F8: unauthenticated connections, fd exhaustion


def _closed(sock: socket.socket, timeout: float) -> bool:
    """True once the host has closed *sock* (reading and dropping what it sent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def test_connections_that_never_authenticate_are_closed_after_the_handshake_timeout(
    serve_proc: Callable[..., ServeProc],
):
    host = serve_proc("--handshake-timeout", "1")
    start = time.monotonic()
    silent = SocketWS(host.port)  # upgraded, never says hello
    idle = socket.create_connection(("127.0.0.1", host.port), timeout=WAIT)
    half = socket.create_connection(("127.0.0.1", host.port), timeout=WAIT)
    half.sendall(b"GET /_/uplink HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    try:
        frames = list(silent.json_frames(timeout=5))
        assert frames and "hello" in frames[0].get("error", ""), frames
        assert "id" not in frames[0]  # a fatal error
        assert _closed(silent.sock, 5)
        assert _closed(idle, 5)
        assert _closed(half, 5)
        assert time.monotonic() - start < 5
    finally:
        for s in (idle, half):
            s.close()
        silent.close()


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")
def test_running_out_of_file_descriptors_neither_spins_nor_floods_the_log(
    serve_proc: Callable[..., ServeProc], raw_ws: Callable[..., RawWS]
):
    host = serve_proc("--handshake-timeout", "1")
    subprocess.run(["prlimit", f"--pid={host.pid}", "--nofile=64:64"], check=True, timeout=WAIT)
    socks = []
    try:
        for _ in range(200):  # more than the host has descriptors; never sending a byte
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", host.port))
            socks.append(s)
        wait_until(lambda: host.open_fds() >= 60, WAIT, "the host to run out of descriptors")
        log_before, cpu_before = len(host.log()), host.cpu_seconds()
        time.sleep(3)  # the measuring window
        cpu = host.cpu_seconds() - cpu_before
        logged = host.log()[log_before:]
        assert cpu < 0.5, f"the host used {cpu:.2f} s of CPU in 3 s"
        assert len(logged) < 2000, f"{len(logged)} bytes of log in 3 s"
    finally:
        for s in socks:
            s.close()
    lines = [line for line in host.log().splitlines() if "cannot accept" in line]
    assert 1 <= len(lines) <= 2, lines

    def legit_call() -> bool:
        try:
            ws = raw_ws(host.url)
        except Exception:  # noqa: BLE001 - still out of descriptors: try again
            return False
        assert ws.hello(host.client_key).get("auth") == "OK"
        ws.send(call("legit", "anvil.private.echo", "hi"))
        return ws.response("legit").get("response") == "hi"

    wait_until(legit_call, WAIT, "a legit client to be served")


# ---------------------------------------------------------------------------------------------
# F10: a frozen provider


def test_a_frozen_provider_is_declared_lost_within_ping_interval_plus_timeout(
    serve_proc: Callable[..., ServeProc], raw_ws: Callable[..., RawWS], tmp_path: Path
):
    interval, timeout = 1.0, 2.0
    host = serve_proc("--ping-interval", str(interval), "--ping-timeout", str(timeout))
    provider = ProviderProc("nb", host, tmp_path, None)
    try:
        caller = raw_ws(host.url)
        assert caller.hello(host.client_key).get("auth") == "OK"
        for i in range(3):
            caller.send(call(f"slow-{i}", "slow", 60))
        wait_until(
            lambda: sum(p["calls_in_flight"] for p in admin_state(host)["peers"]) == 3,
            WAIT,
            "the calls to reach the provider",
        )
        os.kill(provider.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        for i in range(3):
            answer = caller.response(f"slow-{i}", timeout=interval + timeout + 10)
            assert answer["error"]["type"] == "anvil.server.UplinkDisconnectedError", answer
        lost_after = time.monotonic() - frozen
        assert lost_after < interval + timeout + 1.5, f"declared lost after {lost_after:.1f} s"
        assert "no answer to a ping" in host.log()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(provider.proc.pid, signal.SIGCONT)
        provider.stop()


# ---------------------------------------------------------------------------------------------
# F9: the log


def test_a_long_peer_string_is_clipped_and_a_flood_of_bad_frames_costs_a_few_lines(
    serve_proc: Callable[..., ServeProc],
):
    host = serve_proc()
    before = len(host.log())
    ws = SocketWS(host.port, rcvbuf=1 << 20)
    try:
        ws.send({"key": host.client_key, "v": 8})
        ws.send({"type": "Z" * MiB})  # an unknown type, 1 MiB long
        frames = list(ws.json_frames())
        assert frames[0].get("auth") == "OK"
        assert "unexpected message" in frames[-1].get("error", ""), frames[-1]
        assert len(frames[-1]["error"]) < 1000
    finally:
        ws.close()
    logged = wait_until(lambda: host.log()[before:], WAIT, "the warning")
    assert "ZZZZ" in logged and len(logged) < 600, logged[:1000]

    before = len(host.log())
    bad = [b"not json", orjson.dumps({"key": "wrong key", "v": 8}), orjson.dumps([1, 2])]
    for i in range(500):
        ws = SocketWS(host.port)
        try:
            ws.send(bad[i % len(bad)])
            first = next(ws.json_frames(), None)  # the fatal error: the host has seen it
            assert first is not None and "error" in first and "id" not in first, first
        finally:
            ws.close()
    lines = host.log()[before:].splitlines()
    assert len(lines) <= 5, lines
