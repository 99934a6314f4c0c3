"""The users of an app (anvil_nb.host.users), their errors, and where their database lives.

``Users`` is the policy (sign-up, login with per-account throttling, administration) over a
``UserStore``; ``SQLiteUserStore`` keeps users in the ``users`` table of the app's one SQLite
file, ``config.app_database(data_dir, app)``, beside the sessions table. Passwords are argon2id
hashes; a wrong password and an unknown email fail alike; after 3 wrong passwords in a row each
further one locks the account for twice as long (1 s, 2 s, ... at most 300 s), during which a
login is refused without the password being checked. The errors travel as
``anvil.users.<Name>`` with the real client's hierarchy.

Every test uses real SQLite files under tmp_path and a clock of its own (no sleeping).
"""

from __future__ import annotations

import ast
import concurrent.futures
import sqlite3
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from support.uplink import install_anvil_uplink

from anvil_nb.config import DEFAULT_APP, KeyRing, app_database, app_folder
from anvil_nb.core import errors
from anvil_nb.core.errors import (
    AccountIsNotEnabled,
    AnvilError,
    AnvilWrappedError,
    AuthenticationFailed,
    EmailNotConfirmed,
    PasswordNotAcceptable,
    TooManyPasswordFailures,
    UserExists,
    error_from_wire,
    error_to_wire,
)
from anvil_nb.host.sessions import SessionRecord, SQLiteSessionStore
from anvil_nb.host.users import (
    MAX_LOCKOUT,
    NoSuchUser,
    SQLiteUserStore,
    StoredUser,
    UserRecord,
    Users,
    lockout_after,
)

PASSWORD = "correct horse battery"
USERS_ERRORS = [
    "UserExists",
    "AuthenticationFailed",
    "EmailNotConfirmed",
    "AccountIsNotEnabled",
    "TooManyPasswordFailures",
    "PasswordNotAcceptable",
]


def cheap_hasher(**params) -> PasswordHasher:
    return PasswordHasher(**{"time_cost": 1, "memory_cost": 8, "parallelism": 1, **params})


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class CountingHasher(PasswordHasher):
    """A real (cheap) argon2 hasher that counts its verifications."""

    def __init__(self):
        super().__init__(time_cost=1, memory_cost=8, parallelism=1)
        self.verified = 0

    def verify(self, hash, password):
        self.verified += 1
        return super().verify(hash, password)


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "app.sqlite3"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db):
    s = SQLiteUserStore(db)
    yield s
    s.close()


@pytest.fixture
def users(store, clock) -> Users:
    return Users(store, hasher=cheap_hasher(), now=clock)


def raw_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT * FROM users").fetchall()
    conn.close()
    return rows


def user_version(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.close()
    return version


# ---------------------------------------------------------------------------------------------
# Sign-up and login


def test_signup_then_login_returns_the_same_user_with_its_login_recorded(users, clock):
    made = users.signup("ann@example.com", PASSWORD)
    assert isinstance(made, UserRecord)
    assert made.email == "ann@example.com" and made.enabled
    assert made.signed_up == clock.t and made.last_login is None
    assert isinstance(made.id, str) and made.id

    clock.t += 60
    back = users.login("ann@example.com", PASSWORD)

    assert back.id == made.id
    assert back.last_login == clock.t
    assert users.get(made.id).last_login == clock.t
    assert users.get("no-such-id") is None


def test_a_wrong_password_and_an_unknown_email_fail_with_the_same_message(users):
    users.signup("ann@example.com", PASSWORD)
    with pytest.raises(AuthenticationFailed) as wrong:
        users.login("ann@example.com", PASSWORD + "!")
    with pytest.raises(AuthenticationFailed) as unknown:
        users.login("bob@example.com", PASSWORD)
    assert type(wrong.value) is AuthenticationFailed
    assert type(unknown.value) is AuthenticationFailed
    assert str(wrong.value) == str(unknown.value) == "Incorrect email address or password"


def test_an_unknown_email_is_checked_against_a_hash_too(store):
    hasher = CountingHasher()
    users = Users(store, hasher=hasher)
    with pytest.raises(AuthenticationFailed):
        users.login("nobody@example.com", PASSWORD)
    assert hasher.verified == 1  # as long as a real check: no telling who has an account


def test_emails_are_compared_without_case_and_surrounding_blanks(users):
    made = users.signup("  Ann@Example.COM ", PASSWORD)
    assert made.email == "ann@example.com"
    assert users.login("ANN@example.com", PASSWORD).id == made.id
    assert users.by_email(" ann@EXAMPLE.com").id == made.id


def test_a_second_signup_with_the_same_email_raises_user_exists(users):
    users.signup("ann@example.com", PASSWORD)
    with pytest.raises(UserExists, match="ann@example.com"):
        users.signup("ANN@example.com ", "another password")
    assert len(users.list()) == 1


def test_two_signups_at_once_with_one_email_make_one_user(db, clock):
    results: list[object] = []
    barrier = threading.Barrier(2)

    def sign_up():
        store = SQLiteUserStore(db)
        try:
            barrier.wait(10)
            results.append(Users(store, hasher=cheap_hasher()).signup("ann@example.com", PASSWORD))
        except UserExists as exc:
            results.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=sign_up) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(type(r).__name__ for r in results) == ["UserExists", "UserRecord"]


