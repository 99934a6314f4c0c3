"""Users: the accounts of one app, and the rules for signing up and logging in.

This is storage and policy only (no network, no event loop): every method may be called from
any thread, and from several processes on one database file.

* :class:`UserRecord` is a user as the rest of anvil_nb sees one: id, email, enabled, when they
  signed up and last logged in, and how many wrong passwords in a row they have typed. It never
  carries the password hash.
* :class:`UserStore` is where users are kept (an interface, so that a shared store can serve
  several hosts later); :class:`SQLiteUserStore` keeps them in the ``users`` table of the app's
  SQLite file (:func:`anvil_nb.config.app_database`), beside the tables other stores own there.
* :class:`Users` is the policy over a store: :meth:`~Users.signup`, :meth:`~Users.login`
  (with throttling), and the administration that ``anvil-nb users`` does.

Passwords are hashed with argon2id (``argon2-cffi``'s defaults, the RFC 9106 low-memory
profile); a hash made with weaker parameters than the hasher's is replaced at the next
successful login. Email addresses are compared without case and surrounding blanks: they are
kept stripped and lower-cased.

Throttling is per account, not per client address: the first :data:`FREE_FAILURES` wrong
passwords in a row cost nothing; each further one locks the account for twice as long as the
one before (1 s, 2 s, 4 s, ..., at most :data:`MAX_LOCKOUT` seconds). A login attempted while
the account is locked fails with :class:`~anvil_nb.core.errors.TooManyPasswordFailures`
without the password being checked; a successful login clears the count. A wrong password and
an unknown email address fail alike (:class:`~anvil_nb.core.errors.AuthenticationFailed`, same
message, an argon2 verification in both cases), so a login does not tell which addresses have
accounts.

Neither a password nor a hash is ever logged or put in an exception message or a ``repr``.
"""

from __future__ import annotations

import logging
import math
import secrets
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypedDict

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from anvil_nb.core.errors import (
    AccountIsNotEnabled,
    AuthenticationFailed,
    PasswordNotAcceptable,
    TooManyPasswordFailures,
    UserExists,
)
from anvil_nb.host.sqlitefile import SQLiteFile

__all__ = [
    "FREE_FAILURES",
    "MAX_LOCKOUT",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "NoSuchUser",
    "SQLiteUserStore",
    "StoredUser",
    "UserChanges",
    "UserRecord",
    "UserStore",
    "Users",
    "lockout_after",
    "normalise_email",
]

log = logging.getLogger("anvil_nb.users")

#: The shortest password accepted, in characters.
MIN_PASSWORD_LENGTH = 8
#: The longest password accepted, in characters (a bound on the work one sign-up can ask for).
MAX_PASSWORD_LENGTH = 1024
#: The longest email address accepted (RFC 5321's limit on a forward path).
MAX_EMAIL_LENGTH = 254
#: Wrong passwords in a row that cost nothing; each further one locks the account.
FREE_FAILURES = 3
#: The longest lock-out, in seconds.
MAX_LOCKOUT = 300.0

#: What every failed login says, whatever was wrong (no telling which emails have accounts).
LOGIN_FAILED = "Incorrect email address or password"


class NoSuchUser(LookupError):
    """No user has that email address (raised by the administrative methods of :class:`Users`)."""


@dataclass(frozen=True)
class UserRecord:
    """A user as anvil_nb shows one; it never carries the password or its hash.

    Attributes
    ----------
    id : str
        Stable and random; what ``user.get_id()`` returns.
    email : str
        Stripped and lower-cased.
    enabled : bool
        A disabled user cannot log in.
    signed_up : float
        Unix time of the sign-up.
    last_login : float or None
        Unix time of the last successful login, ``None`` before the first.
    n_password_failures : int
        Wrong passwords in a row since the last successful login.
    """

    id: str
    email: str
    enabled: bool = True
    signed_up: float = 0.0
    last_login: float | None = None
    n_password_failures: int = 0


@dataclass(frozen=True)
class StoredUser:
    """A user as a :class:`UserStore` keeps one: the record, its hash and its lock-out.

    Only :class:`Users` reads the hash; it is left out of ``repr``.
    """

    record: UserRecord
    password_hash: str = field(repr=False)
    #: Unix time before which a login is refused unchecked (0: not locked).
    next_attempt: float = 0.0


