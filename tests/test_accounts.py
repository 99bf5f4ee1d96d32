"""Users, argon2 passwords and hashed API keys, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import Engine, select, text

from dialoop.store import ApiKey, User, session_scope
from dialoop.store.accounts import (
    authenticate,
    create_api_key,
    create_user,
    get_user,
    hash_password,
    list_api_keys,
    list_users,
    revoke_api_key,
    set_password,
    user_for_api_key,
    verify_password,
)


def test_password_hash_is_salted_argon2id_and_verifies() -> None:
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1.startswith("$argon2id$") and h1 != h2
    assert "correct horse" not in h1
    assert verify_password(h1, "correct horse") and verify_password(h2, "correct horse")


def test_verify_password_rejects_wrong_password_and_malformed_hash() -> None:
    h = hash_password("pw")
    assert not verify_password(h, "pw ")
    assert not verify_password(h, "")
    assert not verify_password("not-a-hash", "pw")
    assert not verify_password("", "pw")


@pytest.mark.slow
def test_create_user_and_authenticate(engine: Engine) -> None:
    with session_scope(engine) as s:
        user = create_user(s, "alice", "trainer", "s3cret")
        assert user.id is not None and user.password_hash != "s3cret"
    with session_scope(engine) as s:
        found = authenticate(s, "alice", "s3cret")
        assert found is not None and (found.name, found.role) == ("alice", "trainer")
        assert authenticate(s, "alice", "wrong") is None
        assert authenticate(s, "nobody", "s3cret") is None
        assert [u.name for u in list_users(s)] == ["alice"]


@pytest.mark.parametrize(
    ("name", "role", "password", "message"),
    [
        ("bob", "root", "pw", "invalid role 'root'"),
        ("bob", "user", "", "password must not be empty"),
        ("", "user", "pw", "invalid user name"),
        ("bob smith", "user", "pw", "invalid user name"),
        ("alice", "user", "pw", "'alice' already exists"),
    ],
)
def test_create_user_rejects_bad_input(
    engine: Engine, name: str, role: str, password: str, message: str
) -> None:
    with session_scope(engine) as s:
        s.add(User(name="alice", role="admin", password_hash=hash_password("pw")))
    with pytest.raises(ValueError, match=message), session_scope(engine) as s:
        create_user(s, name, role, password)
    with session_scope(engine) as s:
        assert [u.name for u in list_users(s)] == ["alice"]


@pytest.mark.slow
def test_set_password_replaces_the_old_one(engine: Engine) -> None:
    with session_scope(engine) as s:
        set_password(s, create_user(s, "carol", "user", "old"), "new")
    with session_scope(engine) as s:
        assert authenticate(s, "carol", "old") is None
        assert authenticate(s, "carol", "new") is not None
        with pytest.raises(ValueError, match="empty"):
            set_password(s, get_user(s, "carol"), "")  # type: ignore[arg-type]


def test_api_key_is_stored_hashed_and_resolves_to_its_user(engine: Engine) -> None:
    with session_scope(engine) as s:
        key, plaintext = create_api_key(s, create_user(s, "dave", "user", "pw"), name="laptop")
        key_id = key.id
    assert plaintext.startswith("dl-") and len(plaintext) > 40
    with session_scope(engine) as s:
        row = s.get(ApiKey, key_id)
        assert row is not None
        assert row.key_hash == hashlib.sha256(plaintext.encode()).hexdigest()
        assert plaintext.startswith(row.prefix) and len(row.prefix) < len(plaintext) // 2
        assert (row.name, row.revoked_at) == ("laptop", None)
        # the plaintext is nowhere in the table
        for column_value in s.execute(text("SELECT * FROM api_keys")).one():
            assert plaintext not in str(column_value)
    with session_scope(engine) as s:
        user = user_for_api_key(s, plaintext)
        assert user is not None and user.name == "dave"
        assert user_for_api_key(s, plaintext + "x") is None
        assert user_for_api_key(s, "dl-unknown") is None
        assert user_for_api_key(s, "") is None


def test_revoked_api_key_is_refused(engine: Engine) -> None:
    with session_scope(engine) as s:
        dave = create_user(s, "dave", "user", "pw")
        erin = create_user(s, "erin", "user", "pw")
        old, old_plain = create_api_key(s, dave)
        _, new_plain = create_api_key(s, dave, "second")
        old_id, erin_id = old.id, erin.id
    with (
        pytest.raises(LookupError, match=f"no API key with id {old_id} for user 'erin'"),
        session_scope(engine) as s,
    ):
        revoke_api_key(s, old_id, user=s.get(User, erin_id))
    with session_scope(engine) as s:
        assert user_for_api_key(s, old_plain) is not None  # another user's revoke changed nothing
        revoked = revoke_api_key(s, old_id, user=get_user(s, "dave"))
        first_time = revoked.revoked_at
        assert first_time is not None
    with session_scope(engine) as s:
        assert user_for_api_key(s, old_plain) is None
        assert user_for_api_key(s, new_plain) is not None
        assert revoke_api_key(s, old_id).revoked_at == first_time  # revoking twice keeps the first time
        dave = get_user(s, "dave")
        assert dave is not None
        listed = list_api_keys(s, dave)
        assert [(k.name, k.revoked_at is None) for k in listed] == [("", False), ("second", True)]
        with pytest.raises(LookupError, match="no API key with id 999"):
            revoke_api_key(s, 999)


def test_deleting_a_user_deletes_their_api_keys(engine: Engine) -> None:
    with session_scope(engine) as s:
        _, plaintext = create_api_key(s, create_user(s, "frank", "user", "pw"))
    with session_scope(engine) as s:
        s.delete(get_user(s, "frank"))
    with session_scope(engine) as s:
        assert s.scalars(select(ApiKey)).all() == []
        assert user_for_api_key(s, plaintext) is None