@pytest.mark.parametrize(
    ("email", "password", "words"),
    [
        ("no-at-sign", PASSWORD, "email"),
        ("@example.com", PASSWORD, "email"),
        ("ann@", PASSWORD, "email"),
        ("ann@b@example.com", PASSWORD, "email"),
        ("ann smith@example.com", PASSWORD, "email"),
        ("ann@example.com", "", "at least 8"),
        ("ann@example.com", "seven77", "at least 8"),
        ("ann@example.com", "x" * 1025, "too long"),
        ("ann@example.com", None, "string"),
        ("ann@example.com", "surrogate\udcff!", "not valid Unicode"),
    ],
)
def test_signup_refuses_a_bad_email_or_password_saying_what_was_wrong(
    users, email, password, words
):
    with pytest.raises(PasswordNotAcceptable, match=words) as caught:
        users.signup(email, password)
    if password:
        assert str(password) not in str(caught.value)
    assert users.list() == []


def test_a_login_with_an_unencodable_password_fails_like_a_wrong_one(users):
    users.signup("ann@example.com", PASSWORD)
    with pytest.raises(AuthenticationFailed) as caught:
        users.login("ann@example.com", PASSWORD + "\udcff")
    assert type(caught.value) is AuthenticationFailed
    assert caught.value.__context__ is None
    assert users.by_email("ann@example.com").n_password_failures == 1


def test_a_password_of_exactly_eight_characters_is_accepted(users):
    users.signup("ann@example.com", "12345678")
    assert users.login("ann@example.com", "12345678").email == "ann@example.com"


# ---------------------------------------------------------------------------------------------
# Disabled accounts and administration


def test_a_disabled_account_cannot_log_in_until_enabled_again(users):
    users.signup("ann@example.com", PASSWORD)

    off = users.set_enabled("Ann@example.com", False)

    assert off.enabled is False and users.by_email("ann@example.com").enabled is False
    with pytest.raises(AccountIsNotEnabled):
        users.login("ann@example.com", PASSWORD)
    # The wrong password says nothing about the account's state.
    with pytest.raises(AuthenticationFailed) as wrong:
        users.login("ann@example.com", "not the password")
    assert type(wrong.value) is AuthenticationFailed
    users.set_enabled("ann@example.com", True)
    assert users.login("ann@example.com", PASSWORD).enabled


def test_administering_an_unknown_email_raises_no_such_user_naming_it(users):
    with pytest.raises(NoSuchUser, match="bob@example.com") as caught:
        users.set_enabled("Bob@example.com", False)
    assert isinstance(caught.value, LookupError)
    with pytest.raises(NoSuchUser, match="bob@example.com"):
        users.set_password("bob@example.com", PASSWORD)


def test_set_password_replaces_the_old_one(users):
    users.signup("ann@example.com", PASSWORD)
    users.set_password("ann@example.com", "a brand new one")
    with pytest.raises(AuthenticationFailed):
        users.login("ann@example.com", PASSWORD)
    assert users.login("ann@example.com", "a brand new one").email == "ann@example.com"
    with pytest.raises(PasswordNotAcceptable):
        users.set_password("ann@example.com", "short")


def test_list_returns_every_user_in_sign_up_order(users, clock):
    for name in ("cy", "ann", "bob"):
        clock.t += 1
        users.signup(f"{name}@example.com", PASSWORD)
    assert [u.email for u in users.list()] == [
        "cy@example.com",
        "ann@example.com",
        "bob@example.com",
    ]


# ---------------------------------------------------------------------------------------------
# Throttling


def test_lockouts_start_after_three_failures_double_and_stop_at_300_seconds():
    assert [lockout_after(n) for n in range(8)] == [0, 0, 0, 0, 1, 2, 4, 8]
    assert lockout_after(12) == 256
    assert lockout_after(13) == MAX_LOCKOUT == 300
    assert lockout_after(10_000) == 300


