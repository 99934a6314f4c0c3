"""Benchmark of the network path: anvil_nb's host against a bare tornado relay (the floor).

Run: ``.venv/bin/python bench/bench_relay.py [--seconds 5] [--callers 1,16] [--profile DIR]``.

Two systems run side by side on this machine, each as three processes (a router, a provider,
and the callers in this process), all on 127.0.0.1:

* **floor**: ``bench/relay_floor.py``, a bare tornado two-hop WebSocket relay (``serve``
  subprocess) and a provider subprocess that answers ``{"id", "response": x}`` on its I/O loop;
* **anvil_nb**: ``python -m anvil_nb serve --port 0`` (a temporary data dir) and a provider
  subprocess with ``Client(WebSocketTransport(url, server_key))`` serving ``echo(x) -> x``.

Callers are run the same way for both: **one thread per caller, each doing blocking round
trips back to back over a connection of its own**, and each connection has an I/O thread of its
own running tornado (anvil_nb's ``Client`` over ``WebSocketTransport``; the floor's
``FloorCaller`` copies that threading model with nothing else). After a warm-up, calls that
start and end inside the measured window count: p50/p99 latency and calls/s for each number of
concurrent callers. The CPU time each process used in the window (user + system, from
``/proc``) is shown per call, with the share spent in the kernel. Each case is measured
``--rounds`` times (3), interleaved, and the table shows medians; a case during which other
processes of the machine used more than ``--max-others`` % of a CPU is measured again.

With ``--profile DIR``, anvil_nb is run once more per caller count, in fresh processes, and
the host, the provider and this process (the callers) are profiled in the measured window only;
the top functions of each are printed and the raw profiles go to DIR. ``--profiler py-spy``
(the default; ``pip install py-spy``) samples at 250 Hz with ``--gil``, so only the thread
holding the GIL counts: waiting does not, and neither does C code that releases the GIL (system
calls, SQLite), which the ``sys`` share of the table covers. ``--profiler yappi`` (through
``bench/profiled.py``) counts CPU time in every thread and C function exactly, but slows
Python code several times over. The profiled runs' figures are not in the table.

Every subprocess is stopped at the end (SIGTERM), and also stops if this process dies (stdin
closes; on Linux, a parent-death signal).
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

from relay_floor import FloorCaller

from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
SERVER_KEY = "bench-server-key"
CLIENT_KEY = "bench-client-key"
ARG = "hello"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


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
    """A subprocess that prints a line starting with *ready* on stdout once it is ready."""

    def __init__(self, name: str, cmd: Sequence[str], ready: str, timeout: float = 30.0):
        self.name = name
        self.popen = _spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.popen.pid
        lines: queue.Queue[str | None] = queue.Queue()

        def drain() -> None:
            assert self.popen.stdout is not None
            for line in self.popen.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=drain, name=f"stdout-{name}", daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"{name} was not ready within {timeout} s") from None
            if line is None:
                self.stop()
                raise RuntimeError(f"{name} exited before it was ready: {self.popen.returncode}")
            if line.startswith(ready):
                self.ready_line = line.strip()
                return

    def cpu_seconds(self) -> tuple[float, float]:
        """User and system CPU time used so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan"), float("nan")
        return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 10 s; the exit status."""
        p = self.popen
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
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
# The two systems


class Floor:
    """The bare tornado relay and its provider, as subprocesses."""

    name = "floor"

    def __init__(self) -> None:
        script = str(HERE / "relay_floor.py")
        self.procs: list[Proc] = []
        try:
            relay = Proc("floor relay", [PYTHON, script, "serve", "--port", "0"], "relay ready at ")
            self.procs.append(relay)
            self.url = relay.ready_line.rsplit(" ", 1)[1]
            provider = [PYTHON, script, "provider", "--url", self.url + "/provider"]
            self.procs.append(Proc("floor provider", provider, "provider ready"))
        except BaseException:
            self.close()
            raise
        self.router, self.provider = self.procs

    def connect(self, i: int) -> tuple[Callable[[], Any], Callable[[], None]]:
        caller = FloorCaller(self.url + "/caller", f"c{i}")
        return lambda: caller.call(ARG), caller.close

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


class AnvilNB:
    """``python -m anvil_nb serve`` and a provider serving ``echo``, as subprocesses."""

    name = "anvil_nb"

    def __init__(self, profile_to: Path | None = None) -> None:
        """With *profile_to*, host and provider run under ``bench/profiled.py``: SIGUSR1 starts
        yappi in them, SIGUSR2 writes ``host.json`` and ``provider.json`` there.
        """
        self._tmp = tempfile.TemporaryDirectory(prefix="anvil_nb-bench-")
        self.procs: list[Proc] = []

        def python(role: str) -> list[str]:
            if profile_to is None:
                return [PYTHON]
            return [PYTHON, str(HERE / "profiled.py"), str(profile_to / f"{role}.json")]

        serve = ["-m", "anvil_nb", "serve", "--host", "127.0.0.1", "--port", "0"]
        serve += ["--server-key", SERVER_KEY, "--client-key", CLIENT_KEY]
        serve += ["--data-dir", self._tmp.name, "--call-timeout", "30"]
        try:
            host = Proc("anvil_nb host", [*python("host"), *serve], "anvil_nb host ready at ")
            self.procs.append(host)
            self.url = host.ready_line.rsplit("uplink ", 1)[1].rstrip(")")
            echo = [str(Path(__file__).resolve()), "--serve-echo", self.url]
            self.procs.append(
                Proc("anvil_nb provider", [*python("provider"), *echo], "provider ready")
            )
        except BaseException:
            self.close()
            raise
        self.router, self.provider = self.procs

    def connect(self, i: int) -> tuple[Callable[[], Any], Callable[[], None]]:  # noqa: ARG002
        client = Client(WebSocketTransport(self.url, CLIENT_KEY), functions=FunctionRegistry())
        client.start()
        return lambda: client.call("echo", ARG), client.close

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self._tmp.cleanup()


def serve_echo(url: str) -> int:
    """The anvil_nb provider subprocess: serve ``echo`` until SIGTERM, SIGINT or stdin EOF."""
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while os.read(0, 4096):  # unbuffered: no lock held at exit
                pass
        done.set()

    threading.Thread(target=watch_stdin, name="stdin-eof", daemon=True).start()
    registry = FunctionRegistry()
    registry.register("echo", lambda x: x)
    client = Client(WebSocketTransport(url, SERVER_KEY), functions=registry).start()
    print("provider ready", flush=True)
    done.wait(24 * 3600)
    client.close()
    return 0


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    system: str
    callers: int
    p50_us: float
    p99_us: float
    rate: float
    calls: int
    #: CPU µs per call in the window (user, system): router (relay or host), provider, callers.
    cpu_us: tuple[tuple[float, float], ...]
    #: CPU used by other processes of the machine in the window, in % of one CPU.
    others_pct: float

    def cpu_cell(self, i: int) -> str:
        """``"390 (31% sys)"``: CPU µs per call of process *i*, and its share in the kernel."""
        user, system = self.cpu_us[i]
        total = user + system
        return f"{total:4.0f} ({100 * system / total if total else 0:2.0f}% sys)"


def measure(
    system: Floor | AnvilNB,
    n: int,
    seconds: float,
    warmup: float,
    at_start: Callable[[], object] | None = None,
    at_end: Callable[[], object] | None = None,
) -> Result:
    """*n* callers, each on its own connection and thread, calling back to back.

    *at_start* and *at_end* are called when the measured window opens (after the warm-up) and
    when it closes.
    """
    conns: list[tuple[Callable[[], Any], Callable[[], None]]] = []
    latencies: list[list[float]] = [[] for _ in range(n)]
    errors: list[BaseException] = []
    go = threading.Barrier(n + 1)
    window: list[float] = []

    def run(i: int) -> None:
        call, out = conns[i][0], latencies[i]
        clock = time.perf_counter
        try:
            go.wait(60)
            start, end = window
            while True:
                t0 = clock()
                if t0 >= end:
                    return
                call()
                t1 = clock()
                if t0 >= start and t1 <= end:
                    out.append(t1 - t0)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(i,), name=f"caller-{i}", daemon=True) for i in range(n)
    ]
    try:
        conns += [system.connect(i) for i in range(n)]
        for t in threads:
            t.start()
        now = time.perf_counter()
        window[:] = [now + warmup, now + warmup + seconds]
        go.wait()
        time.sleep(max(0.0, window[0] - time.perf_counter()))
        busy0 = machine_busy_seconds()
        cpu0 = (system.router.cpu_seconds(), system.provider.cpu_seconds(), os.times()[:2])
        if at_start is not None:
            at_start()
        time.sleep(max(0.0, window[1] - time.perf_counter()))
        cpu1 = (system.router.cpu_seconds(), system.provider.cpu_seconds(), os.times()[:2])
        busy1 = machine_busy_seconds()
        if at_end is not None:
            at_end()
        for t in threads:
            t.join(seconds + warmup + 60)
    finally:
        for _, close in conns:
            close()
    if errors:
        raise RuntimeError(f"{system.name}: {len(errors)} caller(s) failed") from errors[0]
    flat = sorted(x for xs in latencies for x in xs)
    if not flat:
        raise RuntimeError(f"{system.name}: no call completed in the window")
    calls = len(flat)
    cpu = tuple(
        ((u1 - u0) / calls * 1e6, (s1 - s0) / calls * 1e6)
        for (u0, s0), (u1, s1) in zip(cpu0, cpu1, strict=True)
    )
    ours = sum(u1 - u0 + s1 - s0 for (u0, s0), (u1, s1) in zip(cpu0, cpu1, strict=True))
    return Result(
        system=system.name,
        callers=n,
        p50_us=statistics.median(flat) * 1e6,
        p99_us=flat[min(calls - 1, int(calls * 0.99))] * 1e6,
        rate=calls / seconds,
        calls=calls,
        cpu_us=cpu,
        others_pct=max(0.0, busy1 - busy0 - ours) / seconds * 100,
    )


def median_result(rs: list[Result]) -> Result:
    """The median of each figure over several rounds of one case."""

    def med(get: Callable[[Result], float]) -> float:
        return statistics.median(get(r) for r in rs)

    return Result(
        system=rs[0].system,
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
    )


# ---------------------------------------------------------------------------------------------
# Profiling

#: Modules whose inclusive times are listed below each profile's top self times.
_LISTED = ("client.py", "host.py", "uplink_ws.py", "websocket.py", "sessions.py", "serialise.py")


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
    rows.append(f"  -- highest inclusive in {', '.join(_LISTED)} --")
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
                frames.append((Path(where.rstrip(")").rsplit(":", 1)[0]).name, name))
        if not frames:
            continue
        k = int(count)
        total += k
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    functions = [[m, n, None, own.get((m, n), 0) / rate, k / rate] for (m, n), k in incl.items()]
    return {"total": total / rate, "functions": functions}


def profile(n: int, seconds: float, warmup: float, out: Path, top: int, profiler: str) -> None:
    """Measure anvil_nb again in fresh processes, profiling the host, the provider and the
    callers (this process) in the measured window.

    ``py-spy``: samples (250 Hz, ``--gil``: only the thread holding the GIL, so waiting is not
    counted, nor time in C code that releases the GIL: system calls, SQLite). ``yappi``: CPU
    clock, every thread and C function, exact but it slows Python code several times over.
    """
    out = out / f"anvil_nb-{n}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.json"), *out.glob("*.txt")]:
        stale.unlink()
    rate = 250
    spies: list[tuple[str, subprocess.Popen[Any]]] = []
    local: dict[str, Any] = {}
    if profiler == "yappi":
        import profiled  # noqa: PLC0415 - yappi only when profiling

        system = AnvilNB(profile_to=out)

        def begin() -> None:
            for p in system.procs:
                p.popen.send_signal(signal.SIGUSR1)
            profiled.start()

        def end() -> None:
            local.update(profiled.stop())
            for p in system.procs:
                p.popen.send_signal(signal.SIGUSR2)

    else:
        spy = str(Path(PYTHON).parent / "py-spy")
        if not Path(spy).exists():
            spy = shutil.which("py-spy") or ""
        if not spy:
            print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
            return
        system = AnvilNB()
        pids = {"host": system.router.pid, "provider": system.provider.pid, "callers": os.getpid()}

        def begin() -> None:
            for role, pid in pids.items():
                cmd = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--gil"]
                cmd += ["--nonblocking", "--format", "raw", "--output", str(out / f"{role}.txt")]
                cmd += ["--duration", str(max(1, int(seconds)))]
                quiet = subprocess.DEVNULL
                spies.append((role, _spawn(cmd, stdout=quiet, stderr=quiet)))

        def end() -> None:
            pass

    try:
        r = measure(system, n, seconds, warmup, at_start=begin, at_end=end)
        if profiler == "yappi":
            (out / "callers.json").write_text(json.dumps(local))
        deadline = time.monotonic() + seconds + 30
        for _, p in spies:
            p.wait(max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and not all(
            (out / f"{role}.json").exists() or (out / f"{role}.txt").exists()
            for role in ("host", "provider", "callers")
        ):
            time.sleep(0.1)
    finally:
        for _, p in spies:
            if p.poll() is None:
                p.kill()
        system.close()
    print(
        f"\n### Profile of anvil_nb, {n} caller(s), {profiler} "
        f"(under the profiler: p50 {r.p50_us:,.0f} µs, {r.rate:,.0f} calls/s)"
    )
    for role in ("host", "provider", "callers"):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="measured seconds per run (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="warm-up seconds before each run (default 1)"
    )
    parser.add_argument(
        "--callers",
        default="1,16",
        help="comma-separated numbers of concurrent callers (default 1,16)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="measure each case this many times, interleaved; the table shows medians (default 3)",
    )
    parser.add_argument(
        "--max-others",
        type=float,
        default=10.0,
        metavar="PCT",
        help="measure a case again (up to 3 times) when other processes used more than PCT%% "
        "of a CPU during it (default 10)",
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="also profile anvil_nb; raw profiles into DIR"
    )
    parser.add_argument(
        "--profiler",
        choices=["py-spy", "yappi"],
        default="py-spy",
        help="py-spy (sampling, default) or yappi (CPU clock, slows Python down)",
    )
    parser.add_argument(
        "--top", type=int, default=15, help="functions per process in the profile summary"
    )
    parser.add_argument("--serve-echo", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        return serve_echo(args.serve_echo)
    counts = [int(c) for c in args.callers.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--callers and --rounds need positive integers, --seconds a positive number")

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    print(f"machine: {os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}")
    print(
        f"callers: one thread and one connection each; {args.seconds:g} s measured after "
        f"{args.warmup:g} s warm-up; {args.rounds} round(s), medians shown\n"
    )

    rounds: dict[tuple[str, int], list[Result]] = collections.defaultdict(list)
    systems: list[Floor | AnvilNB] = []
    try:
        systems.append(Floor())
        systems.append(AnvilNB())
        for _ in range(args.rounds):
            for n in counts:
                for system in systems:
                    for attempt in range(4):
                        r = measure(system, n, args.seconds, args.warmup)
                        if r.others_pct <= args.max_others or attempt == 3:
                            break
                        print(
                            f"({system.name}, {n} caller(s): other processes used "
                            f"{r.others_pct:.0f}% of a CPU; measuring again)",
                            file=sys.stderr,
                        )
                    rounds[system.name, n].append(r)
        results = {key: median_result(rs) for key, rs in rounds.items()}
        print(
            "| system | callers | p50 µs | p99 µs | calls/s "
            "| CPU µs/call: router (host or relay) | provider | callers | other processes |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for n in counts:
            for system in systems:
                r = results[system.name, n]
                cells = " | ".join(r.cpu_cell(i) for i in range(3))
                print(
                    f"| {r.system} | {r.callers} | {r.p50_us:,.0f} | {r.p99_us:,.0f} "
                    f"| {r.rate:,.0f} | {cells} | {r.others_pct:.0f}% of a CPU |"
                )
        print("\nratios anvil_nb / floor (targets: p50 <= 1.5, calls/s >= 0.7)")
        for n in counts:
            a, f = results["anvil_nb", n], results["floor", n]
            p50, rate = a.p50_us / f.p50_us, a.rate / f.rate
            each = ", ".join(
                f"{ra.p50_us / rf.p50_us:.2f}/{ra.rate / rf.rate:.2f}"
                for ra, rf in zip(rounds["anvil_nb", n], rounds["floor", n], strict=True)
            )
            print(
                f"  {n:>2} caller(s): p50 {p50:.2f} ({'ok' if p50 <= 1.5 else 'MISSED'}), "
                f"calls/s {rate:.2f} ({'ok' if rate >= 0.7 else 'MISSED'});  "
                f"each round (p50/calls/s): {each}"
            )
        if args.profile:
            for system in systems:
                system.close()
            for n in counts:
                profile(n, args.seconds, args.warmup, Path(args.profile), args.top, args.profiler)
    finally:
        statuses = {}
        for system in reversed(systems):
            system.close()
            statuses.update({p.name: p.popen.returncode for p in system.procs})
        bad = {k: v for k, v in statuses.items() if v != 0}
        if bad:
            print(f"\nsubprocesses exited with a non-zero status: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
