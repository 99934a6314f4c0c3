"""Benchmark of HTTP endpoints: anvil_nb against a bare tornado handler (the floor) and Jupyter
Kernel Gateway's notebook-http mode, serving the same small function.

Run: ``.venv/bin/python bench/bench_http.py`` (2-5 minutes; ``--quick`` for a smoke run of
1 round of 2 s). The first run also makes a venv for Kernel Gateway outside the checkout,
``platformdirs.user_cache_dir("anvil_nb")/bench-kg-venv``, from ``bench/requirements-kg.txt``
(``python -m venv`` + ``pip install -r``; made again when that file changes; ``--kg-venv DIR``
puts it elsewhere). Kernel Gateway is never a dependency of anvil_nb.

Options: ``--rounds 3 --seconds 5 --warmup 1 --connections 1,16 --systems floor,anvil_nb,kg``;
``--kg-kernels 1``, ``--kg-json``; ``--profile DIR [--profile-systems anvil_nb,floor]`` (py-spy,
in fresh processes).

Every system answers ``GET .../add/2/3`` with the JSON ``{"sum": 5}`` from a server process on
127.0.0.1, started fresh for the run and stopped at its end:

* **floor** (``bench/http_peers.py floor``): a bare tornado ``RequestHandler`` for
  ``GET /add/(.*)/(.*)`` answering ``orjson.dumps({"sum": a + b})``; one process;
* **anvil_nb**: ``python -m anvil_nb serve`` (a temporary data dir, random keys) and a
  kernel-like provider (``bench/http_peers.py provider``: ``kernel.join(url, server_key)`` and
  ``widgets.shared_feed()``, everything ``%load_ext anvil_nb`` turns on) serving
  ``@server.http_endpoint("/add/:a/:b")`` returning ``{"sum": int(a) + int(b)}``; requests go to
  ``http://127.0.0.1:P/_/api/add/2/3`` and over the uplink to the provider and back. CPU per
  request = host + provider;
* **kg**: ``jupyter kernelgateway --KernelGatewayApp.api=kernel_gateway.notebook_http`` on a
  notebook (a temporary dir) whose cell is the same function (``# GET /add/:a/:b``, reading
  ``REQUEST``, printing the JSON); Kernel Gateway's defaults otherwise: one kernel, answers typed
  ``text/plain`` (``--kg-kernels N`` prespawns N kernels; ``--kg-json`` adds a ``# ResponseInfo``
  cell setting ``Content-Type: application/json``, a third cell execution per request, after
  the one that sets ``REQUEST`` and the endpoint's). CPU per request = the gateway + its kernels.

The client (``bench/http_peers.py client``, a process of its own started for each measurement,
so its CPU is its own) opens N keep-alive HTTP/1.1 connections on one asyncio event loop
(``asyncio.Protocol``, TCP_NODELAY) and sends ``GET`` back to back on each, parsing status line,
headers and a Content-Length or chunked body by hand; the first response of each connection is
checked strictly, every later one must be a 200 with the same body (else it is an error, shown
in the table). Each system is waited for until a GET answers 200 before it is measured.

After a warm-up, requests that start and end in the measured window count: p50/p99 latency and
requests/s. The CPU each process used in the window (user + system, from ``/proc/PID/stat``) is
shown per request. Each round measures every system once per connection count, interleaved
(every other round in reverse order); the tables show medians over ``--rounds`` rounds and the
ratios against the issue's targets (anvil_nb at least 0.5 times the floor's requests/s and 20
times Kernel Gateway's, at the highest connection count) with each round's ratio. A measurement
during which other processes of the machine used more than ``--max-others`` % of a CPU is taken
again (up to ``--retries`` times) and the least disturbed one is kept.

``--profile DIR``: anvil_nb (and, with ``--profile-systems``, the floor) is run again in fresh
processes and its server processes are profiled with py-spy (250 Hz, ``--gil``) in one measured
window at the highest connection count; each one's time by where it goes (:data:`BREAKDOWN`) and
its top functions are printed, raw profiles go to DIR. ``--rounds 0`` skips the table.

Every process is stopped at the end, also on errors and Ctrl-C (stdin closed, SIGTERM, SIGKILL
after 10 s; Kernel Gateway's kernel too); nothing is written into the checkout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_relay
import platformdirs
from bench_relay import PYTHON, Proc, machine_busy_seconds, stacks_to_stats, summarise

HERE = Path(__file__).resolve().parent
PEERS = str(HERE / "http_peers.py")
REQUIREMENTS = HERE / "requirements-kg.txt"
EXPECT = {"sum": 5}
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# The endpoint modules join the ones whose inclusive times the profiles list.
bench_relay._LISTED = (
    *bench_relay._LISTED,
    "web/api.py",
    "host/endpoints.py",
    "host/http.py",
    "host/state.py",
    "client/endpoints.py",
    "bench/http_peers.py",
)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time a process used so far, all threads (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan"), float("nan")
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux /proc)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(x) for x in (task / "children").read_text().split()]
    return found


class Spawned:
    """A subprocess that says nothing useful on stdout (Kernel Gateway): its output goes to a
    log file; it stops like a :class:`~bench_relay.Proc` (stdin closed, SIGTERM, SIGKILL).
    """

    def __init__(self, name: str, cmd: Sequence[str], log: Path, env: dict[str, str]):
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.popen = bench_relay._spawn(
                cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.pid = self.popen.pid

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        p = self.popen
        with contextlib.suppress(OSError):
            if p.stdin is not None:
                p.stdin.close()
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        Proc.statuses[self.name] = p.returncode
        return p.returncode


def _kill_if_alive(pid: int, name: str) -> None:
    """SIGTERM, then SIGKILL after 5 s, a process this bench started indirectly (a kernel)."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
                return
            time.sleep(0.05)
    print(f"({name}, pid {pid}, did not stop)", file=sys.stderr)


