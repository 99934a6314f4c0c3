"""F7: uplink sessions end with their connection, and nothing of them is left on disk.

Connection sessions live in the host's memory only (DESIGN.md: an uplink connection has one
session, which ends with the connection, as in Anvil). The old host wrote a row per connection
into ``sessions.sqlite3`` and a SIGKILL left them behind until the 30-minute purge: the next
start now removes rows written that way, and no new ones are ever written.
"""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

from anvil_nb import server
from anvil_nb.client.client import Client, FunctionRegistry
from anvil_nb.client.websocket import WebSocketTransport
from anvil_nb.host.sessions import SessionManager, SQLiteSessionStore


def rows(data_dir: Path) -> int:
    path = data_dir / "sessions.sqlite3"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM sessions").fetchone()[0]


def provider_and_caller(host):
    registry = FunctionRegistry()
    registry.register("remember", _remember)
    registry.register("recall", _recall)
    provider = Client(WebSocketTransport(host.url, host.server_key), functions=registry).start()
    caller = Client(WebSocketTransport(host.url, host.client_key), functions=FunctionRegistry())
    return provider, caller.start()


def _remember(value):
    server.session["v"] = value


def _recall():
    return server.session.get("v")


def test_f7_connection_sessions_leave_no_rows_even_after_a_crash(serve_proc):
    host = serve_proc()
    provider, caller = provider_and_caller(host)
    try:
        caller.call("remember", "kept while connected")
        assert caller.call("recall") == "kept while connected"
        assert rows(host.data_dir) == 0  # in memory only
        host.restart(signal.SIGKILL)  # a crash with connections open
        assert rows(host.data_dir) == 0
    finally:
        caller.close()
        provider.close()
    provider, caller = provider_and_caller(host)
    try:
        assert caller.call("recall") is None  # a new connection, a new session
    finally:
        caller.close()
        provider.close()


def test_f7_rows_an_older_host_left_behind_go_at_the_next_start(tmp_path):
    path = tmp_path / "sessions.sqlite3"
    with sqlite3.connect(path) as db:  # the file as round one wrote it (user_version 0)
        db.execute(
            "CREATE TABLE sessions (id TEXT PRIMARY KEY, secret BLOB NOT NULL, data BLOB, "
            "client BLOB, created REAL NOT NULL, last_seen REAL NOT NULL, version INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO sessions VALUES ('orphan', x'00', NULL, NULL, 0, 0, 0)")
    store = SQLiteSessionStore(path)
    try:
        assert store.get("orphan") is None
        manager = SessionManager(store)
        kept = manager.new(persistent=True)  # a cookie session (the HTTP issue) is kept
        manager.close()
        again = SQLiteSessionStore(path)
        assert again.get(kept.id) is not None
        again.close()
    finally:
        store.close()