class UserChanges(TypedDict, total=False):
    """The fields :meth:`UserStore.update` may change."""

    password_hash: str
    enabled: bool
    last_login: float | None
    n_password_failures: int
    next_attempt: float


def normalise_email(email: str) -> str:
    """*email* as users are kept and looked up: stripped of blanks and lower-cased."""
    return email.strip().lower()


def lockout_after(failures: int) -> float:
    """Seconds an account is locked after *failures* wrong passwords in a row.

    0 for the first :data:`FREE_FAILURES`, then 1, 2, 4, ... up to :data:`MAX_LOCKOUT`.
    """
    extra = failures - FREE_FAILURES
    if extra <= 0:
        return 0.0
    return min(MAX_LOCKOUT, 2.0 ** min(extra - 1, 32))


class UserStore(ABC):
    """Where the users of one app are kept. Implementations must be safe to call from several
    threads; emails given to them are already normalised (:func:`normalise_email`).
    """

    @abstractmethod
    def insert(self, user: StoredUser) -> None:
        """Add a new user.

        Raises
        ------
        UserExists
            A user with that email address exists already.
        """

    @abstractmethod
    def get(self, user_id: str) -> StoredUser | None:
        """The user with that id, or ``None``."""

    @abstractmethod
    def by_email(self, email: str) -> StoredUser | None:
        """The user with that (normalised) email address, or ``None``."""

    @abstractmethod
    def all(self) -> list[StoredUser]:
        """Every user, in the order they signed up."""

    @abstractmethod
    def update(self, user_id: str, changes: UserChanges) -> bool:
        """Change some fields of a user; ``False`` if there is no such user."""

    @abstractmethod
    def add_failure(self, user_id: str) -> int:
        """Count one more wrong password for a user, atomically; the new count (0: no user)."""

    def close(self) -> None:  # noqa: B027 - optional for stores that hold nothing open
        """Release what the store holds open."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id                  TEXT PRIMARY KEY,
    email               TEXT NOT NULL UNIQUE,
    password_hash       TEXT NOT NULL,
    enabled             INTEGER NOT NULL DEFAULT 1,
    signed_up           REAL NOT NULL,
    last_login          REAL,
    n_password_failures INTEGER NOT NULL DEFAULT 0,
    next_attempt        REAL NOT NULL DEFAULT 0
)
"""

_COLUMNS = (
    "id, email, enabled, signed_up, last_login, n_password_failures, password_hash, next_attempt"
)
#: The columns :meth:`SQLiteUserStore.update` may write (the keys of :class:`UserChanges`).
_UPDATABLE = frozenset(UserChanges.__annotations__)


def _from_row(row: tuple[object, ...]) -> StoredUser:
    uid, email, enabled, signed_up, last_login, failures, password_hash, next_attempt = row
    record = UserRecord(
        id=str(uid),
        email=str(email),
        enabled=bool(enabled),
        signed_up=float(signed_up),  # type: ignore[arg-type]
        last_login=None if last_login is None else float(last_login),  # type: ignore[arg-type]
        n_password_failures=int(failures),  # type: ignore[call-overload]
    )
    return StoredUser(record, str(password_hash), float(next_attempt))  # type: ignore[arg-type]


