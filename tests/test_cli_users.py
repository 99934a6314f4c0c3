"""``anvil-nb users``: add, list, disable and enable an app's users from the command line.

Each test runs the real command (``python -m anvil_nb users ...``) as a subprocess on a data
dir under tmp_path. ``add`` reads the password from stdin (``--password-stdin`` is required;
one trailing newline is dropped), ``list`` never shows a hash, and a failure prints
``anvil-nb users: <message>`` on stderr with exit status 1 (2 for a usage error), never a
traceback. The users land in the app's database, ``config.app_database(data_dir, app)``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from anvil_nb.config import app_database
from anvil_nb.core.errors import AccountIsNotEnabled, AuthenticationFailed
from anvil_nb.host.users import SQLiteUserStore, Users

WAIT = 60
PASSWORD = "correct horse battery"


def users_cli(data_dir: Path, *args: str, stdin: str | bytes | None = None):
    """``python -m anvil_nb users ARGS --data-dir DATA_DIR``, finished."""
    return subprocess.run(
        [sys.executable, "-m", "anvil_nb", "users", *args, "--data-dir", str(data_dir)],
        input=stdin.encode() if isinstance(stdin, str) else stdin,
        capture_output=True,
        timeout=WAIT,
        check=False,
        cwd=data_dir.parent,
    )


def out(proc) -> str:
    return proc.stdout.decode()


def err(proc) -> str:
    return proc.stderr.decode()


def login(data_dir: Path, email: str, password: str, app: str = "default"):
    store = SQLiteUserStore(app_database(data_dir, app))
    try:
        return Users(store, hasher=PasswordHasher()).login(email, password)
    finally:
        store.close()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def add(data_dir, email, password=PASSWORD, *flags):
    return users_cli(data_dir, "add", email, "--password-stdin", *flags, stdin=password + "\n")


def test_users_add_signs_a_user_up_with_the_password_from_stdin(data_dir):
    added = add(data_dir, "Ann@Example.com")

    assert added.returncode == 0, err(added)
    assert "ann@example.com" in out(added)
    assert PASSWORD not in out(added) + err(added)
    user = login(data_dir, "ann@example.com", PASSWORD)  # the newline was not part of it
    assert user.email == "ann@example.com"
    assert (data_dir / "app.sqlite3").exists()


@pytest.mark.parametrize(
    ("stdin", "password"),
    [
        (b"pass word 1\r\n", "pass word 1"),
        (b"pass word 2", "pass word 2"),
        (b"pass word 3\n\n", "pass word 3\n"),
        ("p\u00e4ssw\u00f6rd\n".encode(), "p\u00e4ssw\u00f6rd"),
    ],
)
def test_exactly_one_trailing_newline_is_dropped_from_the_password(data_dir, stdin, password):
    added = users_cli(data_dir, "add", "ann@example.com", "--password-stdin", stdin=stdin)
    assert added.returncode == 0, err(added)
    assert login(data_dir, "ann@example.com", password).email == "ann@example.com"


def test_users_list_shows_users_as_text_and_json_never_a_hash(data_dir):
    assert add(data_dir, "ann@example.com").returncode == 0
    assert add(data_dir, "bob@example.com").returncode == 0
    login(data_dir, "bob@example.com", PASSWORD)

    text = users_cli(data_dir, "list")
    as_json = users_cli(data_dir, "list", "--json")

    assert text.returncode == 0 and as_json.returncode == 0, err(text) + err(as_json)
    listed = json.loads(out(as_json))
    assert [u["email"] for u in listed] == ["ann@example.com", "bob@example.com"]
    ann, bob = listed
    assert set(ann) >= {"email", "id", "enabled", "signed_up", "last_login"}
    assert ann["enabled"] is True and ann["last_login"] is None
    assert isinstance(bob["last_login"], float)
    lines = out(text).splitlines()
    assert lines[0].split() == ["EMAIL", "ID", "ENABLED", "SIGNED", "UP", "LAST", "LOGIN"]
    assert lines[1].startswith("ann@example.com") and ann["id"] in lines[1]
    assert lines[1].endswith("never") and "UTC" in lines[2]
    for shown in (out(text), out(as_json)):
        assert "argon2" not in shown and "hash" not in shown.lower() and PASSWORD not in shown


def test_users_list_of_an_app_without_users_is_empty_and_makes_nothing(data_dir):
    text = users_cli(data_dir, "list", "--app", "books")
    as_json = users_cli(data_dir, "list", "--app", "books", "--json")
    assert text.returncode == 0 and as_json.returncode == 0
    assert json.loads(out(as_json)) == []
    assert len(out(text).splitlines()) == 1  # the header only
    assert not data_dir.exists()


def test_users_of_one_app_are_not_those_of_another(data_dir):
    assert add(data_dir, "ann@example.com", PASSWORD, "--app", "My Books").returncode == 0
    books = json.loads(out(users_cli(data_dir, "list", "--app", "my-books", "--json")))
    default = json.loads(out(users_cli(data_dir, "list", "--json")))
    assert [u["email"] for u in books] == ["ann@example.com"]
    assert default == []
    assert (data_dir / "apps" / "my-books" / "app.sqlite3").exists()
    assert login(data_dir, "ann@example.com", PASSWORD, app="my-books")


def test_adding_an_existing_email_fails_with_a_message_and_no_traceback(data_dir):
    assert add(data_dir, "ann@example.com").returncode == 0
    again = add(data_dir, "ANN@example.com", "another password")
    assert again.returncode == 1
    assert err(again).startswith("anvil-nb users: ")
    assert "already exists" in err(again) and "ann@example.com" in err(again)
    assert "Traceback" not in err(again)
    assert login(data_dir, "ann@example.com", PASSWORD)  # the first password still works


@pytest.mark.parametrize(
    ("email", "password", "words"),
    [("ann@example.com", "s3cr&t", "at least 8"), ("not-an-email", PASSWORD, "email")],
)
def test_adding_with_a_bad_password_or_email_fails_saying_why(data_dir, email, password, words):
    bad = add(data_dir, email, password)
    assert bad.returncode == 1
    assert err(bad).startswith("anvil-nb users: ") and words in err(bad)
    assert password not in err(bad) + out(bad)
    assert "Traceback" not in err(bad)


def test_add_without_password_stdin_is_a_usage_error(data_dir):
    refused = users_cli(data_dir, "add", "ann@example.com", stdin=PASSWORD + "\n")
    assert refused.returncode == 2
    assert err(refused).startswith("anvil-nb users: ")
    assert "--password-stdin" in err(refused)
    assert "Traceback" not in err(refused)
    assert not data_dir.exists()  # nothing was made


def test_a_disabled_user_cannot_log_in_and_an_enabled_one_can(data_dir):
    assert add(data_dir, "ann@example.com").returncode == 0

    off = users_cli(data_dir, "disable", "Ann@example.com")

    assert off.returncode == 0, err(off)
    assert "disabled ann@example.com" in out(off)
    with pytest.raises(AccountIsNotEnabled):
        login(data_dir, "ann@example.com", PASSWORD)
    assert json.loads(out(users_cli(data_dir, "list", "--json")))[0]["enabled"] is False
    on = users_cli(data_dir, "enable", "ann@example.com")
    assert on.returncode == 0, err(on)
    assert login(data_dir, "ann@example.com", PASSWORD).enabled


@pytest.mark.parametrize("action", ["disable", "enable"])
def test_disabling_an_unknown_email_fails_naming_it(data_dir, action):
    no_database = users_cli(data_dir, action, "bob@example.com")
    assert add(data_dir, "ann@example.com").returncode == 0
    unknown = users_cli(data_dir, action, "bob@example.com")
    for proc in (no_database, unknown):
        assert proc.returncode == 1
        assert err(proc).startswith("anvil-nb users: ")
        assert "Traceback" not in err(proc)
    assert "bob@example.com" in err(unknown)
    with pytest.raises(AuthenticationFailed):
        login(data_dir, "bob@example.com", PASSWORD)


@pytest.mark.parametrize("action", [["list"], ["disable", "ann@example.com"]])
def test_a_bad_app_name_fails_clearly(data_dir, action):
    bad = users_cli(data_dir, *action, "--app=!!!")
    assert bad.returncode == 1
    assert err(bad).startswith("anvil-nb users: ")
    assert "does not name an app" in err(bad)
    assert "Traceback" not in err(bad)


def test_users_without_an_action_is_a_usage_error(data_dir):
    bare = users_cli(data_dir)
    assert bare.returncode == 2
    assert "usage: anvil-nb users" in err(bare)
