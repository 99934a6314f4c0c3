"""Benchmark of the network path: anvil_nb's host against a bare two-hop relay (the floor).

Run: ``.venv/bin/python bench/bench_relay.py`` (needs ``pip install -e '.[bench]'``).

Options: ``--rounds 5 --seconds 5 --warmup 1 --callers 1,16 --cases floor,anvil,nbclient,kernel``;
``--memory`` (100,000 calls, RSS series); ``--profile DIR [--profiler py-spy|yappi]``.

Every process runs on 127.0.0.1, and each system is a router and a provider, as subprocesses:

* **floor** (``bench/relay_floor.py``): a bare tornado relay (caller route, worker route; it
  answers a caller's hello with an ``auth`` itself, then forwards frames, remembering which
  caller sent each id) and a ``websockets`` worker that answers ``{"id", "response": a + b,
  "objects": []}`` on its event loop;
* **anvil_nb**: ``python -m anvil_nb serve --port 0`` (a temporary data dir) with a *plain*
  provider (``Client(WebSocketTransport(url, server_key))`` serving ``add``), or, as a second
  host, with a *kernel-like* one (everything ``%load_ext anvil_nb`` turns on: ``kernel.join``,
  output capture, watching the app's events, ``widgets.shared_feed()``).

The callers run in a subprocess of their own, started for each case (``bench/relay_peers.py``):
by default (``ws``) one asyncio event loop with N ``websockets`` connections, each saying hello
with the client key, waiting for ``auth``, then calling ``add(2, 3)`` back to back (JSON text
frames, ids of its own, responses matched by id, TCP_NODELAY); the same program drives the
floor and anvil_nb, so the CALL and response frames are the same. The ``nbclient`` case has N
threads in that process instead, each with anvil_nb's own ``Client``.

Cases (table rows): ``floor``; ``anvil`` (plain provider, ``ws`` callers); ``nbclient``
(plain provider, anvil_nb ``Client`` callers); ``kernel`` (kernel-like provider, ``ws``
callers); each with 1 and with 16 callers. After a warm-up, calls that start and end in the
measured window count: p50/p99 latency and calls/s. The CPU each process used in the window
(user + system, from ``/proc/PID/stat``) is shown per call, with the share spent in the kernel.
Each round measures every case once, interleaved (every other round in reverse order); the
table shows medians over ``--rounds`` rounds, and the ratio table the targets of issue 11 with
each round's ratio. A case during which other processes of the machine used more than
``--max-others`` % of a CPU is measured again (up to ``--retries`` times, 3), and the least
disturbed of its measurements is kept; the table shows how much other processes used.

``--memory``: 100,000 calls through anvil_nb from 16 ``ws`` callers, once with each provider;
the host's and the provider's RSS (``VmRSS``) every 10,000 calls.

``--profile DIR``: anvil_nb is run again, in fresh processes, for the ``anvil``, ``kernel`` and
``nbclient`` cases, and the host and the provider (and, for ``nbclient``, the callers) are
profiled in the measured window only; the top functions of each are printed and the raw
profiles go to DIR. ``--profiler py-spy`` (the default) samples at 250 Hz with ``--gil``, so
only the thread holding the GIL counts: waiting does not, and neither does C code that releases
the GIL (system calls, SQLite), which the ``sys`` share of the table covers. ``--profiler
yappi`` (through ``bench/profiled.py``) counts CPU time in every thread and C function, but
slows Python code several times over. The profiled runs' figures are not in the table.
``--rounds 0`` skips the table.

Every subprocess is stopped at the end (its stdin closed, SIGTERM, then SIGKILL after 10 s),
and also stops if this process dies (stdin closes; on Linux, a parent-death signal).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
PEERS = str(HERE / "relay_peers.py")
FLOOR = str(HERE / "relay_floor.py")
SERVER_KEY = "bench-server-key"
CLIENT_KEY = "bench-client-key"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None

#: The python command of a role: ``[PYTHON]``, or one that runs it under ``profiled.py``.
Wrap = Callable[[str], list[str]]


def plain_python(role: str) -> list[str]:  # noqa: ARG001
    """Every role runs in this Python, unprofiled."""
    return [PYTHON]


# ---------------------------------------------------------------------------------------------
# Subprocesses


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: one C call, no lock taken, nothing imported."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when this process dies


def _spawn(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """``Popen`` of a child that gets SIGTERM if this process dies."""
    return subprocess.Popen(list(cmd), preexec_fn=_die_with_parent, **kwargs)  # noqa: PLW1509 - one C call, safe with threads


class Proc:
    """A subprocess that prints a line starting with *ready* on stdout once it is ready.

    Its stdin is a pipe (children stop when it closes); its stdout lines can be awaited with
    :meth:`expect`; lines nobody awaited are kept in :attr:`said`.
    """

    #: The exit status of every subprocess stopped so far, by name.
    statuses: dict[str, int | None] = {}

    def __init__(self, name: str, cmd: Sequence[str], ready: str, timeout: float = 60.0):
        self.name = name
        self.said: list[str] = []
        self.popen = _spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._eof = False

        def drain() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        threading.Thread(target=drain, name=f"stdout-{name}", daemon=True).start()
        try:
            self.ready_line = self.expect(ready, timeout)
        except BaseException:
            self.stop()
            raise

    def expect(self, prefixes: str | tuple[str, ...], timeout: float) -> str:
        """The next stdout line that starts with one of *prefixes*."""
        deadline = time.monotonic() + timeout
        while True:
            if self._eof:
                raise RuntimeError(f"{self.name} exited (status {self.popen.poll()})")
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(
                    f"{self.name}: no {prefixes!r} line within {timeout} s"
                ) from None
            if line is None:
                self._eof = True
                continue
            if line.startswith(prefixes):
                return line
            self.said.append(line)

    def _drain(self, timeout: float) -> None:
        """Keep in :attr:`said` what the child printed until its stdout closed."""
        deadline = time.monotonic() + timeout
        while not self._eof:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                return
            if line is None:
                self._eof = True
            else:
                self.said.append(line)

    def send(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time used so far, all threads (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan"), float("nan")
        return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK

    def rss_mib(self) -> float:
        """Resident memory now (``VmRSS`` from /proc/PID/status), MiB."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self, grace: float = 0.0) -> int | None:
        """Close stdin; after *grace* s, SIGTERM; after 10 s more, SIGKILL. The exit status."""
        p = self.popen
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
        if grace > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(grace)
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self._drain(2.0)
        Proc.statuses[self.name] = p.returncode
        return p.returncode


