"""Background tasks on the host: their records, where the records are kept, and the task's
live object.

A task is a call of a ``task:NAME`` registration that nobody waits for (PROTOCOL.md §8): the
launcher gets a :data:`BACKEND` live object at once, and the host keeps a :class:`TaskRecord`
of the task from launch to its end and after — its name, start time, status, final state,
return value or error — so that anyone trusted can read it after the launcher has gone, and
after a restart of the host (records are in the app's ``app.sqlite3``). What a record keeps is
bounded (:data:`MAX_KEPT_BYTES` per value), and finished records are kept for
:data:`KEEP_SECONDS` and at most :data:`KEEP_COUNT` per app.

Statuses, as ``get_termination_status()`` reads them: ``None`` while the task runs, then
``"completed"``, ``"failed"``, ``"killed"``, or ``"missing"`` (the connection running it was
lost, or the host restarted while it ran).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from anvil_nb.host.sqlitefile import SQLiteFile

__all__ = [
    "BACKEND",
    "KEEP_COUNT",
    "KEEP_SECONDS",
    "MAX_KEPT_BYTES",
    "METHODS",
    "MemoryTaskStore",
    "SQLiteTaskStore",
    "TaskRecord",
    "TaskStore",
    "kept",
    "new_task_id",
    "task_mac",
]

#: The live object of a task (PROTOCOL.md §8).
BACKEND = "anvil.private.BackgroundTask"
#: Its methods, in the App Server's order.
METHODS = [
    "get_id", "get_termination_status", "get_error", "get_state", "get_return_value",
    "get_task_name", "get_start_time", "is_completed", "is_running", "kill",
]  # fmt: skip
#: The most bytes of a return value, an error or a final state a record keeps.
MAX_KEPT_BYTES = 1024 * 1024
#: Finished records are kept this long (7 days) ...
KEEP_SECONDS = 7 * 24 * 3600.0
#: ... and at most this many per app (the newest).
KEEP_COUNT = 1000


def new_task_id() -> str:
    """A new random task id."""
    return "t" + secrets.token_urlsafe(12)


def task_mac(secret: bytes, app: str, task_id: str) -> str:
    """The MAC of a task's live object: only the host that made it can make another."""
    key = hashlib.sha256(b"anvil_nb background task\0" + secret).digest()
    return hmac.new(key, f"{app}\0{task_id}".encode(), hashlib.sha256).hexdigest()


@dataclass
class TaskRecord:
    """What the host keeps of one task."""

    id: str
    app: str
    name: str
    started: float
    #: ``None`` while it runs, then ``completed``, ``failed``, ``killed`` or ``missing``.
    status: str | None = None
    ended: float | None = None
    #: The final ``task_state``, the return value (``{"response", "objects"}``, wire form) or
    #: the error (``{"type", "message", "trace"}``), each bounded by :data:`MAX_KEPT_BYTES`.
    state: Any = None
    result: Any = None
    error: Any = None
    #: The host's request id of the running task, and the connection running it (its name).
    request_id: str = ""
    provider: str = ""
    #: Who launched it (a connection's name), and the task's own session.
    launcher: str = ""
    session_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        """Whether the task has not ended."""
        return self.status is None


def kept(value: Any, what: str) -> Any:
    """*value* if its JSON is at most :data:`MAX_KEPT_BYTES`, else an error record saying so
    (a record never grows without bound).
    """
    try:
        size = len(orjson.dumps(value))
    except TypeError:
        return {"type": "anvil.server.SerializationError", "message": f"The {what} is not JSON"}
    if size <= MAX_KEPT_BYTES:
        return value
    return {
        "type": "anvil.server.SerializationError",
        "message": f"The {what} was {size:,} bytes, over the {MAX_KEPT_BYTES:,} a task record keeps",
    }


