"""Users on the host: the ``anvil.private.users.*`` calls, and users as rows on the wire.

The real client's ``anvil.users`` and anvil_nb's call the host (PROTOCOL.md §8):
``get_current_user``, ``login_with_email``, ``signup_with_email``, ``logout`` and
``force_login``. Who is logged in belongs to the session (``SessionRecord.user_id``); logging
in or out gives the session a new id (:meth:`~anvil_nb.host.sessions.SessionManager.replace`,
done by the dispatcher), so an id known before never carries the user.

Passwords are checked with argon2, which takes tens of milliseconds of CPU by design: that
work runs on a small thread pool, never on the host's event loop, and at most
:data:`MAX_PENDING` checks wait at once (more are refused with ``QuotaExceededError``).

A user leaves the host as a Data Tables row does on Anvil: a ``LiveObject`` of backend
``anvil.tables.Row`` whose ``itemCache`` holds its columns (``email``, ``enabled``,
``confirmed_email``, ``n_password_failures``, ``signed_up``, ``last_login``), so
``user["email"]`` needs no round trip in either client. It carries a MAC over the app and the user's id: ``force_login`` accepts only
rows this host made, and ``user.get_id()`` from the real client (a ``liveObjectCall``) is
answered here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import hashlib
import hmac
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher

from anvil_nb.config import app_database
from anvil_nb.core.errors import AuthenticationFailed, PermissionDenied, QuotaExceededError
from anvil_nb.core.liveobject import LiveObjectProxy
from anvil_nb.core.serialise import cache_entry, serialise
from anvil_nb.host.users import SQLiteUserStore, UserRecord, Users

__all__ = ["MAX_PENDING", "ROW_BACKEND", "Accounts"]

#: The backend of a user row (a Data Tables row, as on Anvil).
ROW_BACKEND = "anvil.tables.Row"
#: Password checks that may wait for the pool at once.
MAX_PENDING = 64

#: The private functions of ``anvil.users`` that this module answers.
COMMANDS = frozenset(
    f"anvil.private.users.{name}"
    for name in (
        "get_current_user", "login_with_email", "signup_with_email", "logout", "force_login",
    )
)  # fmt: skip


def _utc(timestamp: float | None) -> dt.datetime | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


class Accounts:
    """The users of every app of a host.

    Parameters
    ----------
    secret : bytes
        The host's key (rows are signed with a key derived from it).
    data_dir : Path, optional
        Where each app's ``app.sqlite3`` lives; without it (the embedded host) users are kept
        in a temporary folder for the life of the host.
    hasher : PasswordHasher, optional
        argon2-cffi's defaults unless given (tests pass cheap parameters).
    """

    def __init__(
        self,
        secret: bytes,
        data_dir: Path | None = None,
        hasher: PasswordHasher | None = None,
    ):
        self._key = hashlib.sha256(b"anvil_nb user row\0" + secret).digest()
        self._data_dir = data_dir
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        self._hasher = hasher
        self._apps: dict[str, Users] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="anvil_nb-users")
        self._pending = 0

    def users(self, app: str) -> Users:
        """The users of *app* (its store opened on first use)."""
        found = self._apps.get(app)
        if found is None:
            if self._data_dir is not None:
                path = app_database(self._data_dir, app)
            else:
                if self._temp is None:
                    self._temp = tempfile.TemporaryDirectory(prefix="anvil_nb-users-")
                path = Path(self._temp.name) / f"{app}.sqlite3"
            found = self._apps[app] = Users(SQLiteUserStore(path), hasher=self._hasher)
        return found

    def close(self) -> None:
        """Stop the pool and close the stores."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        for users in self._apps.values():
            users.store.close()
        self._apps.clear()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the pool (password work), bounded in how many may wait."""
        if self._pending >= MAX_PENDING:
            raise QuotaExceededError("Too many logins in progress; try again shortly")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    # -- rows ----------------------------------------------------------------------------------
    def _mac(self, app: str, user_id: str) -> str:
        return hmac.new(self._key, f"{app}\0{user_id}".encode(), hashlib.sha256).hexdigest()

    def row(self, app: str, user: UserRecord) -> LiveObjectProxy:
        """*user* as the row clients receive (the columns of Anvil's users table)."""
        columns = {
            "email": user.email,
            "enabled": user.enabled,
            "confirmed_email": True,
            "n_password_failures": user.n_password_failures,
            "signed_up": _utc(user.signed_up),
            "last_login": _utc(user.last_login),
        }
        spec = {
            "backend": ROW_BACKEND,
            "id": user.id,
            "mac": self._mac(app, user.id),
            "permissions": ["r"],
            "methods": ["get_id"],
            "itemCache": {key: cache_entry(value) for key, value in columns.items()},
        }
        return LiveObjectProxy(spec, columns)

    def answer(self, app: str, user: UserRecord | None) -> tuple[Any, list[Any]]:
        """The ``response`` and ``objects`` of a call that returns *user* (or ``None``)."""
        if user is None:
            return None, []
        enc = serialise({"response": self.row(app, user)})
        return enc.message["response"], enc.message.get("objects") or []

    def user_of_row(self, app: str, entry: Any) -> UserRecord:
        """The user a row that came back names (``force_login``): it must be one this host
        signed for *app*, of a user that still exists.

        Raises
        ------
        PermissionDenied
            Not a row of this app's users table, or not signed by this host.
        """
        ok = isinstance(entry, dict) and entry.get("backend") == ROW_BACKEND
        user_id, mac = (entry.get("id"), entry.get("mac")) if ok else (None, None)
        if not (isinstance(user_id, str) and isinstance(mac, str)) or not hmac.compare_digest(
            mac.encode("utf-8", "replace"), self._mac(app, user_id).encode()
        ):
            raise PermissionDenied("That is not a row of this app's users table")
        user = self.users(app).get(user_id)
        if user is None:
            raise AuthenticationFailed("That user no longer exists")
        return user

    def row_id(self, app: str, spec: Any) -> str:
        """``get_id()`` of a row a client holds (its ``liveObjectCall``), checked like
        :meth:`user_of_row`.
        """
        return self.user_of_row(app, spec).id
