"""``anvil-nb serve``, ``anvil-nb keys`` and ``anvil-nb users``: the standalone host, the keys
of its apps, and their users.

``anvil-nb serve`` serves every app whose keys are kept in the data dir (DESIGN.md, "Apps"):
the uplink key a script connects with selects its app, so two apps may both define ``greet``.
``--server-key`` and ``--client-key`` set the keys of ``default``. ``anvil-nb keys [APP]``
prints an app's keys, making the app (and its keys, kept in ``DATA_DIR/apps/APP/keys.json``)
if it is new; a running host knows it from its next connection on.

Listens on ``--host``/``--port`` (127.0.0.1 and 3030 by default; ``--port 0`` picks a free
port), serves the uplink WebSocket at ``/_/uplink``, and keeps sessions and the MAC key in the
data dir. Keys that are not given are taken from the data dir's ``keys.json``, or generated and
stored there (readable by the owner only), so scripts keep working across restarts; generated
keys are printed on stderr. Once it accepts connections it prints one line on stdout::

    anvil_nb host ready at http://127.0.0.1:3030/ (uplink ws://127.0.0.1:3030/_/uplink)

``anvil-nb users add EMAIL --password-stdin`` signs a user up (the password is standard input
without its one trailing newline: it never appears on a command line), ``anvil-nb users list``
shows an app's users (never a hash), ``anvil-nb users disable EMAIL`` and ``enable EMAIL``
turn an account off and on; each takes ``--app`` and ``--data-dir``, and works on the app's
database (``app.sqlite3`` in the app's folder) whether or not a host is running. A failure
prints ``anvil-nb users: <message>`` on stderr and exits with status 1 (2 for a usage error).

SIGINT or SIGTERM stop it: calls in flight fail with ``RuntimeUnavailableError``, connections
close, and it exits with status 0.

What one connection may cost is bounded by one :class:`~anvil_nb.core.limits.Limits`, built from the
command line (``--max-frame-bytes``, ``--max-calls-in-flight``, ``--max-queued-bytes``,
``--handshake-timeout``, ``--ping-interval``, ``--ping-timeout``); the listener
(:mod:`anvil_nb.web.listener`) closes connections that never finish their HTTP request
and backs off from accept errors such as running out of file descriptors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import json
import logging
import platform
import signal
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from anvil_nb.config import DEFAULT_APP, KeyRing, app_database, app_name, default_data_dir
from anvil_nb.core.errors import AnvilError
from anvil_nb.core.limits import DEFAULT_LIMITS, Limits
from anvil_nb.host.users import NoSuchUser, SQLiteUserStore, UserRecord, Users
from anvil_nb.web.service import HostService

__all__ = ["main", "serve", "users_command"]

log = logging.getLogger("anvil_nb.cli")

DEFAULT_PORT = 3030


#: glibc's ``mallopt`` parameter for the size from which allocations get their own mapping.
_M_MMAP_THRESHOLD = -3


def _return_large_buffers_to_the_os(threshold: int = 256 * 1024) -> None:
    """Make glibc give large freed buffers back to the OS at once (Linux with glibc only).

    glibc raises its mmap threshold (up to 32 MiB) each time a large mapped block is freed, so
    after a burst of large frames (orjson reserves several times a long string's length while
    encoding it), the next megabyte-sized buffers come from the heap, where a few long-lived
    ones (frames waiting for a slow reader) keep everything between them resident: measured,
    a slow consumer's 32 MiB of queued frames held 275 MiB. A fixed threshold keeps each large
    buffer in its own mapping, returned when freed.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc after all
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, threshold)


def limits_from(args: argparse.Namespace) -> Limits:
    """The host's :class:`Limits` from the command line."""
    return replace(DEFAULT_LIMITS, **{name: getattr(args, name) for name, _, _ in _BOUND_FLAGS})