class TaskStore(ABC):
    """Where task records live. Implementations must be safe to call from several threads."""

    @abstractmethod
    def put(self, record: TaskRecord) -> None:
        """Insert or replace a record."""

    @abstractmethod
    def get(self, app: str, task_id: str) -> TaskRecord | None:
        """The record of *task_id* in *app*, or ``None``."""

    @abstractmethod
    def list(self, app: str) -> list[TaskRecord]:
        """Every record of *app*, newest first."""

    @abstractmethod
    def prune(self, app: str, before: float, keep: int) -> int:
        """Remove finished records that ended before *before*, and beyond the newest *keep*;
        return how many went.
        """

    @abstractmethod
    def mark_missing(self, now: float) -> int:
        """Every record still running is ``missing`` (the host that ran it restarted)."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        """Release what the store holds open."""


class MemoryTaskStore(TaskStore):
    """Records in a dict (a host without a data dir)."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], TaskRecord] = {}
        self._lock = threading.Lock()

    def put(self, record: TaskRecord) -> None:  # noqa: D102
        with self._lock:
            self._records[record.app, record.id] = replace(record)

    def get(self, app: str, task_id: str) -> TaskRecord | None:  # noqa: D102
        with self._lock:
            found = self._records.get((app, task_id))
        return replace(found) if found is not None else None

    def list(self, app: str) -> list[TaskRecord]:  # noqa: D102
        with self._lock:
            mine = [replace(r) for (a, _), r in self._records.items() if a == app]
        return sorted(mine, key=lambda r: r.started, reverse=True)

    def prune(self, app: str, before: float, keep: int) -> int:  # noqa: D102
        finished = [r for r in self.list(app) if not r.running]
        gone = [r for i, r in enumerate(finished) if i >= keep or (r.ended or 0) < before]
        with self._lock:
            for r in gone:
                self._records.pop((app, r.id), None)
        return len(gone)

    def mark_missing(self, now: float) -> int:  # noqa: D102
        with self._lock:
            running = [r for r in self._records.values() if r.running]
            for r in running:
                r.status, r.ended = "missing", now
        return len(running)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    app      TEXT NOT NULL,
    id       TEXT NOT NULL,
    name     TEXT NOT NULL,
    started  REAL NOT NULL,
    status   TEXT,
    ended    REAL,
    record   BLOB NOT NULL,
    PRIMARY KEY (app, id)
)
"""


class SQLiteTaskStore(SQLiteFile, TaskStore):
    """Records in the ``tasks`` table of an app's SQLite file (WAL mode; one connection per
    thread); the file's other tables belong to other stores.
    """

    def __init__(self, path: str | Path):
        SQLiteFile.__init__(self, path)
        self._db().execute(_SCHEMA)

    def put(self, record: TaskRecord) -> None:  # noqa: D102
        blob = orjson.dumps(
            {
                k: v
                for k, v in record.__dict__.items()
                if k not in ("app", "id", "name", "started", "status", "ended")
            }
        )
        self._db().execute(
            "INSERT OR REPLACE INTO tasks (app, id, name, started, status, ended, record) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (record.app, record.id, record.name, record.started, record.status, record.ended, blob),
        )

    @staticmethod
    def _record(row: tuple[Any, ...]) -> TaskRecord:
        app, task_id, name, started, status, ended, blob = row
        rest = json.loads(blob)
        return TaskRecord(
            id=task_id, app=app, name=name, started=started, status=status, ended=ended, **rest
        )

    def get(self, app: str, task_id: str) -> TaskRecord | None:  # noqa: D102
        rows = (
            self._db()
            .execute(
                "SELECT app, id, name, started, status, ended, record FROM tasks "
                "WHERE app = ? AND id = ?",
                (app, task_id),
            )
            .fetchall()
        )
        return self._record(rows[0]) if rows else None

    def list(self, app: str) -> list[TaskRecord]:  # noqa: D102
        rows = (
            self._db()
            .execute(
                "SELECT app, id, name, started, status, ended, record FROM tasks WHERE app = ? "
                "ORDER BY started DESC",
                (app,),
            )
            .fetchall()
        )
        return [self._record(r) for r in rows]

    def prune(self, app: str, before: float, keep: int) -> int:  # noqa: D102
        db = self._db()
        cursor = db.execute(
            "DELETE FROM tasks WHERE app = ? AND status IS NOT NULL AND (ended < ? OR id NOT IN "
            "(SELECT id FROM tasks WHERE app = ? AND status IS NOT NULL "
            "ORDER BY ended DESC LIMIT ?))",
            (app, before, app, keep),
        )
        return cursor.rowcount

    def mark_missing(self, now: float) -> int:  # noqa: D102
        cursor = self._db().execute(
            "UPDATE tasks SET status = 'missing', ended = ? WHERE status IS NULL", (now,)
        )
        return cursor.rowcount


def now() -> float:
    """The clock of task records."""
    return time.time()