class SQLiteUserStore(SQLiteFile, UserStore):
    """Users in the ``users`` table of a SQLite file.

    The file may hold other tables too (the app's sessions): this store creates and uses its
    own table only (``CREATE TABLE IF NOT EXISTS``) and leaves ``PRAGMA user_version`` to the
    sessions store. It is opened in WAL mode with a busy timeout, one connection per thread,
    so several threads and processes can read and write it at once. Since it holds password
    hashes, the file is made readable by its owner only, and an existing file readable by
    others is narrowed so (SQLite gives its ``-wal`` and ``-shm`` files the same mode).

    Parameters
    ----------
    path : str or Path
        The database file; its folder is created if missing.
    """

    def __init__(self, path: str | Path):
        SQLiteFile.__init__(self, path)
        self._db().execute(_SCHEMA)

    def _one(self, where: str, value: str) -> StoredUser | None:
        row = self._db().execute(f"SELECT {_COLUMNS} FROM users WHERE {where} = ?", (value,))
        found = row.fetchone()
        return None if found is None else _from_row(found)

    def insert(self, user: StoredUser) -> None:  # noqa: D102
        r = user.record
        try:
            self._db().execute(
                f"INSERT INTO users ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    r.id,
                    r.email,
                    int(r.enabled),
                    r.signed_up,
                    r.last_login,
                    r.n_password_failures,
                    user.password_hash,
                    user.next_attempt,
                ),
            )
        except sqlite3.IntegrityError:
            if self.by_email(r.email) is None:  # an id collision, not a known email
                raise
            raise UserExists(f"A user with the email address {r.email} already exists") from None

    def get(self, user_id: str) -> StoredUser | None:  # noqa: D102
        return self._one("id", user_id)

    def by_email(self, email: str) -> StoredUser | None:  # noqa: D102
        return self._one("email", email)

    def all(self) -> list[StoredUser]:  # noqa: D102
        rows = self._db().execute(f"SELECT {_COLUMNS} FROM users ORDER BY signed_up, rowid")
        return [_from_row(row) for row in rows]

    def update(self, user_id: str, changes: UserChanges) -> bool:  # noqa: D102
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"cannot update the user fields {sorted(unknown)}")
        if not changes:
            return self.get(user_id) is not None
        names = list(changes)
        values = [int(v) if isinstance(v, bool) else v for v in changes.values()]
        cursor = self._db().execute(
            f"UPDATE users SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",
            (*values, user_id),
        )
        return cursor.rowcount > 0

    def add_failure(self, user_id: str) -> int:  # noqa: D102
        with self._transaction() as db:
            db.execute(
                "UPDATE users SET n_password_failures = n_password_failures + 1 WHERE id = ?",
                (user_id,),
            )
            row = db.execute(
                "SELECT n_password_failures FROM users WHERE id = ?", (user_id,)
            ).fetchone()
        return 0 if row is None else int(row[0])


def _check_email(email: object) -> str:
    """*email* normalised, or :class:`PasswordNotAcceptable` saying what is wrong with it."""
    if not isinstance(email, str):
        raise PasswordNotAcceptable("The email address must be a string")
    normal = normalise_email(email)
    local, at, domain = normal.partition("@")
    if not (at and local and domain) or "@" in domain:
        raise PasswordNotAcceptable(
            "Invalid email address: it needs one '@' with text on both sides"
        )
    if len(normal) > MAX_EMAIL_LENGTH:
        raise PasswordNotAcceptable(
            f"Invalid email address: longer than {MAX_EMAIL_LENGTH} characters"
        )
    if any(c.isspace() or not c.isprintable() for c in normal):
        raise PasswordNotAcceptable(
            "Invalid email address: it contains blanks or control characters"
        )
    return normal