def machine_busy_seconds() -> float:
    """CPU seconds the machine's processes have used since boot: user + nice + system time
    (Linux /proc/stat; interrupt and steal time are no process's, so they are left out).
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]
        return sum(int(x) for x in fields) / _CLK_TCK
    except (OSError, ValueError):
        return float("nan")


# ---------------------------------------------------------------------------------------------
# Systems and cases


class System:
    """A router (relay or host) and a provider (worker or anvil_nb provider), as subprocesses;
    callers connect to :attr:`url` with :attr:`key`.
    """

    def __init__(self, name: str, start: Callable[[System], None]) -> None:
        self.name = name
        self.procs: list[Proc] = []
        self.url = ""
        self.key = CLIENT_KEY
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        try:
            start(self)
        except BaseException:
            self.close()
            raise
        self.router, self.provider = self.procs

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def start_floor(wrap: Wrap = plain_python) -> System:
    """The floor: ``relay_floor.py serve`` and its ``websockets`` worker."""

    def start(s: System) -> None:
        relay = Proc("floor relay", [*wrap("relay"), FLOOR, "serve", "--port", "0"], "relay ready")
        s.procs.append(relay)
        base = relay.ready_line.rsplit(" ", 1)[1]
        s.url = base + "/caller"
        worker = [*wrap("worker"), FLOOR, "worker", "--url", base + "/worker"]
        s.procs.append(Proc("floor worker", worker, "worker ready"))

    return System("floor", start)


def start_anvil(kind: str, wrap: Wrap = plain_python) -> System:
    """``python -m anvil_nb serve`` and a *kind* (``plain`` or ``kernel``) provider."""

    def start(s: System) -> None:
        s._tmp = tempfile.TemporaryDirectory(prefix="anvil_nb-bench-")
        serve = ["-m", "anvil_nb", "serve", "--host", "127.0.0.1", "--port", "0"]
        serve += ["--server-key", SERVER_KEY, "--client-key", CLIENT_KEY]
        serve += ["--data-dir", s._tmp.name, "--call-timeout", "30"]
        host = Proc(f"host ({kind})", [*wrap("host"), *serve], "anvil_nb host ready at ")
        s.procs.append(host)
        s.url = host.ready_line.rsplit("uplink ", 1)[1].rstrip(")")
        provider = [*wrap("provider"), PEERS, "provider", "--kind", kind]
        provider += ["--url", s.url, "--key", SERVER_KEY]
        s.procs.append(Proc(f"{kind} provider", provider, "provider ready"))

    return System(kind, start)


@dataclass(frozen=True)
class Case:
    """A row of the table: a system and the kind of callers that drive it."""

    key: str
    label: str
    system: str  # "floor", "plain" or "kernel"
    callers: str  # "ws" or "anvil_nb"

    @property
    def roles(self) -> tuple[str, str]:
        return ("relay", "worker") if self.system == "floor" else ("host", "provider")


CASES = (
    Case("floor", "bare two-hop relay (floor)", "floor", "ws"),
    Case("anvil", "anvil_nb (plain provider)", "plain", "ws"),
    Case("nbclient", "anvil_nb, anvil_nb Client callers", "plain", "anvil_nb"),
    Case("kernel", "anvil_nb, kernel-like provider", "kernel", "ws"),
)


def start_system(name: str, wrap: Wrap = plain_python) -> System:
    return start_floor(wrap) if name == "floor" else start_anvil(name, wrap)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    case: str
    callers: int
    p50_us: float
    p99_us: float
    rate: float
    calls: int
    #: CPU µs per call in the window (user, system): router, provider, callers.
    cpu_us: tuple[tuple[float, float], ...]
    #: CPU used by other processes of the machine in the window, in % of one CPU.
    others_pct: float
    req_bytes: int = -1
    resp_bytes: int = -1

    def cpu(self, i: int) -> float:
        """CPU µs per call of process *i* (0 router, 1 provider, 2 callers)."""
        return sum(self.cpu_us[i])

    def cpu_cell(self, i: int) -> str:
        """``"390 (31% sys)"``: CPU µs per call of process *i*, and its share in the kernel."""
        user, system = self.cpu_us[i]
        total = user + system
        return f"{total:4.0f} ({100 * system / total if total else 0:2.0f}% sys)"


Hook = Callable[[dict[str, Proc]], object]


def measure(
    case: Case,
    system: System,
    n: int,
    seconds: float,
    warmup: float,
    wrap: Wrap = plain_python,
    at_start: Hook | None = None,
    at_end: Hook | None = None,
) -> Result:
    """*n* callers of *case*'s kind, in a fresh subprocess, calling *system* back to back.

    *at_start* and *at_end* get the processes (``router``, ``provider``, ``callers``) when the
    measured window opens (after the warm-up) and when it closes.
    """
    cmd = [*wrap("callers"), PEERS, "callers", "--kind", case.callers]
    cmd += ["--url", system.url, "--key", system.key, "-n", str(n)]
    callers = Proc(f"callers ({case.key}, {n})", cmd, "callers ready")
    procs = {"router": system.router, "provider": system.provider, "callers": callers}
    try:
        start = time.monotonic() + warmup
        end = start + seconds
        callers.send(f"run {start!r} {end!r}")
        time.sleep(max(0.0, start - time.monotonic()))
        busy0 = machine_busy_seconds()
        cpu0 = [p.cpu_seconds() for p in procs.values()]
        if at_start is not None:
            at_start(procs)
        time.sleep(max(0.0, end - time.monotonic()))
        cpu1 = [p.cpu_seconds() for p in procs.values()]
        busy1 = machine_busy_seconds()
        if at_end is not None:
            at_end(procs)
        data = json.loads(callers.expect("result ", seconds + 60).split(" ", 1)[1])
    finally:
        callers.stop(grace=10)
    calls = data["calls"]
    if not calls:
        raise RuntimeError(f"{case.key}, {n} caller(s): no call completed in the window")
    cpu = tuple(
        ((u1 - u0) / calls * 1e6, (s1 - s0) / calls * 1e6)
        for (u0, s0), (u1, s1) in zip(cpu0, cpu1, strict=True)
    )
    ours = sum(u1 - u0 + s1 - s0 for (u0, s0), (u1, s1) in zip(cpu0, cpu1, strict=True))
    return Result(
        case=case.key,
        callers=n,
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        rate=calls / seconds,
        calls=calls,
        cpu_us=cpu,
        others_pct=max(0.0, busy1 - busy0 - ours) / seconds * 100,
        req_bytes=data["req_bytes"],
        resp_bytes=data["resp_bytes"],
    )


def median_result(rs: list[Result]) -> Result:
    """The median of each figure over several rounds of one case."""

    def med(get: Callable[[Result], float]) -> float:
        return statistics.median(get(r) for r in rs)

    return Result(
        case=rs[0].case,
        callers=rs[0].callers,
        p50_us=med(lambda r: r.p50_us),
        p99_us=med(lambda r: r.p99_us),
        rate=med(lambda r: r.rate),
        calls=round(med(lambda r: r.calls)),
        others_pct=med(lambda r: r.others_pct),
        cpu_us=tuple(
            (med(lambda r, i=i: r.cpu_us[i][0]), med(lambda r, i=i: r.cpu_us[i][1]))
            for i in range(3)
        ),
        req_bytes=rs[0].req_bytes,
        resp_bytes=rs[0].resp_bytes,
    )


# ---------------------------------------------------------------------------------------------
# Reporting

#: (name, numerator case, denominator case, caller count ("lo" or "hi"), figure, target).
#: A figure is "p50", "rate" or "cpu<i>" (CPU µs per call of process i); a target is
#: ("<=", x) or (">=", x), or None where issue 11 sets none.
RATIOS: tuple[tuple[str, str, str, str, str, tuple[str, float] | None], ...] = (
    ("p50 @{lo}: anvil_nb / floor", "anvil", "floor", "lo", "p50", ("<=", 1.3)),
    ("p50 @{hi}: anvil_nb / floor", "anvil", "floor", "hi", "p50", ("<=", 1.3)),
    ("calls/s @{lo}: anvil_nb / floor", "anvil", "floor", "lo", "rate", None),
    ("calls/s @{hi}: anvil_nb / floor", "anvil", "floor", "hi", "rate", (">=", 0.85)),
    ("CPU/call @{hi}: host / relay", "anvil", "floor", "hi", "cpu0", ("<=", 1.2)),
    ("CPU/call @{hi}: provider / worker", "anvil", "floor", "hi", "cpu1", ("<=", 1.5)),
    (
        "calls/s @{hi}: anvil_nb Client callers / websockets callers (anvil_nb)",
        "nbclient",
        "anvil",
        "hi",
        "rate",
        (">=", 0.7),
    ),
    ("CPU/call @{hi}: kernel-like / plain provider", "kernel", "anvil", "hi", "cpu1", ("<=", 1.2)),
    (
        "calls/s @{hi}: kernel-like / plain provider",
        "kernel",
        "anvil",
        "hi",
        "rate",
        (">=", 1 / 1.2),
    ),
    ("p50 @{lo}: kernel-like / plain provider", "kernel", "anvil", "lo", "p50", ("<=", 1.2)),
    ("CPU/call @{lo}: kernel-like / plain provider", "kernel", "anvil", "lo", "cpu1", ("<=", 1.2)),
)


def _figure(r: Result, figure: str) -> float:
    if figure == "p50":
        return r.p50_us
    if figure == "rate":
        return r.rate
    return r.cpu(int(figure[3:]))


def _fmt_cpu(case: Case, r: Result) -> str:
    router, provider = case.roles
    return f"{router} {r.cpu(0):,.0f}, {provider} {r.cpu(1):,.0f}, callers {r.cpu(2):,.0f}"


def print_tables(
    cases: Sequence[Case], counts: list[int], rounds: dict[tuple[str, int], list[Result]]
) -> None:
    results = {key: median_result(rs) for key, rs in rounds.items()}
    lo, hi = min(counts), max(counts)
    nrounds = len(next(iter(rounds.values())))
    print(f"## Summary ({nrounds} interleaved round(s), medians)\n")
    print(f"| system | p50 µs @{lo} | calls/s @{lo} | calls/s @{hi} | CPU µs/call @{hi} |")
    print("| --- | ---: | ---: | ---: | --- |")
    for case in cases:
        a, b = results[case.key, lo], results[case.key, hi]
        print(
            f"| {case.label} | {a.p50_us:,.0f} | {a.rate:,.0f} | {b.rate:,.0f} "
            f"| {_fmt_cpu(case, b)} |"
        )
    print("\n## All figures (medians)\n")
    print(
        "| system | callers | p50 µs | p99 µs | calls/s "
        "| CPU µs/call: router (relay/host) | provider (worker/provider) | callers "
        "| other processes |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in counts:
        for case in cases:
            r = results[case.key, n]
            cells = " | ".join(r.cpu_cell(i) for i in range(3))
            print(
                f"| {case.label} | {n} | {r.p50_us:,.0f} | {r.p99_us:,.0f} "
                f"| {r.rate:,.0f} | {cells} | {r.others_pct:.0f}% of a CPU |"
            )
    sizes = {
        c.key: (results[c.key, lo].req_bytes, results[c.key, lo].resp_bytes)
        for c in cases
        if c.callers == "ws"
    }
    print(
        "\nframes (websockets callers, bytes: CALL / response): "
        + ", ".join(f"{k} {q} / {p}" for k, (q, p) in sizes.items())
    )
    print("\n## Ratios against issue 11's targets (ratio of medians; then each round)\n")
    print("| ratio | value | target | | each round |")
    print("| --- | ---: | --- | --- | --- |")
    have = {c.key for c in cases}
    if not any(num in have and den in have for _, num, den, *_ in RATIOS):
        print("| (none: every ratio compares two of the cases measured) | | | | |")
    for name, num, den, at, figure, target in RATIOS:
        if num not in have or den not in have:
            continue
        n = lo if at == "lo" else hi
        value = _figure(results[num, n], figure) / _figure(results[den, n], figure)
        each = ", ".join(
            f"{_figure(a, figure) / _figure(b, figure):.2f}"
            for a, b in zip(rounds[num, n], rounds[den, n], strict=True)
        )
        if target is None:
            want, verdict = "(none)", ""
        else:
            op, x = target
            ok = value <= x if op == "<=" else value >= x
            want, verdict = f"{op} {x:.2f}", "ok" if ok else "**MISSED**"
        print(f"| {name.format(lo=lo, hi=hi)} | {value:.2f} | {want} | {verdict} | {each} |")


# ---------------------------------------------------------------------------------------------
# Memory


def memory(calls: int, every: int, kinds: list[str]) -> None:
    """*calls* calls from 16 ``ws`` callers through anvil_nb with each provider *kind*; the
    host's and the provider's RSS every *every* calls.
    """
    for kind in kinds:
        system = start_anvil(kind)
        try:
            cmd = [PYTHON, PEERS, "callers", "--kind", "ws", "--url", system.url]
            callers = Proc(f"callers (memory, {kind})", [*cmd, "--key", CLIENT_KEY, "-n", "16"],
                           "callers ready")  # fmt: skip
            try:
                callers.send(f"count {calls} {every}")
                rows = []
                t0 = time.monotonic()
                while True:
                    line = callers.expect(("progress ", "result "), 300)
                    if line.startswith("result "):
                        break
                    done = int(line.split()[1])
                    rows.append((done, time.monotonic() - t0, system.router.rss_mib(),
                                 system.provider.rss_mib(), callers.rss_mib()))  # fmt: skip
            finally:
                callers.stop(grace=10)
        finally:
            system.close()
        print(f"\n## Memory: {calls:,} calls, 16 websockets callers, {kind} provider\n")
        print("| calls | s | host RSS MiB | provider RSS MiB | callers RSS MiB |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for done, t, host, prov, cal in rows:
            print(f"| {done:,} | {t:.1f} | {host:.1f} | {prov:.1f} | {cal:.1f} |")
        after = [r for r in rows if r[0] >= every]
        if len(after) >= 2:
            first, last = after[0], after[-1]
            print(
                f"\ngrowth from {first[0]:,} to {last[0]:,} calls: host "
                f"{last[2] - first[2]:+.1f} MiB, provider {last[3] - first[3]:+.1f} MiB"
            )
        for line in system.provider.said:
            print(f"({system.provider.name}: {line})")


# ---------------------------------------------------------------------------------------------
# Profiling

#: Modules (their last two path parts) whose inclusive times are listed below each profile's
#: top self times: anvil_nb's own, and the callers' program.
_LISTED = (
    "client/client.py",
    "client/websocket.py",
    "client/capture.py",
    "host/dispatcher.py",
    "host/sessions.py",
    "host/registry.py",
    "web/uplink.py",
    "core/serialise.py",
    "core/protocol.py",
    "core/events.py",
    "widgets/feed.py",
    "widgets/models.py",
    "bench/relay_peers.py",
)


def module_name(path: str) -> str:
    """``tornado/websocket.py`` for ``/.../site-packages/tornado/websocket.py``: the last two
    parts of a path, which tell tornado's ``websocket.py`` from anvil_nb's.
    """
    return "/".join(Path(path).parts[-2:]) if path else ""


def summarise(stats: dict[str, Any], calls: int, top: int) -> str:
    """The top functions of one process: % of its profiled CPU and CPU µs per call.

    *stats* is ``{"total": s, "functions": [[module, name, ncalls, self_s, incl_s], ...]}``.
    """
    total = stats["total"]
    if not total or not calls:
        return "  (no samples)"
    rows = [
        f"  profiled: {total / calls * 1e6:.0f} µs per call; "
        "self = in the function itself, incl. = with its callees",
        f"  {'self %':>6} {'incl. %':>7} {'self µs/call':>12}  function",
    ]

    def row(f: list[Any]) -> str:
        module, name, _, own, incl = f
        return f"  {100 * own / total:6.1f} {100 * incl / total:7.1f} {own / calls * 1e6:12.1f}  {module}:{name}"

    funcs = stats["functions"]
    picked = sorted(funcs, key=lambda f: -f[3])[:top]
    rows += [row(f) for f in picked]
    rows.append("  -- highest inclusive in anvil_nb's modules --")
    seen = {(f[0], f[1]) for f in picked}
    inclusive = [f for f in sorted(funcs, key=lambda f: -f[4]) if (f[0], f[1]) not in seen]
    rows += [row(f) for f in inclusive if f[0].endswith(_LISTED)][:top]
    return "\n".join(rows)


def stacks_to_stats(raw: Path, rate: int) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks as :func:`summarise` takes them (seconds = samples / rate)."""
    own: dict[tuple[str, str], int] = {}
    incl: dict[tuple[str, str], int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):  # "name (path/to/file.py:123)"
            name, _, where = frame.partition(" (")
            if where:
                frames.append((module_name(where.rstrip(")").rsplit(":", 1)[0]), name))
        if not frames:
            continue
        k = int(count)
        total += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    functions = [[m, n, None, own.get((m, n), 0) / rate, k / rate] for (m, n), k in incl.items()]
    return {"total": total / rate, "functions": functions}


