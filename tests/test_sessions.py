"""Session stores and the session manager (PROTOCOL.md §7, DESIGN.md "Sessions belong to the host").

Both stores must keep a record exactly as it was put (the Python session blob is opaque to the
host), forget it on delete and purge only records idle since before a cutoff. The SQLite store
must keep records across a close and reopen of its file ("survives a host restart") and stay
intact while several threads, several store objects and a second process write to one file.

The manager's idle clock is driven by a fake clock, so expiry is tested without waiting.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import anvil_nb
from anvil_nb.core.errors import SessionExpiredError
from anvil_nb.host.sessions import (
    MemorySessionStore,
    SessionManager,
    SessionRecord,
    SessionStore,
    SQLiteSessionStore,
)

BLOB = {"session": {"n": 1}, "objects": []}
CLIENT = {"type": "browser", "ip": "1.2.3.4", "location": {"city": "Cambridge"}}
TIMEOUT = 1800.0
JOIN_TIMEOUT = 60.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now


def secret_for(session_id: str) -> bytes:
    return hashlib.sha256(session_id.encode()).digest()


def numbered_record(session_id: str, n: int) -> SessionRecord:
    """A record whose every field can be checked later from its id and number."""
    return SessionRecord(
        id=session_id,
        secret=secret_for(session_id),
        data={"session": {"n": n, "id": session_id}, "objects": []},
        client={"type": "uplink", "ip": f"10.0.0.{n % 256}"},
        created=float(n),
        last_seen=float(n) + 0.5,
        version=n,
        persistent=True,  # what a store holds
    )


def assert_numbered_record(store: SessionStore, session_id: str, n: int) -> None:
    got = store.get(session_id)
    assert got is not None, session_id
    assert got == numbered_record(session_id, n)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SessionStore]:
    s: SessionStore
    if request.param == "memory":
        s = MemorySessionStore()
    else:
        s = SQLiteSessionStore(tmp_path / "s.sqlite3")
    yield s
    s.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "s.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def run_threads(targets: list, timeout: float = JOIN_TIMEOUT) -> None:
    """Run each target on its own thread, join them all, and re-raise the first failure."""
    errors: list[BaseException] = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "writer threads did not finish in time"
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------------
# Both stores


def test_store_put_then_get_returns_the_same_record(store: SessionStore) -> None:
    secret = bytes(range(32))
    record = SessionRecord(
        id="SESS1",
        secret=secret,
        data={"session": {"n": 1}, "objects": []},
        client=dict(CLIENT),
        created=10.0,
        last_seen=20.0,
        version=3,
    )
    store.put(record)

    got = store.get("SESS1")

    assert got is not None
    assert got.id == "SESS1"
    assert got.data == BLOB
    assert got.client == CLIENT
    assert got.secret == secret
    assert isinstance(got.secret, bytes)
    assert (got.created, got.last_seen, got.version) == (10.0, 20.0, 3)


def test_store_get_of_unknown_id_is_none(store: SessionStore) -> None:
    assert store.get("nobody") is None


def test_store_keeps_a_fresh_record_without_data_or_client(store: SessionStore) -> None:
    store.put(SessionRecord(id="fresh", secret=b"s" * 32))

    got = store.get("fresh")

    assert got is not None
    assert got.data is None
    assert got.client is None


def test_store_put_replaces_an_existing_record(store: SessionStore) -> None:
    store.put(numbered_record("a", 1))
    store.put(numbered_record("a", 2))

    assert_numbered_record(store, "a", 2)


def test_store_delete_removes_the_record_and_tolerates_unknown_ids(store: SessionStore) -> None:
    store.put(numbered_record("a", 1))
    store.put(numbered_record("b", 2))

    store.delete("a")
    store.delete("never-existed")

    assert store.get("a") is None
    assert_numbered_record(store, "b", 2)


def test_store_purge_idle_removes_only_records_last_seen_before_the_cutoff(
    store: SessionStore,
) -> None:
    for sid, seen in (("old1", 10.0), ("old2", 99.9), ("edge", 100.0), ("new", 150.0)):
        store.put(SessionRecord(id=sid, secret=b"k" * 32, data=BLOB, last_seen=seen))

    gone = store.purge_idle(100.0)

    assert sorted(gone) == ["old1", "old2"]
    assert store.get("old1") is None
    assert store.get("old2") is None
    assert store.get("edge") is not None
    assert store.get("new") is not None
    assert store.purge_idle(100.0) == []


# ---------------------------------------------------------------------------------------------
# SQLite


def test_sqlite_record_survives_closing_and_reopening_the_file(db_path: Path) -> None:
    first = SQLiteSessionStore(db_path)
    first.put(
        SessionRecord(
            id="SESS1",
            secret=b"\x00\xff" * 16,
            data={"session": {"n": 1}, "objects": []},
            client=dict(CLIENT),
            created=1.0,
            last_seen=2.0,
            version=7,
        )
    )
    first.close()

    second = SQLiteSessionStore(db_path)
    try:
        got = second.get("SESS1")
    finally:
        second.close()

    assert got is not None
    assert got.data == BLOB
    assert got.secret == b"\x00\xff" * 16
    assert got.version == 7
    assert got.client == CLIENT
    assert (got.created, got.last_seen) == (1.0, 2.0)


def test_sqlite_store_creates_the_missing_folder_of_its_file(tmp_path: Path) -> None:
    path = tmp_path / "does" / "not" / "exist" / "s.sqlite3"

    store = SQLiteSessionStore(path)
    try:
        store.put(numbered_record("a", 1))
        assert_numbered_record(store, "a", 1)
    finally:
        store.close()

    assert path.is_file()


def test_sqlite_one_store_shared_by_eight_writer_threads_keeps_every_record(
    db_path: Path,
) -> None:
    store = SQLiteSessionStore(db_path)
    start = threading.Barrier(8, timeout=JOIN_TIMEOUT)

    def writer(t: int):
        def run():
            start.wait()
            for i in range(50):
                store.put(numbered_record(f"t{t}-{i}", t * 1000 + i))

        return run

    try:
        run_threads([writer(t) for t in range(8)])
        for t in range(8):
            for i in range(50):
                assert_numbered_record(store, f"t{t}-{i}", t * 1000 + i)
    finally:
        store.close()


def test_sqlite_two_store_objects_on_one_file_written_from_two_threads(db_path: Path) -> None:
    stores = [SQLiteSessionStore(db_path), SQLiteSessionStore(db_path)]
    start = threading.Barrier(2, timeout=JOIN_TIMEOUT)

    def writer(k: int):
        def run():
            start.wait()
            for i in range(100):
                stores[k].put(numbered_record(f"s{k}-{i}", k * 1000 + i))

        return run

    try:
        run_threads([writer(0), writer(1)])
        for reader in stores:
            for k in range(2):
                for i in range(100):
                    assert_numbered_record(reader, f"s{k}-{i}", k * 1000 + i)
    finally:
        for s in stores:
            s.close()


CHILD_WRITER = textwrap.dedent(
    """
    import hashlib, sys, time
    from anvil_nb.host.sessions import SQLiteSessionStore, SessionRecord

    store = SQLiteSessionStore(sys.argv[1])
    store.put(SessionRecord(id="child-ready", secret=b"r" * 32))
    deadline = time.monotonic() + 30
    while store.get("parent-ready") is None:
        if time.monotonic() > deadline:
            sys.exit("the parent never got ready")
    for i in range(100):
        sid = f"child-{i}"
        store.put(SessionRecord(
            id=sid,
            secret=hashlib.sha256(sid.encode()).digest(),
            data={"session": {"n": 5000 + i, "id": sid}, "objects": []},
            client={"type": "uplink", "ip": f"10.0.0.{(5000 + i) % 256}"},
            created=float(5000 + i),
            last_seen=float(5000 + i) + 0.5,
            version=5000 + i,
        ))
    store.close()
    """
)


def test_sqlite_a_second_process_and_this_one_write_the_same_file_at_once(
    db_path: Path,
) -> None:
    store = SQLiteSessionStore(db_path)
    outcome: dict[str, object] = {}

    def child() -> None:
        try:
            outcome["result"] = subprocess.run(
                [sys.executable, "-c", CHILD_WRITER, str(db_path)],
                timeout=60,
                check=True,
                capture_output=True,
                text=True,
                cwd=Path(anvil_nb.__file__).resolve().parents[1],
            )
        except BaseException as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=child, daemon=True)
    runner.start()
    try:
        # Start writing only once the child is about to write too, so the writes overlap.
        deadline = time.monotonic() + 60
        while store.get("child-ready") is None and runner.is_alive():
            assert time.monotonic() < deadline, "the child process never opened the store"
        store.put(SessionRecord(id="parent-ready", secret=b"r" * 32))
        for i in range(100):
            store.put(numbered_record(f"parent-{i}", i))
    finally:
        runner.join(90)
    try:
        assert not runner.is_alive()
        error = outcome.get("error")
        if isinstance(error, subprocess.CalledProcessError):
            pytest.fail(f"child failed: {error.stderr}")
        assert error is None, error
        for i in range(100):
            assert_numbered_record(store, f"parent-{i}", i)
            assert_numbered_record(store, f"child-{i}", 5000 + i)
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------
# SessionManager


@pytest.fixture
def manager(store: SessionStore, clock: FakeClock) -> SessionManager:
    return SessionManager(store, timeout=TIMEOUT, clock=lambda: clock.now)


def test_manager_new_gives_a_random_id_and_a_32_byte_secret(
    manager: SessionManager, clock: FakeClock
) -> None:
    a = manager.new(client=dict(CLIENT), persistent=True)
    b = manager.new(persistent=True)

    assert a.id != b.id
    assert isinstance(a.id, str)
    assert len(a.id) >= 16
    assert isinstance(a.secret, bytes)
    assert len(a.secret) == 32
    assert len(b.secret) == 32
    assert a.secret != b.secret
    assert a.client == CLIENT
    assert a.data is None
    assert a.version == 0
    assert a.created == a.last_seen == clock.now


def test_manager_new_puts_the_session_in_the_store(
    manager: SessionManager, store: SessionStore
) -> None:
    record = manager.new(client=dict(CLIENT), persistent=True)

    stored = store.get(record.id)

    assert stored is not None
    assert stored.secret == record.secret
    assert stored.client == CLIENT


def test_manager_use_within_the_timeout_returns_the_session_and_moves_last_seen(
    manager: SessionManager, clock: FakeClock
) -> None:
    record = manager.new(persistent=True)
    clock.now += TIMEOUT - 1

    used = manager.use(record.id)

    assert used.id == record.id
    assert used.secret == record.secret
    assert used.last_seen == clock.now
    # Being used restarts the idle clock: another almost-timeout later it is still alive.
    clock.now += TIMEOUT - 1
    assert manager.use(record.id).last_seen == clock.now


def test_manager_use_after_the_timeout_raises_and_removes_the_session(
    manager: SessionManager, store: SessionStore, clock: FakeClock
) -> None:
    record = manager.new(persistent=True)
    clock.now += TIMEOUT + 1

    with pytest.raises(SessionExpiredError):
        manager.use(record.id)

    assert manager.get(record.id) is None
    assert store.get(record.id) is None
    with pytest.raises(SessionExpiredError):
        manager.use(record.id)


def test_manager_use_of_an_unknown_id_raises_session_expired(manager: SessionManager) -> None:
    with pytest.raises(SessionExpiredError):
        manager.use("no-such-session")


def test_manager_with_no_timeout_never_expires(store: SessionStore, clock: FakeClock) -> None:
    manager = SessionManager(store, timeout=None, clock=lambda: clock.now)
    record = manager.new(persistent=True)
    clock.now += 10 * 365 * 24 * 3600.0

    assert manager.use(record.id).id == record.id
    assert manager.purge() == []
    assert store.get(record.id) is not None


def test_manager_save_data_bumps_the_version_and_writes_to_the_store(
    manager: SessionManager, store: SessionStore, clock: FakeClock
) -> None:
    record = manager.new(persistent=True)
    clock.now += 5

    manager.save_data(record, BLOB)
    manager.save_data(record, {"session": {"n": 2}, "objects": []})

    assert record.version == 2
    assert record.last_seen == clock.now
    stored = store.get(record.id)
    assert stored is not None
    assert stored.data == {"session": {"n": 2}, "objects": []}
    assert stored.version == 2


def test_manager_saved_data_is_seen_by_a_new_manager_over_the_same_sqlite_file(
    db_path: Path, clock: FakeClock
) -> None:
    first = SessionManager(SQLiteSessionStore(db_path), timeout=TIMEOUT, clock=lambda: clock.now)
    record = first.new(client=dict(CLIENT), persistent=True)
    first.save_data(record, BLOB)
    first.close()

    second = SessionManager(SQLiteSessionStore(db_path), timeout=TIMEOUT, clock=lambda: clock.now)
    try:
        clock.now += 60
        got = second.use(record.id)
        assert got.data == BLOB
        assert got.version == 1
        assert got.secret == record.secret
        assert got.client == CLIENT
    finally:
        second.close()


def test_manager_drop_removes_the_session(manager: SessionManager, store: SessionStore) -> None:
    record = manager.new(persistent=True)
    other = manager.new(persistent=True)

    manager.drop(record.id)

    assert manager.get(record.id) is None
    assert store.get(record.id) is None
    with pytest.raises(SessionExpiredError):
        manager.use(record.id)
    assert manager.use(other.id).id == other.id


def test_manager_purge_removes_expired_sessions_and_keeps_fresh_ones(
    manager: SessionManager, store: SessionStore, clock: FakeClock
) -> None:
    stale = [manager.new(persistent=True), manager.new(persistent=True)]
    fresh_by_use = manager.new(persistent=True)
    clock.now += 1000
    manager.use(fresh_by_use.id)
    fresh_new = manager.new(persistent=True)
    clock.now += TIMEOUT - 1000 + 1  # the first three are now idle for longer than TIMEOUT

    gone = manager.purge()

    assert sorted(gone) == sorted(r.id for r in stale)
    for r in stale:
        assert manager.get(r.id) is None
        assert store.get(r.id) is None
    for r in (fresh_by_use, fresh_new):
        assert store.get(r.id) is not None
        assert manager.use(r.id).id == r.id
    assert manager.purge() == []


def test_manager_flush_persists_last_seen_of_used_sessions(db_path: Path, clock: FakeClock) -> None:
    manager = SessionManager(SQLiteSessionStore(db_path), timeout=TIMEOUT, clock=lambda: clock.now)
    reader = SQLiteSessionStore(db_path)
    try:
        used = manager.new(persistent=True)
        idle = manager.new(persistent=True)
        created = clock.now
        clock.now += 100

        manager.use(used.id)
        manager.flush()

        seen_used = reader.get(used.id)
        seen_idle = reader.get(idle.id)
        assert seen_used is not None
        assert seen_idle is not None
        assert seen_used.last_seen == clock.now
        assert seen_idle.last_seen == created
    finally:
        reader.close()
        manager.close()


def test_manager_purge_in_a_second_manager_keeps_a_session_the_first_used_and_flushed(
    db_path: Path, clock: FakeClock
) -> None:
    first = SessionManager(SQLiteSessionStore(db_path), timeout=TIMEOUT, clock=lambda: clock.now)
    second = SessionManager(SQLiteSessionStore(db_path), timeout=TIMEOUT, clock=lambda: clock.now)
    try:
        record = first.new(persistent=True)
        clock.now += TIMEOUT - 1
        first.use(record.id)
        first.flush()
        clock.now += 2  # idle TIMEOUT + 1 since creation, but only 2 s since the use

        assert second.purge() == []
        assert second.use(record.id).id == record.id
    finally:
        first.close()
        second.close()
