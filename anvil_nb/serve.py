"""``anvil-nb serve``: the standalone host.

Listens on ``--host``/``--port`` (127.0.0.1 and 3030 by default; ``--port 0`` picks a free
port), serves the uplink WebSocket at ``/_/uplink``, and keeps sessions and the MAC key in the
data dir. Keys that are not given are taken from the data dir's ``keys.json``, or generated and
stored there (readable by the owner only), so scripts keep working across restarts; generated
keys are printed on stderr. Once it accepts connections it prints one line on stdout::

    anvil_nb host ready at http://127.0.0.1:3030/ (uplink ws://127.0.0.1:3030/_/uplink)

SIGINT or SIGTERM stop it: calls in flight fail with ``RuntimeUnavailableError``, connections
close, and it exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

import platformdirs
import tornado.httpserver
import tornado.ioloop
import tornado.netutil

from anvil_nb.app import make_app
from anvil_nb.host import Host
from anvil_nb.limits import Limits
from anvil_nb.protocol import DEFAULT_MAX_FRAME_BYTES
from anvil_nb.transports.uplink_ws import Keys

__all__ = ["main", "serve"]

log = logging.getLogger("anvil_nb.serve")

DEFAULT_PORT = 3030


def default_data_dir() -> Path:
    """The platform's user data folder for anvil_nb."""
    return Path(platformdirs.user_data_dir("anvil_nb", appauthor=False))


def load_keys(data_dir: Path, server_key: str | None, client_key: str | None) -> tuple[Keys, bool]:
    """The keys to use, and whether any was generated now."""
    path = data_dir / "keys.json"
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    generated = Keys.generate()
    keys = Keys(
        server_key or stored.get("server_key") or generated.server_key,
        client_key or stored.get("client_key") or generated.client_key,
    )
    if keys.server_key == keys.client_key:
        raise SystemExit("anvil-nb serve: the server key and the client key must differ")
    new = {"server_key": keys.server_key, "client_key": keys.client_key} != stored
    if new and not (server_key and client_key):
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"server_key": keys.server_key, "client_key": keys.client_key}, f)
    made = keys.server_key == generated.server_key or keys.client_key == generated.client_key
    return keys, made


async def serve(args: argparse.Namespace) -> int:
    """Run the host until SIGINT or SIGTERM."""
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    keys, generated = load_keys(data_dir, args.server_key, args.client_key)
    if generated:
        print(
            f"server key: {keys.server_key}\nclient key: {keys.client_key}",
            file=sys.stderr,
            flush=True,
        )
    limits = Limits(max_frame_bytes=args.max_frame_bytes)
    host = Host(data_dir=data_dir, call_timeout=args.call_timeout, limits=limits)
    host.client_key = keys.client_key
    app = make_app(host, keys, "/")
    sockets = tornado.netutil.bind_sockets(args.port, args.host)
    server = tornado.httpserver.HTTPServer(app, max_body_size=args.max_frame_bytes)
    server.add_sockets(sockets)
    port = sockets[0].getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    host.origin = f"http://{shown}:{port}"
    housekeeping = tornado.ioloop.PeriodicCallback(host.housekeeping, 60_000)
    housekeeping.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"anvil_nb host ready at http://{shown}:{port}/ (uplink ws://{shown}:{port}/_/uplink)",
        flush=True,
    )
    await stop.wait()
    log.info("stopping")
    housekeeping.stop()
    server.stop()
    host.close()
    try:
        await asyncio.wait_for(server.close_all_connections(), timeout=3)
    except asyncio.TimeoutError:
        log.warning("some connections did not close in time")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``anvil-nb`` command line."""
    parser = argparse.ArgumentParser(
        prog="anvil-nb", description="Anvil-style server functions, served from Jupyter."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="run a standalone host")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 picks a free one)",
    )
    s.add_argument("--server-key", help="uplink key for trusted (server) uplinks")
    s.add_argument("--client-key", help="uplink key for untrusted (client) uplinks")
    s.add_argument(
        "--data-dir", help=f"where sessions and keys are kept (default {default_data_dir()})"
    )
    s.add_argument(
        "--call-timeout",
        type=float,
        default=None,
        help="seconds before a call fails with TimeoutError",
    )
    s.add_argument(
        "--max-frame-bytes",
        type=int,
        default=DEFAULT_MAX_FRAME_BYTES,
        help="largest WebSocket frame accepted",
    )
    s.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return asyncio.run(serve(args))
