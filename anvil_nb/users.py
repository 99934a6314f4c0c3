"""``anvil_nb.users``: the app's users, mirroring ``anvil.users``.

Examples
--------
>>> from anvil_nb import users
>>> user = users.signup_with_email("ann@example.com", "correct horse")  # doctest: +SKIP
>>> user["email"]  # doctest: +SKIP
'ann@example.com'

Each app has its own users table (in its ``app.sqlite3``; ``anvil-nb users`` manages it from a
shell). Who is logged in belongs to the session of the call (a browser's cookie session, an
uplink connection's session): inside a server function these act on the caller's session.
A user is a row: ``user["email"]``, ``user.get_id()``. Passwords are hashed with argon2 and
never leave the host; repeated wrong passwords lock the account for a growing time.
"""

from __future__ import annotations

from typing import Any

from anvil_nb import server
from anvil_nb.core.errors import (
    AccountIsNotEnabled,
    AuthenticationFailed,
    EmailNotConfirmed,
    PasswordNotAcceptable,
    TooManyPasswordFailures,
    UserExists,
)

__all__ = [
    "AccountIsNotEnabled",
    "AuthenticationFailed",
    "EmailNotConfirmed",
    "PasswordNotAcceptable",
    "TooManyPasswordFailures",
    "UserExists",
    "force_login",
    "get_user",
    "login_with_email",
    "logout",
    "signup_with_email",
]


def get_user(allow_remembered: bool = True) -> Any:
    """The logged-in user of the current session (a row), or ``None``."""
    return server.call("anvil.private.users.get_current_user", allow_remembered=allow_remembered)


def login_with_email(email: str, password: str, remember: bool = False) -> Any:
    """Log the current session in; the user's row.

    Raises
    ------
    AuthenticationFailed
        Wrong email address or password (one message for both).
    TooManyPasswordFailures
        Too many wrong passwords for this account lately; the message says how long to wait.
    AccountIsNotEnabled
        The account has been disabled.
    """
    return server.call("anvil.private.users.login_with_email", email, password, remember=remember)


def signup_with_email(email: str, password: str, remember: bool = False) -> Any:
    """Make a new user and log the current session in as them; the user's row.

    Raises
    ------
    UserExists
        A user has that email address already.
    PasswordNotAcceptable
        Not an email address, or a password shorter than 8 characters.
    """
    return server.call("anvil.private.users.signup_with_email", email, password, remember=remember)


def logout(invalidate_client_objects: bool = False) -> None:
    """Log the current session out."""
    server.call("anvil.private.users.logout", invalidate_client_objects=invalidate_client_objects)


def force_login(user: Any, remember: bool = False) -> Any:
    """Log the current session in as *user* (a row this app gave out) without a password.
    Server code only.
    """
    return server.call("anvil.private.users.force_login", user, remember=remember)