async def serve(args: argparse.Namespace) -> int:
    """Run the host until SIGINT or SIGTERM."""
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        keyring = KeyRing(data_dir, args.server_key, args.client_key)
    except ValueError as exc:
        print(f"anvil-nb serve: {exc}", file=sys.stderr)
        return 2
    keys = keyring.default
    if keyring.generated_default:
        print(
            f"server key: {keys.server_key}\nclient key: {keys.client_key}",
            file=sys.stderr,
            flush=True,
        )
    _return_large_buffers_to_the_os()
    service = HostService(
        keyring, data_dir=data_dir, limits=limits_from(args), call_timeout=args.call_timeout
    )
    port = service.listen(args.host, args.port)
    service.start()
    shown = f"[{args.host}]" if ":" in args.host else args.host
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
    service.stop()
    await service.close_connections(3.0)
    return 0


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _non_negative(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value >= 0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be 0 or more: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


#: The flags of the bounds: the Limits field, how to parse it, and what it means.
_BOUND_FLAGS = (
    ("max_frame_bytes", _positive(int), "largest WebSocket frame accepted or sent"),
    (
        "max_calls_in_flight",
        _positive(int),
        "calls one connection may have waiting at once; more fail with QuotaExceededError",
    ),
    (
        "max_queued_bytes",
        _positive(int),
        "bytes sent to a connection that it has not read yet; past this the host stops reading "
        "from it, refuses its calls and fails the responses it is waiting for",
    ),
    (
        "max_http_body_bytes",
        _positive(int),
        "largest request body an HTTP endpoint accepts; a larger one gets 413 from its headers",
    ),
    (
        "handshake_timeout",
        _non_negative(float),
        "seconds a new connection has to send its HTTP request and then its uplink key before "
        "it is closed; 0: no limit",
    ),
    (
        "ping_interval",
        _non_negative(float),
        "seconds between WebSocket pings (after the last answer); 0: no pings",
    ),
    (
        "ping_timeout",
        _non_negative(float),
        "seconds a peer has to answer a ping (or read what waits for it) before it is declared "
        "lost; a frozen peer is found within ping interval + ping timeout",
    ),
)


def print_keys(args: argparse.Namespace) -> int:
    """``anvil-nb keys``: an app's keys, and where they are kept."""
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        name = app_name(args.app)
        keyring = KeyRing(data_dir)
    except ValueError as exc:
        print(f"anvil-nb keys: {exc}", file=sys.stderr)
        return 2
    keys = keyring.keys(name)
    if args.json:
        print(
            json.dumps({"app": name, "server_key": keys.server_key, "client_key": keys.client_key})
        )
    else:
        print(f"app: {name}\nserver key: {keys.server_key}\nclient key: {keys.client_key}")
        print(f"(kept in {keyring.path(name)})", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------
# anvil-nb users


class _UsageError(Exception):
    """A users command given wrongly (exit status 2)."""


def _database(args: argparse.Namespace) -> Path:
    """The database of ``--app`` in ``--data-dir``."""
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    return app_database(data_dir, app_name(args.app))


def _read_password(args: argparse.Namespace) -> str:
    r"""Standard input without its one trailing newline (``\n`` or ``\r\n``)."""
    if not args.password_stdin:
        raise _UsageError(
            "users add needs --password-stdin: the password is read from standard input "
            "(never from the command line), e.g. printf '%s' \"$PASSWORD\" | anvil-nb users "
            "add EMAIL --password-stdin"
        )
    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the password on standard input is not UTF-8 text") from None
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


def _when(t: float | None) -> str:
    if t is None:
        return "never"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


def _print_users(records: list[UserRecord], as_json: bool) -> None:
    if as_json:
        fields = ("email", "id", "enabled", "signed_up", "last_login", "n_password_failures")
        print(json.dumps([{f: getattr(r, f) for f in fields} for r in records]))
        return
    rows = [("EMAIL", "ID", "ENABLED", "SIGNED UP", "LAST LOGIN")]
    rows += [
        (r.email, r.id, "yes" if r.enabled else "no", _when(r.signed_up), _when(r.last_login))
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _users_action(args: argparse.Namespace) -> int:
    path = _database(args)
    password = _read_password(args) if args.action == "add" else None
    if args.action != "add" and not path.exists():  # no database is made for a look
        if args.action != "list":
            raise NoSuchUser(f"app {app_name(args.app)} has no users")
        _print_users([], args.json)
        return 0
    store = SQLiteUserStore(path)
    try:
        users = Users(store)
        if password is not None:
            record = users.signup(args.email, password)
            print(f"added {record.email} (id {record.id}) to app {app_name(args.app)}")
        elif args.action == "list":
            _print_users(users.list(), args.json)
        else:
            record = users.set_enabled(args.email, args.action == "enable")
            print(f"{args.action}d {record.email}")
    finally:
        store.close()
    return 0


def users_command(args: argparse.Namespace) -> int:
    """``anvil-nb users``: add, list, disable or enable an app's users."""
    try:
        return _users_action(args)
    except _UsageError as exc:
        print(f"anvil-nb users: {exc}", file=sys.stderr)
        return 2
    except (AnvilError, LookupError, ValueError, OSError, sqlite3.Error) as exc:
        print(f"anvil-nb users: {exc}", file=sys.stderr)
        return 1


def _add_users_parser(commands: Any) -> None:
    u = commands.add_parser("users", help="add, list, disable or enable an app's users")
    actions = u.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--app", default=DEFAULT_APP, help=f"the app (default {DEFAULT_APP})")
    common.add_argument(
        "--data-dir", help=f"where apps and their users are kept (default {default_data_dir()})"
    )
    add = actions.add_parser(
        "add", parents=[common], help="sign a user up; the password is read from stdin"
    )
    add.add_argument("email")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (required; one trailing newline is dropped)",
    )
    lst = actions.add_parser("list", parents=[common], help="list the users (never a hash)")
    lst.add_argument("--json", action="store_true", help="print one JSON list")
    for action, text in (("disable", "stop a user logging in"), ("enable", "let a user log in")):
        actions.add_parser(action, parents=[common], help=text).add_argument("email")


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
    bounds = s.add_argument_group(
        "bounds", "what one connection may cost the host (see anvil_nb.core.limits.Limits)"
    )
    for name, parse, text in _BOUND_FLAGS:
        default = getattr(DEFAULT_LIMITS, name)
        bounds.add_argument(
            "--" + name.replace("_", "-"),
            type=parse,
            default=default,
            help=f"{text} (default {default:{',' if isinstance(default, int) else 'g'}})",
        )
    s.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    k = commands.add_parser(
        "keys", help="print an app's uplink keys (making the app, and its keys, if it is new)"
    )
    k.add_argument("app", nargs="?", default=DEFAULT_APP, help=f"the app (default {DEFAULT_APP})")
    k.add_argument(
        "--data-dir", help=f"where apps and their keys are kept (default {default_data_dir()})"
    )
    k.add_argument("--json", action="store_true", help="print one JSON object")
    _add_users_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "keys":
        return print_keys(args)
    if args.command == "users":
        return users_command(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return asyncio.run(serve(args))