def _check_password(password: object) -> str:
    """*password* if acceptable, else :class:`PasswordNotAcceptable` (never quoting it)."""
    if not isinstance(password, str):
        raise PasswordNotAcceptable("The password must be a string")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise PasswordNotAcceptable(
            f"The password is too short: it needs at least {MIN_PASSWORD_LENGTH} characters"
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise PasswordNotAcceptable(
            f"The password is too long: at most {MAX_PASSWORD_LENGTH} characters"
        )
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate; the encoder's error would carry the password
        raise PasswordNotAcceptable("The password is not valid Unicode text") from None
    return password


class Users:
    """The users of one app: sign-up, login with throttling, and administration.

    Parameters
    ----------
    store : UserStore
        Where the users are kept.
    hasher : argon2.PasswordHasher, optional
        Hashes and checks passwords (argon2-cffi's defaults unless given; tests pass cheap
        parameters).
    now : callable
        The time in seconds (``time.time``; tests pass their own clock).
    """

    def __init__(
        self,
        store: UserStore,
        hasher: PasswordHasher | None = None,
        now: Callable[[], float] = time.time,
    ):
        self.store = store
        self.hasher = hasher if hasher is not None else PasswordHasher()
        self.now = now
        self._dummy_hash: str | None = None

    # -- signing up and logging in -------------------------------------------------------------
    def signup(self, email: str, password: str) -> UserRecord:
        """Make a new, enabled user.

        Raises
        ------
        PasswordNotAcceptable
            The email address is not one (it needs one ``@`` with text on both sides), or the
            password is shorter than :data:`MIN_PASSWORD_LENGTH` (or longer than
            :data:`MAX_PASSWORD_LENGTH`) characters.
        UserExists
            A user with that email address (compared without case) exists already.
        """
        normal = _check_email(email)
        password_hash = self.hasher.hash(_check_password(password))
        record = UserRecord(id=secrets.token_urlsafe(12), email=normal, signed_up=self.now())
        self.store.insert(StoredUser(record, password_hash))
        log.info("user %s signed up", normal)
        return record

    def login(self, email: str, password: str) -> UserRecord:
        """The user with that email address and password, their login recorded.

        Raises
        ------
        AuthenticationFailed
            No such user, or the wrong password (one message for both).
        TooManyPasswordFailures
            The account is locked after too many wrong passwords; the message says for how
            many more seconds. The password was not checked.
        AccountIsNotEnabled
            The password is right but the account has been disabled.
        """
        found = self._find_for_login(email)
        if found is None or not isinstance(password, str):
            self._verify(None, "")  # as slow as a real check
            raise AuthenticationFailed(LOGIN_FAILED)
        now = self.now()
        if found.next_attempt > now:
            wait = math.ceil(found.next_attempt - now)
            raise TooManyPasswordFailures(
                f"Too many failed login attempts for this account: try again in {wait} "
                f"second{'s' if wait != 1 else ''}"
            )
        if not self._verify(found.password_hash, password):
            self._record_failure(found.record.id, now)
            raise AuthenticationFailed(LOGIN_FAILED)
        if not found.record.enabled:
            raise AccountIsNotEnabled("This account has been disabled")
        return self._record_login(found, password, now)

    def _find_for_login(self, email: object) -> StoredUser | None:
        if not isinstance(email, str):
            return None
        return self.store.by_email(normalise_email(email))

    def _verify(self, password_hash: str | None, password: str) -> bool:
        """Whether *password* matches *password_hash* (``None``: a dummy hash, always False)."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
            password_hash, password = self._dummy_hash, ""
        try:
            return self.hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError, UnicodeEncodeError):
            return False

    def _record_failure(self, user_id: str, now: float) -> None:
        failures = self.store.add_failure(user_id)
        lockout = lockout_after(failures)
        if lockout:
            self.store.update(user_id, {"next_attempt": now + lockout})
            log.warning(
                "user %s locked for %g s after %d wrong passwords", user_id, lockout, failures
            )

    def _record_login(self, found: StoredUser, password: str, now: float) -> UserRecord:
        changes: UserChanges = {"last_login": now, "n_password_failures": 0, "next_attempt": 0.0}
        if self.hasher.check_needs_rehash(found.password_hash):
            changes["password_hash"] = self.hasher.hash(password)
        self.store.update(found.record.id, changes)
        return replace(found.record, last_login=now, n_password_failures=0)

    # -- looking up ----------------------------------------------------------------------------
    def get(self, user_id: str) -> UserRecord | None:
        """The user with that id, or ``None``."""
        found = self.store.get(user_id) if isinstance(user_id, str) else None
        return None if found is None else found.record

    def by_email(self, email: str) -> UserRecord | None:
        """The user with that email address (compared without case), or ``None``."""
        found = self._find_for_login(email)
        return None if found is None else found.record

    def list(self) -> list[UserRecord]:
        """Every user, in the order they signed up."""
        return [found.record for found in self.store.all()]

    # -- administration ------------------------------------------------------------------------
    def _existing(self, email: str) -> StoredUser:
        found = self._find_for_login(email)
        if found is None:
            raise NoSuchUser(f"no user has the email address {normalise_email(str(email))}")
        return found

    def set_enabled(self, email: str, enabled: bool) -> UserRecord:
        """Enable or disable the user with that email address.

        Raises
        ------
        NoSuchUser
            No user has that email address.
        """
        found = self._existing(email)
        self.store.update(found.record.id, {"enabled": bool(enabled)})
        log.info("user %s %s", found.record.email, "enabled" if enabled else "disabled")
        return replace(found.record, enabled=bool(enabled))

    def set_password(self, email: str, password: str) -> UserRecord:
        """Give the user with that email address a new password (and lift any lock-out).

        Raises
        ------
        NoSuchUser
            No user has that email address.
        PasswordNotAcceptable
            The password is too short or too long.
        """
        found = self._existing(email)
        password_hash = self.hasher.hash(_check_password(password))
        self.store.update(
            found.record.id,
            {"password_hash": password_hash, "n_password_failures": 0, "next_attempt": 0.0},
        )
        log.info("user %s has a new password", found.record.email)
        return replace(found.record, n_password_failures=0)
