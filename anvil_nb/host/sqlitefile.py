"""An app's SQLite file, as each of its stores opens it: one connection per thread.

The stores of an app (cookie sessions, users, task records) keep their tables in one file,
``app.sqlite3`` (:func:`anvil_nb.config.app_database`). :class:`SQLiteFile` is what they share:
the file made readable by its owner only (it holds session secrets and password hashes), WAL
mode with a busy timeout (several threads and processes read and write it at once, e.g. a
running host and ``anvil-nb users``), a connection per thread made on first use, transactions,
and closing every connection made.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from anvil_nb.config import private_file

__all__ = ["SQLiteFile"]


class SQLiteFile:
    """A SQLite file with one connection per thread (see the module).

    Parameters
    ----------
    path : str or Path
        The database file; its folder is created if missing.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        private_file(self.path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        """The calling thread's connection (made on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            with self._lock:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` on this thread's connection (rolled back on error)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close every connection made (a later use opens new ones)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()