def _py_spy() -> str:
    spy = str(Path(PYTHON).parent / "py-spy")
    return spy if Path(spy).exists() else shutil.which("py-spy") or ""


def profile(
    case: Case, n: int, seconds: float, warmup: float, out: Path, top: int, profiler: str
) -> None:
    """Measure *case* again in fresh processes, profiling the host and the provider (and, for
    anvil_nb's own callers, the callers) in the measured window.

    ``py-spy``: samples (250 Hz, ``--gil``: only the thread holding the GIL, so waiting is not
    counted, nor time in C code that releases the GIL: system calls, SQLite). ``yappi``: CPU
    clock, every thread and C function, exact but it slows Python code several times over.
    """
    out = out / f"{case.key}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.json"), *out.glob("*.txt")]:
        stale.unlink()
    roles = {"router": "host", "provider": "provider"}
    if case.callers == "anvil_nb":
        roles["callers"] = "callers"
    rate = 250
    spies: list[subprocess.Popen[Any]] = []
    wrap: Wrap = plain_python
    if profiler == "yappi":

        def wrap(role: str) -> list[str]:
            if role not in roles.values():
                return [PYTHON]
            return [PYTHON, str(HERE / "profiled.py"), str(out / f"{role}.json")]

        def begin(procs: dict[str, Proc]) -> None:
            for key in roles:
                procs[key].popen.send_signal(signal.SIGUSR1)

        def end(procs: dict[str, Proc]) -> None:
            for key in roles:
                procs[key].popen.send_signal(signal.SIGUSR2)

    else:
        spy = _py_spy()
        if not spy:
            print(
                "py-spy is not installed (pip install -e '.[bench]'): no profile", file=sys.stderr
            )
            return

        def begin(procs: dict[str, Proc]) -> None:
            for key, role in roles.items():
                cmd = [spy, "record", "--pid", str(procs[key].pid), "--rate", str(rate), "--gil"]
                cmd += ["--nonblocking", "--format", "raw", "--output", str(out / f"{role}.txt")]
                cmd += ["--duration", str(max(1, int(seconds)))]
                quiet = subprocess.DEVNULL
                spies.append(_spawn(cmd, stdout=quiet, stderr=quiet))

        def end(procs: dict[str, Proc]) -> None:
            pass

    system = start_system(case.system, wrap)
    try:
        r = measure(case, system, n, seconds, warmup, wrap, at_start=begin, at_end=end)
        deadline = time.monotonic() + seconds + 30
        for p in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and not all(
            (out / f"{role}.json").exists() or (out / f"{role}.txt").exists()
            for role in roles.values()
        ):
            time.sleep(0.1)
    finally:
        for p in spies:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        system.close()
    print(
        f"\n### Profile: {case.label}, {n} caller(s), {profiler} "
        f"(under the profiler: p50 {r.p50_us:,.0f} µs, {r.rate:,.0f} calls/s)"
    )
    for role in roles.values():
        json_path, raw_path = out / f"{role}.json", out / f"{role}.txt"
        if json_path.exists():
            print(f"\n{role} ({json_path}):")
            print(summarise(json.loads(json_path.read_text()), r.calls, top))
        elif raw_path.exists():
            print(f"\n{role} ({raw_path}):")
            print(summarise(stacks_to_stats(raw_path, rate), r.calls, top))
        else:
            print(f"\n{role}: no profile written")