def _is_zombie(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def wait_ok(url: str, alive: Callable[[], bool], timeout: float = 60.0) -> None:
    """GET *url* until it answers 200 with the expected JSON (or *alive* says no, or time's up)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server of {url} exited before answering ({last})")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = r.read()
                if r.status == 200 and json.loads(body) == EXPECT:
                    return
                last = f"status {r.status}, body {body[:200]!r}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except (OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s ({last})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (for a server that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Kernel Gateway's venv


def default_kg_venv() -> Path:
    return Path(platformdirs.user_cache_dir("anvil_nb", appauthor=False)) / "bench-kg-venv"


def ensure_kg_venv(root: Path) -> Path:
    """The venv Kernel Gateway runs from, made (or made again) from ``requirements-kg.txt``."""
    want = REQUIREMENTS.read_text()
    stamp = root / "bench-requirements.txt"
    gateway = root / "bin" / "jupyter-kernelgateway"
    if gateway.exists() and stamp.exists() and stamp.read_text() == want:
        return root
    print(f"(making Kernel Gateway's venv in {root}: a minute or so)", file=sys.stderr, flush=True)
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([PYTHON, "-m", "venv", str(root)], check=True)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-qq"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(want)
    return root


def kg_version(root: Path) -> str:
    out = subprocess.run(
        [str(root / "bin" / "python"), "-c", "import kernel_gateway; print(kernel_gateway.__version__)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return out.stdout.strip() or "?"


@dataclass(frozen=True)
class KgOptions:
    """How Kernel Gateway is run: its venv, its kernels, whether it answers with a JSON type."""

    venv: Path
    #: ``--KernelGatewayApp.prespawn_count``: the kernels requests are shared among (KG's
    #: default, with no prespawn count, is one).
    kernels: int = 1
    #: Add a ``# ResponseInfo`` cell setting ``Content-Type: application/json`` (the other
    #: systems' type); it is a third execution per request, so it is off by default (answers
    #: are ``text/plain``, Kernel Gateway's default type).
    json_type: bool = False


#: The notebook Kernel Gateway serves: the same function as the other systems'.
KG_CELLS = (
    "import json",
    "# GET /add/:a/:b\n"
    "req = json.loads(REQUEST)\n"
    'print(json.dumps({"sum": int(req["path"]["a"]) + int(req["path"]["b"])}))',
)
KG_RESPONSE_INFO = (
    "# ResponseInfo GET /add/:a/:b\n"
    'print(json.dumps({"headers": {"Content-Type": "application/json"}, "status": 200}))'
)


def kg_notebook(json_type: bool) -> dict[str, Any]:
    sources = [*KG_CELLS, KG_RESPONSE_INFO] if json_type else list(KG_CELLS)
    cells = [
        {"cell_type": "code", "id": f"cell{i}", "metadata": {}, "execution_count": None,
         "outputs": [], "source": src}
        for i, src in enumerate(sources)
    ]  # fmt: skip
    spec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return {"cells": cells, "metadata": {"kernelspec": spec}, "nbformat": 4, "nbformat_minor": 5}


# ---------------------------------------------------------------------------------------------
# Systems


@dataclass
class System:
    """A server (one process or several) answering ``GET url`` with ``{"sum": 5}``."""

    key: str
    label: str
    url: str = ""
    #: The processes whose CPU counts, by role.
    pids: dict[str, int] = field(default_factory=dict)
    stops: list[Callable[[], Any]] = field(default_factory=list)
    said: list[str] = field(default_factory=list)

    def close(self) -> None:
        for stop in reversed(self.stops):
            try:
                stop()
            except Exception as exc:  # stop the others all the same
                print(f"({self.key}: stopping failed: {exc!r})", file=sys.stderr)
        self.stops.clear()


LABELS = {
    "floor": "bare tornado handler (floor)",
    "anvil_nb": "anvil_nb (host + kernel-like provider)",
    "kg": "Kernel Gateway notebook-http",
}


def _start_floor(s: System) -> None:
    floor = Proc("floor", [PYTHON, PEERS, "floor", "--port", "0"], "floor ready at ")
    s.stops.append(floor.stop)
    s.pids["server"] = floor.pid
    s.url = floor.ready_line.rsplit(" ", 1)[1] + "/add/2/3"
    wait_ok(s.url, lambda: floor.popen.poll() is None)


def _start_anvil(s: System) -> None:
    tmp = tempfile.TemporaryDirectory(prefix="anvil_nb-bench-http-")
    s.stops.append(tmp.cleanup)
    server_key, client_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    serve = [PYTHON, "-m", "anvil_nb", "serve", "--host", "127.0.0.1", "--port", "0"]
    serve += ["--server-key", server_key, "--client-key", client_key, "--data-dir", tmp.name]
    host = Proc("anvil_nb host", serve, "anvil_nb host ready at ")
    s.stops.append(host.stop)
    s.pids["host"] = host.pid
    # "anvil_nb host ready at http://127.0.0.1:P/ (uplink ws://127.0.0.1:P/_/uplink)"
    base = host.ready_line.split(" ready at ", 1)[1].split(" ", 1)[0].rstrip("/")
    uplink = host.ready_line.rsplit("uplink ", 1)[1].rstrip(")")
    cmd = [PYTHON, PEERS, "provider", "--url", uplink, "--key", server_key]
    provider = Proc("anvil_nb provider", cmd, "provider ready")
    s.stops.append(lambda: (provider.stop(), s.said.extend(provider.said)))
    s.pids["provider"] = provider.pid
    s.url = base + "/_/api/add/2/3"
    wait_ok(s.url, lambda: host.popen.poll() is None and provider.popen.poll() is None)


def _start_kg(s: System, kg: KgOptions) -> None:
    tmp = tempfile.TemporaryDirectory(prefix="anvil_nb-bench-kg-")
    s.stops.append(tmp.cleanup)
    root = Path(tmp.name)
    notebook = root / "add.ipynb"
    notebook.write_text(json.dumps(kg_notebook(kg.json_type)))
    venv = kg.venv
    env = dict(os.environ)
    for var, sub in (("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_CONFIG_DIR", "config"), ("IPYTHONDIR", "ipython")):  # fmt: skip
        env[var] = str(root / sub)
    env.pop("JUPYTER_PATH", None)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    port = free_port()
    cmd = [str(venv / "bin" / "jupyter-kernelgateway")]
    cmd += ["--KernelGatewayApp.api=kernel_gateway.notebook_http"]
    cmd += [f"--KernelGatewayApp.seed_uri={notebook}", f"--KernelGatewayApp.port={port}"]
    cmd += ["--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.prespawn_count={kg.kernels}"]
    gateway = Spawned("kernel gateway", cmd, root / "kg.log", env)
    kernels: list[int] = []

    def stop() -> None:
        kernels.extend(k for k in children(gateway.pid) if k not in kernels)
        status = gateway.stop()
        for k in kernels:
            _kill_if_alive(k, "Kernel Gateway's kernel")
        if status not in (0, -signal.SIGTERM):
            s.said.append(f"kernel gateway exited with status {status}:\n{gateway.tail()}")

    s.stops.append(stop)
    s.pids["gateway"] = gateway.pid
    s.url = f"http://127.0.0.1:{port}/add/2/3"
    try:
        wait_ok(s.url, lambda: gateway.popen.poll() is None, timeout=90)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nKernel Gateway's log:\n{gateway.tail()}") from None
    deadline = time.monotonic() + 60
    while len(children(gateway.pid)) < kg.kernels and time.monotonic() < deadline:
        time.sleep(0.1)  # the other prespawned kernels may still be starting
    kernels += children(gateway.pid)
    if len(kernels) != kg.kernels:
        raise RuntimeError(
            f"Kernel Gateway has {len(kernels)} child processes, expected {kg.kernels} kernel(s)"
        )
    for i, pid in enumerate(kernels):
        s.pids["kernel" if kg.kernels == 1 else f"kernel {i + 1}"] = pid


def start_system(key: str, kg: KgOptions | None) -> System:
    s = System(key, LABELS[key])
    try:
        if key == "floor":
            _start_floor(s)
        elif key == "anvil_nb":
            _start_anvil(s)
        else:
            assert kg is not None
            _start_kg(s, kg)
    except BaseException:
        s.close()
        raise
    return s


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Result:
    system: str
    connections: int
    p50_us: float
    p99_us: float
    rate: float
    calls: int
    errors: int
    #: CPU µs per request in the window, (user, system), by role; the client's last.
    cpu_us: dict[str, tuple[float, float]]
    #: CPU used by other processes of the machine in the window, in % of one CPU.
    others_pct: float
    req_bytes: int = 0
    resp_bytes: int = 0
    first_error: str = ""

    def cpu(self, role: str) -> float:
        u, s = self.cpu_us[role]
        return u + s

    def server_cpu(self) -> float:
        return sum(self.cpu(role) for role in self.cpu_us if role != "client")


def measure(
    system: System,
    n: int,
    seconds: float,
    warmup: float,
    at_start: Callable[[], None] | None = None,
) -> Result:
    """*n* connections of a fresh client process sending ``GET`` to *system* back to back."""
    cmd = [PYTHON, PEERS, "client", "--url", system.url, "-n", str(n)]
    cmd += ["--expect", json.dumps(EXPECT)]
    client = Proc(f"client ({system.key}, {n})", cmd, "client ready")
    pids = {**system.pids, "client": client.pid}
    try:
        start = time.monotonic() + warmup
        end = start + seconds
        client.send(f"run {start!r} {end!r}")
        time.sleep(max(0.0, start - time.monotonic()))
        busy0 = machine_busy_seconds()
        cpu0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        if at_start is not None:
            at_start()
        time.sleep(max(0.0, end - time.monotonic()))
        cpu1 = {role: cpu_seconds(pid) for role, pid in pids.items()}
        busy1 = machine_busy_seconds()
        data = json.loads(client.expect("result ", seconds + 120).split(" ", 1)[1])
    finally:
        client.stop(grace=10)
    calls = data["calls"]
    if not calls:
        raise RuntimeError(
            f"{system.key}, {n} connection(s): no request completed in the window "
            f"({data.get('errors')} errors, first: {data.get('first_error')})"
        )
    cpu = {
        role: ((cpu1[role][0] - u0) / calls * 1e6, (cpu1[role][1] - s0) / calls * 1e6)
        for role, (u0, s0) in cpu0.items()
    }
    ours = sum(cpu1[r][0] - u0 + cpu1[r][1] - s0 for r, (u0, s0) in cpu0.items())
    return Result(
        system=system.key,
        connections=n,
        p50_us=data["p50_us"],
        p99_us=data["p99_us"],
        rate=calls / seconds,
        calls=calls,
        errors=data["errors"],
        first_error=data["first_error"],
        cpu_us=cpu,
        others_pct=max(0.0, busy1 - busy0 - ours) / seconds * 100,
        req_bytes=data["req_bytes"],
        resp_bytes=data["resp_bytes"],
    )


def median_result(rs: list[Result]) -> Result:
    """The median of each figure over several rounds of one system (errors: the sum)."""

    def med(get: Callable[[Result], float]) -> float:
        return statistics.median(get(r) for r in rs)

    first = rs[0]
    return Result(
        system=first.system,
        connections=first.connections,
        p50_us=med(lambda r: r.p50_us),
        p99_us=med(lambda r: r.p99_us),
        rate=med(lambda r: r.rate),
        calls=round(med(lambda r: r.calls)),
        errors=sum(r.errors for r in rs),
        first_error=next((r.first_error for r in rs if r.first_error), ""),
        cpu_us={
            role: (med(lambda r, k=role: r.cpu_us[k][0]), med(lambda r, k=role: r.cpu_us[k][1]))
            for role in first.cpu_us
        },
        others_pct=med(lambda r: r.others_pct),
        req_bytes=first.req_bytes,
        resp_bytes=first.resp_bytes,
    )


def run_rounds(
    keys: Sequence[str], counts: list[int], args: argparse.Namespace, notes: list[str]
) -> dict[tuple[str, int], list[Result]]:
    """Every system once per round and connection count, interleaved; results round by round."""
    rounds: dict[tuple[str, int], list[Result]] = collections.defaultdict(list)
    systems: dict[str, System] = {}
    try:
        for key in keys:
            systems[key] = start_system(key, args.kg)
        for i in range(args.rounds):
            order = list(keys) if i % 2 == 0 else list(reversed(keys))
            for n in counts:
                for key in order:
                    tries: list[Result] = []
                    for attempt in range(args.retries + 1):
                        tries.append(measure(systems[key], n, args.seconds, args.warmup))
                        if tries[-1].others_pct <= args.max_others or attempt == args.retries:
                            break
                        print(
                            f"({key}, {n} connection(s): other processes used "
                            f"{tries[-1].others_pct:.0f}% of a CPU; measuring again)",
                            file=sys.stderr,
                        )
                    r = min(tries, key=lambda t: t.others_pct)
                    rounds[key, n].append(r)
                    cpu = ", ".join(f"{role} {r.cpu(role):,.0f}" for role in r.cpu_us)
                    print(
                        f"round {i + 1}/{args.rounds}: {key:>8} @{n:<2}  p50 {r.p50_us:8,.0f} µs"
                        f"  {r.rate:7,.0f} req/s  CPU µs/req: {cpu}  errors {r.errors}  "
                        f"others {r.others_pct:.0f}%",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        for system in systems.values():
            system.close()
            notes.extend(f"{system.key}: {line}" for line in system.said)
    return rounds


# ---------------------------------------------------------------------------------------------
# Reporting

#: (name, numerator, denominator, figure, target): the issue's targets, at the highest count.
RATIOS: tuple[tuple[str, str, str, str, tuple[str, float] | None], ...] = (
    ("req/s @{hi}: anvil_nb / floor", "anvil_nb", "floor", "rate", (">=", 0.5)),
    ("req/s @{hi}: anvil_nb / Kernel Gateway", "anvil_nb", "kg", "rate", (">=", 20.0)),
    ("p50 @{lo}: anvil_nb / floor", "anvil_nb", "floor", "p50_lo", None),
    ("p50 @{lo}: Kernel Gateway / anvil_nb", "kg", "anvil_nb", "p50_lo", None),
    ("CPU µs/request @{hi} (servers): anvil_nb / floor", "anvil_nb", "floor", "cpu", None),
)


def _figure(
    results: dict[tuple[str, int], Result], key: str, figure: str, lo: int, hi: int
) -> float:
    if figure == "p50_lo":
        return results[key, lo].p50_us
    r = results[key, hi]
    return r.rate if figure == "rate" else r.server_cpu()


def _cpu_cell(r: Result) -> str:
    roles = [role for role in r.cpu_us if role != "client"]
    parts = [f"{role} {r.cpu(role):,.0f}" for role in roles]
    total = f" = {r.server_cpu():,.0f}" if len(roles) > 1 else ""
    return ", ".join(parts) + total + f"; client {r.cpu('client'):,.0f}"


def print_tables(
    keys: Sequence[str], counts: list[int], rounds: dict[tuple[str, int], list[Result]]
) -> None:
    results = {k: median_result(rs) for k, rs in rounds.items()}
    lo, hi = min(counts), max(counts)
    nrounds = len(next(iter(rounds.values())))
    print(f"## Summary ({nrounds} interleaved round(s), medians)\n")
    print(
        f"| system | p50 µs @{lo} | req/s @{hi} | CPU µs/request @{hi} (server processes; client) |"
    )
    print("| --- | ---: | ---: | --- |")
    for key in keys:
        a, b = results[key, lo], results[key, hi]
        print(f"| {LABELS[key]} | {a.p50_us:,.0f} | {b.rate:,.0f} | {_cpu_cell(b)} |")
    print("\n## All figures (medians)\n")
    print(
        "| system | connections | p50 µs | p99 µs | req/s | CPU µs/request (user+sys, "
        "sys share) | errors | other processes |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for n in counts:
        for key in keys:
            r = results[key, n]
            cpu = ", ".join(
                f"{role} {r.cpu(role):,.0f} ({100 * r.cpu_us[role][1] / r.cpu(role):.0f}% sys)"
                if r.cpu(role) > 0
                else f"{role} 0"
                for role in r.cpu_us
            )
            print(
                f"| {LABELS[key]} | {n} | {r.p50_us:,.0f} | {r.p99_us:,.0f} | {r.rate:,.0f} "
                f"| {cpu} | {r.errors} | {r.others_pct:.0f}% of a CPU |"
            )
    print(
        "\nbytes on the wire (request / response, headers included): "
        + ", ".join(f"{k} {results[k, lo].req_bytes} / {results[k, lo].resp_bytes}" for k in keys)
    )
    for key in keys:
        for n in counts:
            if results[key, n].errors:
                print(
                    f"\n**{key} @{n}: {results[key, n].errors} errors** "
                    f"(first: {results[key, n].first_error})"
                )
    print("\n## Ratios against the issue's targets (ratio of medians; then each round)\n")
    print("| ratio | value | target | | each round |")
    print("| --- | ---: | --- | --- | --- |")
    if not any(num in keys and den in keys for _, num, den, *_ in RATIOS):
        print("| (none: every ratio compares two of the systems measured) | | | | |")
    for name, num, den, figure, target in RATIOS:
        if num not in keys or den not in keys:
            continue
        value = _figure(results, num, figure, lo, hi) / _figure(results, den, figure, lo, hi)
        n = lo if figure == "p50_lo" else hi
        each = ", ".join(
            f"{_figure({(num, n): a}, num, figure, n, n) / _figure({(den, n): b}, den, figure, n, n):.2f}"
            for a, b in zip(rounds[num, n], rounds[den, n], strict=True)
        )
        if target is None:
            want, verdict = "(none)", ""
        else:
            op, x = target
            ok = value <= x if op == "<=" else value >= x
            want, verdict = f"{op} {x:g}", "met" if ok else "**MISSED**"
        print(f"| {name.format(lo=lo, hi=hi)} | {value:.2f} | {want} | {verdict} | {each} |")


# ---------------------------------------------------------------------------------------------
# Profiling


#: Where a profiled process's time goes, by the code a sample is in. A host stack that passes
#: through the uplink's WebSocket code counts there; any other goes to the category of its
#: innermost frame that names one (so tornado's writes on behalf of anvil_nb's code count as
#: tornado's, and ``loop.call_soon`` from the dispatcher as the event loop's).
_TORNADO_HTTP = ("tornado/http1connection.py", "tornado/web.py", "tornado/httputil.py",
                 "tornado/iostream.py", "tornado/routing.py", "tornado/httpserver.py",
                 "tornado/escape.py", "tornado/gen.py", "tornado/concurrent.py",
                 "tornado/ioloop.py", "email/utils.py", "http_peers.py")  # fmt: skip
_LOOP = ("asyncio/", "selectors.py")
BREAKDOWN: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "host": (
        ("uplink WebSocket frames (tornado websocket, web/uplink)",
         ("tornado/websocket.py", "web/uplink.py")),
        ("KeyRing.names (the app check of each request)", ("anvil_nb/config.py",)),
        ("dispatcher (routing the call and its answer)",
         ("host/dispatcher.py", "host/state.py", "host/registry.py", "core/protocol.py",
          "core/capability.py", "core/limits.py")),
        ("endpoint door (kwargs, fresh session, serialise, render)",
         ("host/endpoints.py", "host/http.py", "host/sessions.py", "core/serialise.py")),
        ("web/api.py (request to Incoming, reply to tornado)", ("web/api.py",)),
        ("tornado HTTP server (parse, route, handler, write)", _TORNADO_HTTP),
        ("event loop (select, callbacks, tasks)", _LOOP),
    ),
    "provider": (
        ("thread hand-offs (pool submit, worker wake-up, back to the loop)",
         ("futures/thread.py", "futures/_base.py", "asyncio/messages.py", "threading.py",
          "_read_from_self", "call_soon_threadsafe", "run_coroutine_threadsafe")),
        ("widget feed and events", ("widgets/", "core/events.py", "reprlib.py")),
        ("endpoint wrapper and the function", ("client/endpoints.py", "http_peers.py")),
        ("client logic (context, (de)serialise, answer)",
         ("client/client.py", "client/capture.py", "core/")),
        ("WebSocket I/O (websockets, the transport)", ("websockets/", "client/websocket.py")),
        ("event loop (select, callbacks)", _LOOP),
    ),
    "server": (
        ("tornado HTTP server (parse, route, handler, write)", _TORNADO_HTTP),
        ("event loop (select, callbacks, tasks)", _LOOP),
    ),
}  # fmt: skip


def breakdown(raw: Path, role: str, calls: int, rate: int) -> str:
    """py-spy's raw stacks of one process summed by :data:`BREAKDOWN`'s categories."""
    rules = BREAKDOWN.get(role)
    if not rules or not calls:
        return ""
    # The uplink's frames count wherever their stack goes (a stack through it is the uplink's).
    priority = rules[0] if role == "host" else None
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, k = line.rpartition(" ")
        if not stack or not k.isdigit():
            continue
        if priority is not None and any(p in stack for p in priority[1]):
            counts[priority[0]] += int(k)
            continue
        for frame in reversed(stack.split(";")):
            hit = next((name for name, pats in rules if any(p in frame for p in pats)), None)
            if hit is not None:
                counts[hit] += int(k)
                break
        else:
            counts["other"] += int(k)
    total = sum(counts.values())
    rows = [f"  breakdown: {total / rate / calls * 1e6:.0f} µs per request sampled"]
    rows += [
        f"  {100 * k / total:5.1f}% {k / rate / calls * 1e6:6.1f} µs  {name}"
        for name, k in counts.most_common()
    ]
    return "\n".join(rows)


def profile(
    key: str, n: int, seconds: float, warmup: float, out: Path, top: int, kg: KgOptions | None
) -> None:
    """Measure *key* again in fresh processes, its server processes under py-spy."""
    spy = bench_relay._py_spy()
    if not spy:
        print("py-spy is not installed (pip install -e '.[bench]'): no profile", file=sys.stderr)
        return
    out = out / f"http-{key}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.txt"):
        stale.unlink()
    rate = 250
    spies: list[subprocess.Popen[Any]] = []
    system = start_system(key, kg)
    roles = dict(system.pids)

    def begin() -> None:
        for role, pid in roles.items():
            cmd = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--gil", "--nonblocking"]
            cmd += ["--format", "raw", "--output", str(out / f"{role}.txt")]
            cmd += ["--duration", str(max(1, int(seconds)))]
            quiet = subprocess.DEVNULL
            spies.append(bench_relay._spawn(cmd, stdout=quiet, stderr=quiet))

    try:
        r = measure(system, n, seconds, warmup, at_start=begin)
        deadline = time.monotonic() + seconds + 30
        for p in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(max(0.1, deadline - time.monotonic()))
    finally:
        for p in spies:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        system.close()
    print(
        f"\n### Profile: {LABELS[key]}, {n} connection(s), py-spy --gil "
        f"(under the profiler: p50 {r.p50_us:,.0f} µs, {r.rate:,.0f} req/s; "
        f"CPU µs/request {_cpu_cell(r)})"
    )
    for role in roles:
        raw = out / f"{role}.txt"
        if raw.exists():
            print(f"\n{role} ({raw}):")
            print(breakdown(raw, role, r.calls, rate))
            print(summarise(stacks_to_stats(raw, rate), r.calls, top))
        else:
            print(f"\n{role}: no profile written")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per run (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per run (1)")
    parser.add_argument("--connections", default="1,16", help="numbers of connections (1,16)")
    parser.add_argument("--systems", default="floor,anvil_nb,kg", help="of floor,anvil_nb,kg (all)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; medians shown (3; 0: none)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 round of 2 s, 0.5 s warm-up"
    )
    parser.add_argument(
        "--max-others", type=float, default=15.0, metavar="PCT",
        help="measure again (up to --retries times) when other processes used more than PCT%% "
        "of a CPU, and keep the least disturbed measurement (15)",
    )  # fmt: skip
    parser.add_argument("--retries", type=int, default=2, help="measurements again at most (2)")
    parser.add_argument(
        "--kg-venv", type=Path, default=None,
        help="Kernel Gateway's venv (default: the user cache dir's anvil_nb/bench-kg-venv)",
    )  # fmt: skip
    parser.add_argument(
        "--kg-kernels", type=int, default=1,
        help="Kernel Gateway's kernels (--KernelGatewayApp.prespawn_count; 1, its default)",
    )  # fmt: skip
    parser.add_argument(
        "--kg-json", action="store_true",
        help="give Kernel Gateway's notebook a ResponseInfo cell (Content-Type: application/json; "
        "a third cell execution per request)",
    )  # fmt: skip
    parser.add_argument("--profile", metavar="DIR", help="also profile; raw profiles into DIR")
    parser.add_argument(
        "--profile-systems", default="anvil_nb", help="systems --profile profiles (anvil_nb)"
    )
    parser.add_argument("--top", type=int, default=15, help="functions per process in profiles")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup = min(args.rounds, 1), 2.0, 0.5
    counts = [int(c) for c in args.connections.split(",") if c.strip()]
    keys = [k.strip() for k in args.systems.split(",") if k.strip()]
    profiled = [k.strip() for k in args.profile_systems.split(",") if k.strip()]
    if not counts or min(counts) < 1 or args.seconds <= 0 or args.rounds < 0 or args.retries < 0:
        parser.error("--connections needs positive integers, --seconds a positive number")
    if not keys or any(k not in LABELS for k in [*keys, *profiled]):
        parser.error(f"--systems: choose among {', '.join(LABELS)}")
    args.kg = None
    if args.kg_kernels < 1:
        parser.error("--kg-kernels needs a positive integer")
    if ("kg" in keys and args.rounds) or (args.profile and "kg" in profiled):
        venv = ensure_kg_venv(args.kg_venv or default_kg_venv())
        args.kg = KgOptions(venv, kernels=args.kg_kernels, json_type=args.kg_json)

    import tornado  # noqa: PLC0415 - only for the versions line

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")
    kg = ""
    if args.kg is not None:
        kg = f", Kernel Gateway {kg_version(args.kg.venv)} ({args.kg.kernels} kernel(s)"
        kg += ", a ResponseInfo cell)" if args.kg.json_type else ", text/plain answers)"
    spec = importlib.util.find_spec("anvil_nb")
    where = Path(spec.origin).parent.parent if spec is not None and spec.origin else "?"
    print(
        f"machine: {os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}, "
        f"tornado {tornado.version}{kg}; anvil_nb from {where}"
    )
    try:
        if args.rounds:
            print(
                f"{args.seconds:g} s measured after {args.warmup:g} s warm-up; {args.rounds} "
                f"interleaved round(s); a fresh client process per measurement\n"
            )
            notes: list[str] = []
            rounds = run_rounds(keys, counts, args, notes)
            print_tables(keys, counts, rounds)
            for note in notes:
                print(f"\n({note})")
        if args.profile:
            for key in profiled:
                profile(key, max(counts), args.seconds, args.warmup, Path(args.profile), args.top,
                        args.kg)  # fmt: skip
    finally:
        bad = {k: v for k, v in Proc.statuses.items() if v not in (0, -signal.SIGTERM)}
        if bad:
            print(f"\nsubprocesses exited with a non-zero status: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