def fail(users, times=1):
    for _ in range(times):
        with pytest.raises(AuthenticationFailed) as caught:
            users.login("ann@example.com", "wrong password")
        assert type(caught.value) is AuthenticationFailed


def test_three_failures_cost_nothing_then_each_failure_locks_the_account_longer(store, clock):
    hasher = CountingHasher()
    users = Users(store, hasher=hasher, now=clock)
    users.signup("ann@example.com", PASSWORD)
    fail(users, 3)
    assert store.by_email("ann@example.com").next_attempt == 0
    fail(users)  # the 4th: locked for 1 s

    clock.t += 0.5
    checked = hasher.verified
    with pytest.raises(TooManyPasswordFailures, match=r"try again in 1 second\b"):
        users.login("ann@example.com", PASSWORD)  # even the right password
    assert hasher.verified == checked  # refused without checking the password
    assert users.by_email("ann@example.com").n_password_failures == 4

    clock.t += 0.5
    fail(users)  # the 5th: 2 s
    clock.t += 1
    with pytest.raises(TooManyPasswordFailures, match="try again in 1 second"):
        users.login("ann@example.com", PASSWORD)
    clock.t += 1
    fail(users)  # the 6th: 4 s
    with pytest.raises(TooManyPasswordFailures, match="try again in 4 seconds"):
        users.login("ann@example.com", PASSWORD)


def test_the_lockout_stops_growing_at_300_seconds(users, store, clock):
    users.signup("ann@example.com", PASSWORD)
    for n in range(1, 16):
        fail(users)
        locked_for = store.by_email("ann@example.com").next_attempt - clock.t
        assert locked_for == min(300, 2 ** (n - 4)) if n > 3 else locked_for <= 0
        clock.t += 301
    assert store.by_email("ann@example.com").record.n_password_failures == 15
    fail(users)
    with pytest.raises(TooManyPasswordFailures, match="try again in 300 seconds"):
        users.login("ann@example.com", PASSWORD)


def test_a_successful_login_clears_the_failures(users, store, clock):
    users.signup("ann@example.com", PASSWORD)
    fail(users, 4)  # the 4th locks for 1 s
    clock.t += 1
    fail(users)  # the 5th for 2 s
    assert store.by_email("ann@example.com").next_attempt == clock.t + 2
    clock.t += 2

    back = users.login("ann@example.com", PASSWORD)

    assert back.n_password_failures == 0
    stored = store.by_email("ann@example.com")
    assert stored.record.n_password_failures == 0 and stored.next_attempt == 0
    fail(users)  # counting starts again: a first failure locks nothing
    assert users.login("ann@example.com", PASSWORD).last_login == clock.t


def test_failures_are_per_account(users):
    users.signup("ann@example.com", PASSWORD)
    users.signup("bob@example.com", PASSWORD)
    fail(users, 4)
    with pytest.raises(TooManyPasswordFailures):
        users.login("ann@example.com", PASSWORD)
    assert users.login("bob@example.com", PASSWORD).email == "bob@example.com"


