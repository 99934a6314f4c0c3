"""Configuration in one place: the data dir, the environment variables, apps and their keys.

* :func:`default_data_dir`: where a host keeps its apps, keys and sessions unless told
  otherwise (``anvil-nb serve --data-dir``, ``c.AnvilNB.data_dir``).
* ``ENV_*``: the environment a kernel reads to find its host and its notebook (the Jupyter
  extension sets the first three; jupyter_server sets ``JPY_SESSION_NAME``).
* Apps and their keys: one host serves many apps, and the uplink key selects the app.

An *app* is what Anvil calls an app: a name, its own server key and client key, and (on the
host) its own registry and sessions. The app ``default`` always exists. A :class:`KeyRing`
holds the keys of every app of a host and says which app and kind a key admits. With a data
dir it keeps them there, readable by the owner only:

* ``default``: ``DATA_DIR/keys.json`` (where anvil_nb has always kept the host's keys);
* any other app: ``DATA_DIR/apps/<name>/keys.json``, created on first use.

Without a data dir (the embedded host) keys live in memory. That folder of an app
(:func:`app_folder`) also holds its one SQLite file, :func:`app_database` (``app.sqlite3``:
its cookie sessions, its users, later its task records). No I/O beyond those files (and the
one-time rename of an older ``sessions.sqlite3`` to ``app.sqlite3``).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

__all__ = [
    "DEFAULT_APP",
    "ENV_KEY",
    "ENV_NOTEBOOK",
    "ENV_ROOT",
    "ENV_URL",
    "KeyRing",
    "Keys",
    "app_database",
    "app_folder",
    "app_name",
    "default_data_dir",
    "private_file",
]

#: The uplink URL of the host a kernel joins (set by the Jupyter extension).
ENV_URL = "ANVIL_NB_URL"
#: That host's server key for the ``default`` app (set by the Jupyter extension).
ENV_KEY = "ANVIL_NB_SERVER_KEY"
#: The Jupyter server's root dir, which notebook paths are relative to (set by the extension).
ENV_ROOT = "ANVIL_NB_ROOT"
#: Set by jupyter_server for a kernel started for a notebook: the notebook's path (absolute when
#: the frontend names the file, as JupyterLab does), which names the app the kernel joins.
ENV_NOTEBOOK = "JPY_SESSION_NAME"


def default_data_dir() -> Path:
    """Where apps, keys and sessions are kept by default (the user's data dir)."""
    return Path(platformdirs.user_data_dir("anvil_nb", appauthor=False))


#: The app that always exists; a kernel without a notebook, and every script that uses the
#: host's own keys, joins it.
DEFAULT_APP = "default"

_NOT_NAME = re.compile(r"[^a-z0-9]+")


def app_name(text: str) -> str:
    """*text* as an app name: lower case, runs of other characters as one ``-`` (at most 64).

    ``"Tutorials/01 Getting started.ipynb"`` becomes ``"tutorials-01-getting-started"``.

    Raises
    ------
    ValueError
        Nothing is left of *text* to name an app with.
    """
    stem = text[: -len(".ipynb")] if text.lower().endswith(".ipynb") else text
    name = _NOT_NAME.sub("-", stem.lower()).strip("-")[:64].strip("-")
    if not name:
        raise ValueError(f"{text!r} does not name an app (letters or digits are needed)")
    return name


def private_file(path: Path) -> None:
    """Make *path* (an empty file if missing) readable and writable by its owner only: an
    app's database holds session secrets and password hashes.

    Never opens the file when it exists: closing any descriptor of a file drops every POSIX
    lock this process holds on it, SQLite's included, and another process (``anvil-nb users``
    while a host runs) could then take the database for its own, checkpoint it and delete the
    WAL under this process's feet, losing what either wrote.
    """
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            with contextlib.suppress(PermissionError):  # a file of another user: leave it be
                path.chmod(0o600)


def app_folder(data_dir: Path, app: str) -> Path:
    """The folder *app*'s files are kept in: ``default`` in *data_dir* itself (where anvil_nb
    has always kept the host's files), any other app in ``data_dir/apps/<app>``.

    Raises
    ------
    ValueError
        *app* is not one path component (empty, ``.``, ``..``, or with a path separator);
        names made by :func:`app_name` never are.
    """
    if app in ("", ".", "..") or "/" in app or "\\" in app or "\0" in app:
        raise ValueError(f"{app!r} is not an app name (see anvil_nb.config.app_name)")
    data_dir = Path(data_dir)
    return data_dir if app == DEFAULT_APP else data_dir / "apps" / app


#: The file name of an app's database before it held more than sessions.
_OLD_DATABASE = "sessions.sqlite3"
_DATABASE = "app.sqlite3"


def app_database(data_dir: Path, app: str) -> Path:
    """*app*'s one SQLite file, ``app_folder(data_dir, app) / "app.sqlite3"``: its cookie
    sessions, its users and (later) its task records, each store owning its own tables.

    A folder written by an earlier anvil_nb keeps its sessions in ``sessions.sqlite3``: when
    there is such a file and no ``app.sqlite3``, it is renamed (with its ``-wal`` and ``-shm``
    files) so that nothing stored is lost. Nothing else is created: the stores make the file.

    Raises
    ------
    ValueError
        *app* is not an app name (see :func:`app_folder`).
    """
    folder = app_folder(data_dir, app)
    path = folder / _DATABASE
    old = folder / _OLD_DATABASE
    if old.exists() and not path.exists():
        # The companions first, the main file last: the -wal file may hold committed
        # transactions not yet copied into the main file, so it must never be left behind. A
        # rename cut short is finished by the next call (the old main file is still there).
        for suffix in ("-wal", "-shm"):
            companion = folder / (_OLD_DATABASE + suffix)
            if companion.exists():
                os.replace(companion, folder / (_DATABASE + suffix))
        os.replace(old, path)
    return path


@dataclass(frozen=True)
class Keys:
    """The uplink keys of one app: the server key admits trusted uplinks, the client key
    untrusted ones.
    """

    server_key: str
    client_key: str

    @classmethod
    def generate(cls) -> Keys:
        """A fresh pair of random keys."""
        return cls("server_" + secrets.token_urlsafe(18), "client_" + secrets.token_urlsafe(18))

    def kind_of(self, key: Any) -> str | None:
        """``"uplink"`` for the server key, ``"client_uplink"`` for the client key, else ``None``."""
        if not isinstance(key, str):
            return None
        given = key.encode("utf-8", "replace")
        if hmac.compare_digest(given, self.server_key.encode()):
            return "uplink"
        if hmac.compare_digest(given, self.client_key.encode()):
            return "client_uplink"
        return None


class KeyRing:
    """The keys of every app a host serves.

    Parameters
    ----------
    data_dir : Path, optional
        Where keys are kept (see the module docstring); ``None`` keeps them in memory.
    server_key, client_key : str, optional
        The keys of ``default`` as configured. A key not given is the stored one, or a new one;
        the pair is stored unless both were given.

    Raises
    ------
    ValueError
        The server key and the client key of ``default`` are the same, or a keys file is
        malformed.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        server_key: str | None = None,
        client_key: str | None = None,
    ):
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._keys: dict[str, Keys] = {}
        self._lock = threading.Lock()
        stored = self._load(DEFAULT_APP)
        fresh = Keys.generate()
        default = Keys(
            server_key or (stored.server_key if stored else fresh.server_key),
            client_key or (stored.client_key if stored else fresh.client_key),
        )
        if default.server_key == default.client_key:
            raise ValueError("the server key and the client key must differ")
        if default != stored and not (server_key and client_key):
            self._store(DEFAULT_APP, default)
        self._keys[DEFAULT_APP] = default
        #: Whether a key of ``default`` was generated now (so that it can be shown once).
        self.generated_default = (
            default.server_key == fresh.server_key or default.client_key == fresh.client_key
        )

    @classmethod
    def of(cls, keys: Keys | KeyRing) -> KeyRing:
        """*keys* as a key ring (a pair of keys becomes the keys of ``default``, in memory)."""
        if isinstance(keys, KeyRing):
            return keys
        return cls(None, keys.server_key, keys.client_key)

    @property
    def default(self) -> Keys:
        """The keys of ``default``."""
        return self._keys[DEFAULT_APP]

    def keys(self, app: str) -> Keys:
        """The keys of *app* (a name as :func:`app_name` makes), created and kept on first use."""
        with self._lock:
            found = self._keys.get(app)
            if found is None:
                found = self._load(app)
                if found is None:
                    found = Keys.generate()
                    self._store(app, found)
                self._keys[app] = found
            return found

    def names(self) -> list[str]:
        """Every app with keys: those seen by this key ring and those kept in the data dir."""
        names = set(self._keys)
        if self.data_dir is not None and (self.data_dir / "apps").is_dir():
            names.update(p.parent.name for p in (self.data_dir / "apps").glob("*/keys.json"))
        return sorted(names, key=lambda n: (n != DEFAULT_APP, n))

    def identify(self, key: Any) -> tuple[str, str] | None:
        """``(app, kind)`` for a key of any app (kind ``uplink`` or ``client_uplink``), else None."""
        for name in self.names():
            kind = self.keys(name).kind_of(key)
            if kind is not None:
                return name, kind
        return None

    # -- storage -------------------------------------------------------------------------------
    def path(self, app: str) -> Path | None:
        """The file *app*'s keys are kept in (``None`` in memory)."""
        if self.data_dir is None:
            return None
        return app_folder(self.data_dir, app) / "keys.json"

    def _load(self, app: str) -> Keys | None:
        path = self.path(app)
        if path is None or not path.exists():
            return None
        stored = json.loads(path.read_text())
        try:
            return Keys(str(stored["server_key"]), str(stored["client_key"]))
        except (KeyError, TypeError):
            raise ValueError(f"{path} does not hold a server_key and a client_key") from None

    def _store(self, app: str, keys: Keys) -> None:
        path = self.path(app)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"server_key": keys.server_key, "client_key": keys.client_key}, f)
