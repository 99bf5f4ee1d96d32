"""`dialoop stats`, `dialoop users ...`, `dialoop keys ...` and the global --home/--database-url flags."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner, Result

from dialoop.cli import admin, app
from dialoop.store import session_scope
from dialoop.store.accounts import authenticate, list_users, user_for_api_key
from dialoop.store.registry import register_model_version
from dialoop.store.stats import store_stats

runner = CliRunner()


def dialoop(*args: str, input: str | None = None) -> Result:
    return runner.invoke(app, list(args), input=input)


@pytest.fixture
def store(db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    """The CLI pointed (through DIALOOP_DATABASE_URL) at a fresh store on SQLite and on PostgreSQL."""
    monkeypatch.setenv("DIALOOP_DATABASE_URL", db_url)
    yield engine


def test_users_add_reads_the_password_from_stdin(store: Engine) -> None:
    result = dialoop("users", "add", "alice", "--role", "trainer", input="s3cret pass\n")
    assert result.exit_code == 0, result.output
    assert "added trainer alice" in result.stdout
    with session_scope(store) as s:
        user = authenticate(s, "alice", "s3cret pass")
        assert user is not None and user.role == "trainer"


def test_users_list_shows_names_and_roles(store: Engine) -> None:
    for name, role in [("alice", "admin"), ("bob", "user")]:
        assert dialoop("users", "add", name, "--role", role, input="pw\n").exit_code == 0
    result = dialoop("users", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("alice" in line and "admin" in line for line in lines)
    assert any("bob" in line and "user" in line for line in lines)


@pytest.mark.parametrize(
    ("args", "password", "message"),
    [
        (["alice", "--role", "user"], "other\n", "a user named 'alice' already exists"),
        (["bob", "--role", "owner"], "pw\n", "invalid role 'owner'"),
        (["bob", "--role", "user"], "\n", "password must not be empty"),
        (["bob", "--role", "user"], "", "password must not be empty"),
    ],
)
def test_users_add_errors_exit_nonzero_and_change_nothing(
    store: Engine, args: list[str], password: str, message: str
) -> None:
    assert dialoop("users", "add", "alice", "--role", "admin", input="pw\n").exit_code == 0
    result = dialoop("users", "add", *args, input=password)
    assert result.exit_code == 1
    assert message in result.stderr
    with session_scope(store) as s:
        assert [u.name for u in list_users(s)] == ["alice"]
        assert authenticate(s, "alice", "pw") is not None


def test_users_add_prompts_hidden_with_confirmation_on_a_terminal(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "_stdin_is_tty", lambda: True)
    result = dialoop("users", "add", "carol", "--role", "user", input="one\ntwo\nright\nright\n")
    assert result.exit_code == 0, result.output
    assert "one" not in result.stdout and "right" not in result.stdout  # the typed password is not echoed
    assert "do not match" in result.output
    with session_scope(store) as s:
        assert authenticate(s, "carol", "right") is not None


def test_keys_create_prints_a_key_the_store_accepts_until_revoked(store: Engine) -> None:
    assert dialoop("users", "add", "dave", "--role", "user", input="pw\n").exit_code == 0
    result = dialoop("keys", "create", "dave", "--name", "laptop")
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("dl-") and "\n" not in key
    assert "cannot be shown again" in result.stderr
    with session_scope(store) as s:
        user = user_for_api_key(s, key)
        assert user is not None and user.name == "dave"

    listed = dialoop("keys", "list", "dave")
    assert listed.exit_code == 0, listed.output
    assert "laptop" in listed.stdout and key[:10] in listed.stdout and key not in listed.stdout

    revoked = dialoop("keys", "revoke", "1")
    assert revoked.exit_code == 0, revoked.output
    with session_scope(store) as s:
        assert user_for_api_key(s, key) is None
    missing = dialoop("keys", "revoke", "99")
    assert missing.exit_code == 1 and "no API key with id 99" in missing.stderr


def test_keys_for_an_unknown_user_exit_nonzero(store: Engine) -> None:
    for args in (["keys", "create", "ghost"], ["keys", "list", "ghost"]):
        result = dialoop(*args)
        assert result.exit_code == 1 and "no user named 'ghost'" in result.stderr
    with session_scope(store) as s:
        assert store_stats(s)["users"] == 0


def test_stats_json_prints_the_store_counts(store: Engine) -> None:
    assert dialoop("users", "add", "erin", "--role", "admin", input="pw\n").exit_code == 0
    with session_scope(store) as s:
        register_model_version(s, name="base", kind="policy", path="/m")
    result = dialoop("stats", "--json")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["users"] == 1 and counts["model_versions"] == 1 and counts["messages"] == 0
    with session_scope(store) as s:
        assert counts == store_stats(s)
    table = dialoop("stats")
    assert table.exit_code == 0 and "model versions" in table.stdout


def test_home_flag_creates_and_upgrades_an_empty_store(tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    result = dialoop("--home", str(home), "stats", "--json")
    assert result.exit_code == 0, result.output
    assert set(json.loads(result.stdout).values()) == {0}
    assert (home / "dialoop.db").is_file()


def test_database_url_flag_overrides_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_url: str
) -> None:
    monkeypatch.setenv("DIALOOP_DATABASE_URL", f"sqlite:///{tmp_path / 'from-env.db'}")
    result = dialoop("--database-url", sqlite_url, "users", "add", "fay", "--role", "user", input="pw\n")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "from-env.db").exists()
    assert "fay" in dialoop("--database-url", sqlite_url, "users", "list").stdout


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'is-a-dir'}"
    (tmp_path / "is-a-dir").mkdir()
    result = dialoop("--database-url", url, "stats")
    assert result.exit_code == 1
    assert "cannot open the store" in result.stderr