# ---------------------------------------------------------------------------------------------


def run_rounds(
    cases: Sequence[Case], counts: list[int], args: argparse.Namespace, notes: list[str]
) -> dict[tuple[str, int], list[Result]]:
    """Every case once per round, interleaved; the results of each case, round by round.

    What the providers said as they stopped goes to *notes*.
    """
    rounds: dict[tuple[str, int], list[Result]] = collections.defaultdict(list)
    systems: dict[str, System] = {}
    try:
        for case in cases:
            if case.system not in systems:
                systems[case.system] = start_system(case.system)
        for i in range(args.rounds):
            order = list(cases) if i % 2 == 0 else list(reversed(cases))
            for n in counts:
                for case in order:
                    tries: list[Result] = []
                    for attempt in range(args.retries + 1):
                        tries.append(
                            measure(case, systems[case.system], n, args.seconds, args.warmup)
                        )
                        if tries[-1].others_pct <= args.max_others or attempt == args.retries:
                            break
                        print(
                            f"({case.key}, {n} caller(s): other processes used "
                            f"{tries[-1].others_pct:.0f}% of a CPU; measuring again)",
                            file=sys.stderr,
                        )
                    r = min(tries, key=lambda t: t.others_pct)  # the least disturbed
                    rounds[case.key, n].append(r)
                    print(
                        f"round {i + 1}/{args.rounds}: {case.key:>8} @{n:<2}  p50 "
                        f"{r.p50_us:6,.0f} µs  {r.rate:6,.0f} calls/s  CPU/call "
                        f"{r.cpu(0):4.0f} {r.cpu(1):4.0f} {r.cpu(2):4.0f}  "
                        f"others {r.others_pct:.0f}%",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for system in systems.values():
            system.close()
            notes.extend(f"{system.provider.name}: {line}" for line in system.provider.said)
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (1)")
    parser.add_argument("--callers", default="1,16", help="numbers of callers (1,16)")
    parser.add_argument(
        "--cases",
        default=",".join(c.key for c in CASES),
        help="rows to measure, of " + ",".join(c.key for c in CASES) + " (all)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; medians shown (5; 0: none)"
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=10.0,
        metavar="PCT",
        help="measure a case again (up to --retries times) when other processes used more than "
        "PCT%% of a CPU during it, and keep the least disturbed measurement (10)",
    )
    parser.add_argument(
        "--retries", type=int, default=3, help="measurements again at most, per case (3)"
    )
    parser.add_argument("--memory", action="store_true", help="only the memory series")
    parser.add_argument(
        "--memory-calls", type=int, default=100_000, help="calls in --memory (100,000)"
    )
    parser.add_argument(
        "--memory-every", type=int, default=10_000, help="RSS sampled every so many calls (10,000)"
    )
    parser.add_argument(
        "--memory-providers", default="plain,kernel", help="providers for --memory (plain,kernel)"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="also profile anvil_nb; raw profiles into DIR"
    )
    parser.add_argument("--profiler", choices=["py-spy", "yappi"], default="py-spy")
    parser.add_argument("--top", type=int, default=15, help="functions per process in profiles")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.callers.split(",") if c.strip()]
    by_key = {c.key: c for c in CASES}
    wanted = [k.strip() for k in args.cases.split(",") if k.strip()]
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.rounds < 0 or args.retries < 0:
        parser.error("--callers needs positive integers, --seconds a positive number")
    if not wanted or any(k not in by_key for k in wanted):
        parser.error(f"--cases: choose among {', '.join(by_key)}")
    cases = [c for c in CASES if c.key in wanted]

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}")
    try:
        if args.memory:
            kinds = [k.strip() for k in args.memory_providers.split(",") if k.strip()]
            memory(args.memory_calls, args.memory_every, kinds)
            return 0
        print(
            f"{args.seconds:g} s measured after {args.warmup:g} s warm-up; {args.rounds} "
            f"interleaved round(s); callers in a subprocess of their own per case\n"
        )
        if args.rounds:
            notes: list[str] = []
            rounds = run_rounds(cases, counts, args, notes)
            print_tables(cases, counts, rounds)
            for note in notes:
                print(f"\n({note})")
        if args.profile:
            for key in ("anvil", "kernel", "nbclient"):
                if key in wanted:
                    for n in counts:
                        profile(by_key[key], n, args.seconds, args.warmup, Path(args.profile),
                                args.top, args.profiler)  # fmt: skip
    finally:
        bad = {k: v for k, v in Proc.statuses.items() if v != 0}
        if bad:
            print(f"\nsubprocesses exited with a non-zero status: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
