"""Sessions: per-client state that belongs to the host.

A session is a :class:`SessionRecord`: an id, a secret that capability MACs are bound to, the
Python session blob exactly as a provider returned it (``{"session": ..., "objects": [...]}``,
PROTOCOL.md §7; opaque to the host), the client info of whoever started it, and timestamps.

Each call carries a copy of its session's blob to the provider and takes the changed copy back.
An uplink connection has one session; a browser has one per cookie; an HTTP request gets a
fresh one.

What survives what: a *connection* session (an uplink's, a WebSocket browser's) lives in the
host's memory only and ends with its connection, as in Anvil; no row is ever written for it, so
nothing is left behind by a crash either. A *persistent* session (a browser's cookie session) is
kept in the store and survives a restart of the host. A session idle for longer than the timeout (30 minutes by default) expires: the next
call in it fails with :class:`~anvil_nb.core.errors.SessionExpiredError` and the owner gets a fresh
session.

Stores: :class:`SessionStore` is the interface; :class:`MemorySessionStore` keeps records in a
dict; :class:`SQLiteSessionStore` keeps them in a SQLite file (WAL mode, safe for several
threads and processes) so they survive a restart. :class:`SessionManager` adds the idle clock and
caches live records, so a call costs a store write only when its session data changed.
"""

from __future__ import annotations

import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from anvil_nb.core.errors import SessionExpiredError
from anvil_nb.host.sqlitefile import SQLiteFile

__all__ = [
    "DEFAULT_SESSION_TIMEOUT",
    "MemorySessionStore",
    "SQLiteSessionStore",
    "SessionManager",
    "SessionRecord",
    "SessionStore",
]

#: Idle time, in seconds, after which a session expires.
DEFAULT_SESSION_TIMEOUT = 30 * 60.0


def new_session_id() -> str:
    """A new random session id (URL-safe, 128 bits)."""
    return secrets.token_urlsafe(16)


@dataclass
class SessionRecord:
    """One session as the host keeps it."""

    id: str
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    #: The blob ``{"session": ..., "objects": [...]}`` as last returned, or ``None`` when fresh.
    data: dict[str, Any] | None = None
    #: The client info of whoever started the session (``{"type", "ip", "location"}``).
    client: dict[str, Any] | None = None
    created: float = 0.0
    last_seen: float = 0.0
    #: Incremented at every change of :attr:`data`.
    version: int = 0
    #: Kept in the store and survives a restart (cookie sessions); connection sessions are
    #: memory only and end with their connection.
    persistent: bool = False
    #: The id of the user logged in to this session (``anvil_nb.users``), or ``None``.
    user_id: str | None = None
    #: Named by a browser's cookie: kept in the store (made persistent) once it holds data.
    #: (Every persistent session is a cookie session.)
    cookie: bool = False


class SessionStore(ABC):
    """Where session records live. Implementations must be safe to call from several threads."""

    @abstractmethod
    def get(self, session_id: str) -> SessionRecord | None:
        """The record with that id, or ``None``."""

    @abstractmethod
    def put(self, record: SessionRecord) -> None:
        """Insert or replace a record."""

    @abstractmethod
    def delete(self, session_id: str) -> None:
        """Remove a record (no error if there is none)."""

    @abstractmethod
    def purge_idle(self, seen_before: float) -> list[str]:
        """Remove every record last seen before *seen_before*; return their ids."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        """Release what the store holds open."""


class MemorySessionStore(SessionStore):
    """Records in a dict: fast, gone when the process ends."""

    def __init__(self) -> None:
        self._records: dict[str, SessionRecord] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> SessionRecord | None:  # noqa: D102
        with self._lock:
            return self._records.get(session_id)

    def put(self, record: SessionRecord) -> None:  # noqa: D102
        with self._lock:
            self._records[record.id] = record

    def delete(self, session_id: str) -> None:  # noqa: D102
        with self._lock:
            self._records.pop(session_id, None)

    def purge_idle(self, seen_before: float) -> list[str]:  # noqa: D102
        with self._lock:
            gone = [sid for sid, r in self._records.items() if r.last_seen < seen_before]
            for sid in gone:
                del self._records[sid]
        return gone


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id        TEXT PRIMARY KEY,
    secret    BLOB NOT NULL,
    data      BLOB,
    client    BLOB,
    created   REAL NOT NULL,
    last_seen REAL NOT NULL,
    version   INTEGER NOT NULL,
    user_id   TEXT
)
"""


