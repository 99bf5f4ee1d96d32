"""Users and API keys: argon2 password hashes, API keys stored as SHA-256 only.

Functions take a session and only flush; the caller's `session_scope` commits.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from dialoop.store.models import ROLES, ApiKey, User, utcnow

log = logging.getLogger(__name__)

API_KEY_PREFIX = "dl-"
_KEY_PREFIX_LEN = 10  # "dl-" plus 7 random characters: enough to tell keys apart in a listing
_NAME_RE = re.compile(r"[\w.@+-]{1,100}")

_hasher = PasswordHasher()
_dummy_hash: str | None = None


def hash_password(password: str) -> str:
    """An argon2id hash of `password` (salted, with its parameters encoded)."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when `password` matches `password_hash`; False for a wrong password or a malformed hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def get_user(session: Session, name: str) -> User | None:
    """The user called `name`, or None."""
    return session.scalars(select(User).where(User.name == name)).first()


def has_users(session: Session) -> bool:
    """True once the store has any user (a fresh store has none until the first admin is made)."""
    return session.scalars(select(User.id).limit(1)).first() is not None


def list_users(session: Session) -> list[User]:
    """All users, oldest first."""
    return list(session.scalars(select(User).order_by(User.id)))


def create_user(session: Session, name: str, role: str, password: str) -> User:
    """Add a user; ValueError names the problem (bad name or role, duplicate name, empty password)."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid user name {name!r}: use 1-100 letters, digits or the characters . _ @ + -")
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
    if not password:
        raise ValueError("the password must not be empty")
    if get_user(session, name) is not None:
        raise ValueError(f"a user named {name!r} already exists")
    user = User(name=name, role=role, password_hash=hash_password(password))
    session.add(user)
    session.flush()
    log.info("created user %s (%s)", name, role)
    return user


def set_password(session: Session, user: User, password: str) -> None:
    """Replace `user`'s password; ValueError when it is empty."""
    if not password:
        raise ValueError("the password must not be empty")
    user.password_hash = hash_password(password)
    session.flush()


def _admins_left_without(session: Session, user: User) -> int:
    return len([u for u in session.scalars(select(User).where(User.role == "admin")) if u.id != user.id])


def set_role(session: Session, user: User, role: str) -> None:
    """Give `user` another role; ValueError on an unknown role or when it would leave no admin."""
    if role not in ROLES:
        raise ValueError(f"invalid role {role!r}: choose one of {', '.join(ROLES)}")
    if user.role == "admin" and role != "admin" and _admins_left_without(session, user) == 0:
        raise ValueError(f"{user.name} is the only admin: make someone else admin first")
    user.role = role
    session.flush()
    log.info("user %s is now %s", user.name, role)


def delete_user(session: Session, user: User) -> None:
    """Delete `user` and their API keys; their conversations and rankings stay, without an owner.

    ValueError when it would leave no admin."""
    if user.role == "admin" and _admins_left_without(session, user) == 0:
        raise ValueError(f"{user.name} is the only admin and cannot be deleted")
    session.delete(user)
    session.flush()
    log.info("deleted user %s", user.name)


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The user when `name` and `password` match, else None (same cost whether or not the name exists)."""
    global _dummy_hash
    user = get_user(session, name)
    if user is None:
        # verify against a throwaway hash so that response time does not reveal which names exist
        if _dummy_hash is None:
            _dummy_hash = hash_password(secrets.token_hex(16))
        verify_password(_dummy_hash, password)
        return None
    if not verify_password(user.password_hash, password):
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
        session.flush()
    return user


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(session: Session, user: User, name: str = "") -> tuple[ApiKey, str]:
    """A new API key for `user`: the stored row and the plaintext, which is never stored or shown again."""
    if len(name) > 100:
        raise ValueError("an API key name is at most 100 characters")
    plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(user=user, name=name, prefix=plaintext[:_KEY_PREFIX_LEN], key_hash=_key_hash(plaintext))
    session.add(key)
    session.flush()
    log.info("created API key %d for user %s", key.id, user.name)
    return key, plaintext


def user_for_api_key(session: Session, key: str) -> User | None:
    """The owner of the plaintext `key`, or None when it is unknown or revoked."""
    if not key.startswith(API_KEY_PREFIX):
        return None
    row = session.scalars(
        select(ApiKey).where(ApiKey.key_hash == _key_hash(key), ApiKey.revoked_at.is_(None))
    ).first()
    return row.user if row is not None else None


def revoke_api_key(session: Session, key_id: int, *, user: User | None = None) -> ApiKey:
    """Revoke key `key_id` (idempotent); with `user`, only that user's key. LookupError when none matches."""
    key = session.get(ApiKey, key_id)
    if key is None or (user is not None and key.user_id != user.id):
        raise LookupError(f"no API key with id {key_id}" + (f" for user {user.name!r}" if user else ""))
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
        log.info("revoked API key %d", key_id)
    return key


def list_api_keys(session: Session, user: User) -> list[ApiKey]:
    """`user`'s API keys, revoked ones included, oldest first."""
    return list(session.scalars(select(ApiKey).where(ApiKey.user_id == user.id).order_by(ApiKey.id)))
