"""Run a module or a script under yappi (CPU clock), profiling between SIGUSR1 and SIGUSR2.

Used by ``bench/bench_relay.py --profile --profiler yappi`` to profile the host, the provider
and the callers subprocesses in the measured window only::

    python bench/profiled.py OUT.json -m anvil_nb serve --port 0 ...
    python bench/profiled.py OUT.json bench/relay_peers.py provider --kind plain --url URL --key KEY

SIGUSR1 starts yappi (every thread, C functions included, CPU clock: time spent waiting is not
counted, time in system calls is); SIGUSR2 stops it and writes :func:`snapshot` to OUT.json.
The program runs as it would without this wrapper and exits with its own status.
"""

from __future__ import annotations

import json
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

import yappi

__all__ = ["snapshot", "start", "stop"]


def start() -> None:
    """Start profiling every thread of this process with the CPU clock."""
    yappi.stop()
    yappi.clear_stats()
    yappi.set_clock_type("cpu")
    yappi.start(builtins=True, profile_threads=True)


def stop() -> dict[str, Any]:
    """Stop profiling; the CPU seconds of each function (self and with callees) and the total."""
    yappi.stop()
    return snapshot()


def snapshot() -> dict[str, Any]:
    """``{"total": s, "functions": [[module, name, calls, self_s, incl_s], ...]}``; *module* is
    the last two parts of the module's path (``tornado/websocket.py``).
    """
    total = sum(t.ttot for t in yappi.get_thread_stats())
    functions = [
        ["/".join(Path(f.module).parts[-2:]) if f.module else "", f.name, f.ncall, f.tsub, f.ttot]
        for f in yappi.get_func_stats()
    ]
    return {"total": total, "functions": functions}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, target = Path(argv[0]), argv[1:]
    written = False

    def on_usr1(*_: object) -> None:
        start()

    def on_usr2(*_: object) -> None:
        nonlocal written
        out.write_text(json.dumps(stop()))
        written = True

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGUSR2, on_usr2)
    status: Any = 0
    try:
        if target[0] == "-m":
            sys.argv = target[1:]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = target
            sys.path.insert(0, str(Path(target[0]).resolve().parent))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exc:
        status = exc.code
    finally:
        if not written and yappi.is_running():
            out.write_text(json.dumps(stop()))
    return status if isinstance(status, int) else 0 if status is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