def test_concurrent_failures_are_all_counted(db, store):
    users = Users(store, hasher=cheap_hasher())
    user = users.signup("ann@example.com", PASSWORD)

    def count_failures():
        other = SQLiteUserStore(db)  # another connection, as another process would have
        for _ in range(25):
            other.add_failure(user.id)
        other.close()

    threads = [threading.Thread(target=count_failures) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert users.get(user.id).n_password_failures == 100


# ---------------------------------------------------------------------------------------------
# What is kept, and where


def test_the_database_keeps_an_argon2id_hash_never_the_password(users, db):
    users.signup("ann@example.com", PASSWORD)
    (row,) = raw_rows(db)
    hashes = [v for v in row if isinstance(v, str) and v.startswith("$argon2id$")]
    assert len(hashes) == 1
    assert not any(isinstance(v, str) and PASSWORD in v for v in row)
    for path in db.parent.glob("app.sqlite3*"):
        assert PASSWORD.encode() not in path.read_bytes()


def test_neither_record_nor_stored_user_shows_the_hash_or_password(users, store):
    record = users.signup("ann@example.com", PASSWORD)
    stored = store.by_email("ann@example.com")
    assert stored.password_hash.startswith("$argon2id$")
    for shown in (repr(record), str(record), repr(stored), str(stored)):
        assert "argon2" not in shown and PASSWORD not in shown
        assert "ann@example.com" in shown
    assert not hasattr(record, "password_hash")


def test_the_database_file_is_readable_by_its_owner_only(tmp_path):
    loose = tmp_path / "loose.sqlite3"
    loose.touch(mode=0o644)
    loose.chmod(0o644)
    SQLiteUserStore(loose).close()
    fresh = tmp_path / "apps" / "books" / "app.sqlite3"
    SQLiteUserStore(fresh).close()
    for path in (loose, fresh):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_two_stores_on_one_file_see_each_others_users(db):
    first, second = SQLiteUserStore(db), SQLiteUserStore(db)
    try:
        a, b = Users(first, hasher=cheap_hasher()), Users(second, hasher=cheap_hasher())
        made = a.signup("ann@example.com", PASSWORD)
        assert b.login("ann@example.com", PASSWORD).id == made.id
        b.set_enabled("ann@example.com", False)
        with pytest.raises(AccountIsNotEnabled):
            a.login("ann@example.com", PASSWORD)
        with pytest.raises(UserExists):
            b.signup("ann@example.com", PASSWORD)
    finally:
        first.close()
        second.close()


def test_users_added_from_many_threads_are_all_kept(db):
    store = SQLiteUserStore(db)
    users = Users(store, hasher=cheap_hasher())

    def add(i):
        users.signup(f"user{i}@example.com", PASSWORD)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    store.close()
    again = SQLiteUserStore(db)
    assert sorted(u.email for u in Users(again).list()) == sorted(
        f"user{i}@example.com" for i in range(8)
    )
    again.close()


def test_users_and_sessions_share_the_app_database(db):
    users_store = SQLiteUserStore(db)
    Users(users_store, hasher=cheap_hasher()).signup("ann@example.com", PASSWORD)
    sessions = SQLiteSessionStore(db)  # sets up its own table and version, after ours
    sessions.put(SessionRecord("s1", created=1.0, last_seen=1.0, persistent=True))
    version = user_version(db)
    assert version > 0  # the sessions store's
    again = SQLiteUserStore(db)
    try:
        assert again.by_email("ann@example.com") is not None
        assert sessions.get("s1") is not None
        with sqlite3.connect(db) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        conn.close()
        assert {"users", "sessions"} <= tables
        assert user_version(db) == version  # untouched by the users store
    finally:
        for s in (users_store, sessions, again):
            s.close()


def test_a_hash_made_with_weaker_parameters_is_replaced_at_login(store):
    weak = Users(store, hasher=cheap_hasher(time_cost=1))
    weak.signup("ann@example.com", PASSWORD)
    before = store.by_email("ann@example.com").password_hash
    assert "t=1" in before

    stronger = Users(store, hasher=cheap_hasher(time_cost=2))
    stronger.login("ann@example.com", PASSWORD)

    after = store.by_email("ann@example.com").password_hash
    assert after != before and "t=2" in after
    stronger.login("ann@example.com", PASSWORD)
    assert store.by_email("ann@example.com").password_hash == after  # no rehash when current


def test_stored_user_is_what_the_store_returns(store, users):
    users.signup("ann@example.com", PASSWORD)
    found = store.by_email("ann@example.com")
    assert isinstance(found, StoredUser)
    assert store.get(found.record.id) == found
    assert store.all() == [found]
    assert store.update(found.record.id, {"enabled": False})
    assert not store.update("no-such-id", {"enabled": False})
    with pytest.raises(ValueError, match="email"):
        store.update(found.record.id, {"email": "x@y"})  # type: ignore[typeddict-unknown-key]


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("name", USERS_ERRORS)
def test_users_errors_travel_as_anvil_users_names_and_come_back_as_themselves(name):
    cls = getattr(errors, name)
    assert name in errors.__all__
    assert issubclass(cls, AnvilError)
    try:
        raise cls("went wrong")
    except cls as exc:
        wire = error_to_wire(exc)
    assert wire["type"] == f"anvil.users.{name}"
    assert wire["message"] == "went wrong"
    back = error_from_wire(wire)
    assert type(back) is cls
    assert str(back) == "went wrong"


def real_client_bases() -> dict[str, str]:
    """``{class: base}`` as the real anvil-uplink client's anvil/users/exceptions.py has it."""
    source = install_anvil_uplink() / "anvil" / "users" / "exceptions.py"
    bases = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.ClassDef):
            bases[node.name] = ast.unparse(node.bases[0]).rsplit(".", 1)[-1]
    return bases