#: ``PRAGMA user_version`` of the sessions file. 0: written by anvil_nb before connection
#: sessions became memory-only, so every row in it belongs to a connection that is gone.
#: 1: no ``user_id`` column yet (added in place: every session is kept).
_SCHEMA_VERSION = 2


class SQLiteSessionStore(SQLiteFile, SessionStore):
    """Records in a SQLite file; they survive a restart of the host.

    The file is opened in WAL mode with a busy timeout, so several threads (one connection
    each) and several processes can read and write it at once.

    Parameters
    ----------
    path : str or Path
        The database file; its folder is created if missing.
    """

    def __init__(self, path: str | Path):
        SQLiteFile.__init__(self, path)
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                db.execute("DROP TABLE IF EXISTS sessions")  # only orphaned connection sessions
            elif version < 2:
                db.execute("ALTER TABLE sessions ADD COLUMN user_id TEXT")
            if version < _SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            db.execute(_SCHEMA)

    def get(self, session_id: str) -> SessionRecord | None:  # noqa: D102
        row = (
            self._db()
            .execute(
                "SELECT id, secret, data, client, created, last_seen, version, user_id "
                "FROM sessions WHERE id = ?",
                (session_id,),
            )
            .fetchone()
        )
        if row is None:
            return None
        sid, secret, data, client, created, last_seen, version, user_id = row
        return SessionRecord(
            id=sid,
            secret=bytes(secret),
            data=orjson.loads(data) if data is not None else None,
            client=orjson.loads(client) if client is not None else None,
            created=created,
            last_seen=last_seen,
            version=version,
            persistent=True,
            user_id=user_id,
        )

    def put(self, record: SessionRecord) -> None:  # noqa: D102
        self._db().execute(
            "INSERT OR REPLACE INTO sessions "
            "(id, secret, data, client, created, last_seen, version, user_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.id,
                record.secret,
                orjson.dumps(record.data) if record.data is not None else None,
                orjson.dumps(record.client) if record.client is not None else None,
                record.created,
                record.last_seen,
                record.version,
                record.user_id,
            ),
        )

    def touch(self, session_id: str, last_seen: float) -> None:
        """Record that a session was used, without rewriting its data."""
        self._db().execute(
            "UPDATE sessions SET last_seen = ? WHERE id = ?", (last_seen, session_id)
        )

    def delete(self, session_id: str) -> None:  # noqa: D102
        self._db().execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def purge_idle(self, seen_before: float) -> list[str]:  # noqa: D102
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            gone = [
                r[0]
                for r in db.execute("SELECT id FROM sessions WHERE last_seen < ?", (seen_before,))
            ]
            db.execute("DELETE FROM sessions WHERE last_seen < ?", (seen_before,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return gone


class SessionManager:
    """Sessions with an idle clock, over a store.

    Parameters
    ----------
    store : SessionStore
        Where records are kept.
    timeout : float or None
        Idle seconds before a session expires; ``None`` means never.
    clock : callable
        Returns the time in seconds (``time.time`` by default; tests pass their own).
    """

    def __init__(
        self,
        store: SessionStore | None = None,
        timeout: float | None = DEFAULT_SESSION_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store if store is not None else MemorySessionStore()
        self.timeout = timeout
        self.clock = clock
        self._live: dict[str, SessionRecord] = {}
        self._unsaved_touch: set[str] = set()
        self._lock = threading.Lock()

    def new(self, client: dict[str, Any] | None = None, persistent: bool = False) -> SessionRecord:
        """Start a new, empty session: in memory only, or kept in the store if *persistent*."""
        now = self.clock()
        record = SessionRecord(
            id=new_session_id(), client=client, created=now, last_seen=now, persistent=persistent
        )
        with self._lock:
            self._live[record.id] = record
        if persistent:
            self.store.put(record)
        return record

    def persist(self, record: SessionRecord) -> None:
        """Keep a session that was memory only in the store from now on (a browser's, once it
        holds something worth a cookie).
        """
        record.persistent = True
        self.store.put(record)

    def replace(self, record: SessionRecord, user_id: str | None) -> SessionRecord:
        """A new session (new id, new secret) with *record*'s data and client and *user_id* as
        its user, in its place; *record* ends. Logging in or out does this, so that a session
        id known before never carries the user (no session fixation).
        """
        now = self.clock()
        fresh = SessionRecord(
            id=new_session_id(), data=record.data, client=record.client, created=now,
            last_seen=now, version=record.version, persistent=record.persistent, user_id=user_id,
            cookie=record.cookie,
        )  # fmt: skip
        with self._lock:
            self._live[fresh.id] = fresh
        if fresh.cookie and user_id is not None:
            fresh.persistent = True  # a login is worth keeping
        if fresh.persistent:
            self.store.put(fresh)
        self.drop(record.id)
        return fresh

    def get(self, session_id: str) -> SessionRecord | None:
        """The session with that id (from the cache or the store), without touching it."""
        with self._lock:
            record = self._live.get(session_id)
        if record is None:
            record = self.store.get(session_id)
            if record is not None:
                with self._lock:
                    record = self._live.setdefault(session_id, record)
        return record

    def is_expired(self, record: SessionRecord) -> bool:
        """Whether *record* has been idle for longer than the timeout."""
        return self.timeout is not None and self.clock() - record.last_seen > self.timeout

    def use(self, session_id: str) -> SessionRecord:
        """The session for a call, its idle clock restarted.

        Raises
        ------
        SessionExpiredError
            The session is unknown or has been idle too long (it is then removed).
        """
        record = self.get(session_id)
        if record is None or self.is_expired(record):
            self.drop(session_id)
            raise SessionExpiredError("Your session has expired; a new session has been started")
        record.last_seen = self.clock()
        if record.persistent:
            with self._lock:
                self._unsaved_touch.add(session_id)
        return record

    def save_data(self, record: SessionRecord, data: dict[str, Any] | None) -> None:
        """Store a new session blob (persisted at once)."""
        record.data = data
        record.version += 1
        record.last_seen = self.clock()
        if record.cookie:
            record.persistent = True
        if record.persistent:
            with self._lock:
                self._unsaved_touch.discard(record.id)
            self.store.put(record)

    def drop(self, session_id: str) -> None:
        """Forget a session (its capabilities stop being valid)."""
        with self._lock:
            record = self._live.pop(session_id, None)
            self._unsaved_touch.discard(session_id)
        if record is None or record.persistent:
            self.store.delete(session_id)

    def flush(self) -> None:
        """Persist the idle clocks of sessions used since the last flush."""
        with self._lock:
            ids, self._unsaved_touch = self._unsaved_touch, set()
            records = [self._live[i] for i in ids if i in self._live]
        touch = getattr(self.store, "touch", None)
        for record in records:
            if touch is not None:
                touch(record.id, record.last_seen)
            else:
                self.store.put(record)

    def purge(self) -> list[str]:
        """Remove every expired session; return their ids."""
        if self.timeout is None:
            return []
        self.flush()
        cutoff = self.clock() - self.timeout
        gone = self.store.purge_idle(cutoff)
        with self._lock:
            for sid in [s for s, r in self._live.items() if r.last_seen < cutoff]:
                self._live.pop(sid, None)
                gone.append(sid)
        return sorted(set(gone))

    def close(self) -> None:
        """Flush and close the store."""
        self.flush()
        self.store.close()