def test_users_errors_have_the_real_clients_hierarchy():
    real = real_client_bases()
    for name in USERS_ERRORS:
        ours = getattr(errors, name).__bases__
        assert [b.__name__ for b in ours] == [real[name]], name
    assert issubclass(TooManyPasswordFailures, AuthenticationFailed)
    assert issubclass(AccountIsNotEnabled, AuthenticationFailed)
    assert issubclass(EmailNotConfirmed, AuthenticationFailed)
    assert issubclass(UserExists, AnvilWrappedError)
    assert not issubclass(PasswordNotAcceptable, AuthenticationFailed)


# ---------------------------------------------------------------------------------------------
# Where an app's database lives (anvil_nb.config)


def test_app_folder_is_the_data_dir_for_default_and_apps_name_otherwise(tmp_path):
    assert app_folder(tmp_path, DEFAULT_APP) == tmp_path
    assert app_folder(tmp_path, "books") == tmp_path / "apps" / "books"
    assert app_database(tmp_path, "books") == tmp_path / "apps" / "books" / "app.sqlite3"
    assert app_database(tmp_path, DEFAULT_APP) == tmp_path / "app.sqlite3"
    for bad in ("", ".", "..", "a/b", "../x", "a\\b"):
        with pytest.raises(ValueError, match="not an app name"):
            app_folder(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_keys_are_kept_in_the_app_folder(tmp_path):
    ring = KeyRing(tmp_path)
    ring.keys("books")
    assert ring.path("books") == app_folder(tmp_path, "books") / "keys.json"
    assert ring.path(DEFAULT_APP) == app_folder(tmp_path, DEFAULT_APP) / "keys.json"
    assert ring.path("books").exists()


def test_an_old_sessions_file_becomes_the_app_database_with_its_wal(tmp_path):
    # A database whose last rows are still in its -wal file (the writer has not closed it),
    # copied as it is, as a host stopped hard would leave it.
    live = tmp_path / "live"
    live.mkdir()
    writer = sqlite3.connect(live / "sessions.sqlite3", isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("CREATE TABLE kept (v TEXT)")
    writer.execute("INSERT INTO kept VALUES ('from the wal')")
    folder = tmp_path / "apps" / "books"
    folder.mkdir(parents=True)
    for suffix in ("", "-wal", "-shm"):
        (folder / f"sessions.sqlite3{suffix}").write_bytes(
            (live / f"sessions.sqlite3{suffix}").read_bytes()
        )
    writer.close()
    assert (folder / "sessions.sqlite3-wal").stat().st_size > 0

    path = app_database(tmp_path, "books")

    assert path == folder / "app.sqlite3"
    assert sorted(p.name for p in folder.iterdir()) == [
        "app.sqlite3",
        "app.sqlite3-shm",
        "app.sqlite3-wal",
    ]
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("from the wal",)]
    conn.close()


def test_an_existing_app_database_is_never_replaced_by_an_old_sessions_file(tmp_path):
    (tmp_path / "app.sqlite3").write_bytes(b"new")
    (tmp_path / "sessions.sqlite3").write_bytes(b"old")
    assert app_database(tmp_path, DEFAULT_APP).read_bytes() == b"new"
    assert (tmp_path / "sessions.sqlite3").read_bytes() == b"old"


def test_a_change_made_by_another_process_is_seen_by_a_host_holding_the_database(tmp_path: Path):
    """A host holds the app's database open (sessions, and users on a pool thread) while
    ``anvil-nb users`` changes it from another process: the host sees the change at once, and
    nothing either wrote is lost. (Opening a store must never open and close a descriptor of
    the file: that drops the process's SQLite locks, and the other process could then delete
    the WAL under the host; tests/test_http_real.py caught that end to end.)
    """
    path = app_database(tmp_path, DEFAULT_APP)
    sessions = SQLiteSessionStore(path)  # the host's first connection
    users = Users(SQLiteUserStore(path), hasher=cheap_hasher())
    pool = concurrent.futures.ThreadPoolExecutor(1)  # as the host's password pool
    try:
        pool.submit(users.signup, "lock@example.com", "the password").result(10)
        pool.submit(users.login, "lock@example.com", "the password").result(10)
        other = subprocess.run(
            [sys.executable, "-m", "anvil_nb", "users", "disable", "lock@example.com", "--data-dir", str(tmp_path)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert other.returncode == 0, other.stderr
        with pytest.raises(AccountIsNotEnabled):
            pool.submit(users.login, "lock@example.com", "the password").result(10)
    finally:
        pool.shutdown()
        users.store.close()
        sessions.close()
    assert (
        not Users(SQLiteUserStore(path), hasher=cheap_hasher()).by_email("lock@example.com").enabled
    )
