"""Administration commands: `dialoop stats`, `dialoop users ...`, `dialoop keys ...`."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from dialoop.cli._app import app
from dialoop.settings import settings
from dialoop.store import User, session_scope
from dialoop.store.accounts import (
    create_api_key,
    create_user,
    get_user,
    list_api_keys,
    list_users,
    revoke_api_key,
)
from dialoop.store.migrate import open_store
from dialoop.store.models import ROLES
from dialoop.store.stats import store_stats

console = Console()
err_console = Console(stderr=True)

users_app = typer.Typer(help="Add and list users.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys for the OpenAI-compatible /v1 API.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")


def _shown_url() -> str:
    return make_url(settings().db_url).render_as_string(hide_password=True)


@contextmanager
def _store() -> Iterator[Session]:
    """A session on the configured store (upgraded first); ValueError/LookupError exit 1 with the message."""
    try:
        engine = open_store(settings().db_url)
    except OperationalError as exc:
        err_console.print(
            f"[red]error:[/red] cannot open the store {_shown_url()}: {str(exc.orig).strip()}",
            highlight=False,
        )
        raise typer.Exit(1) from exc
    try:
        with session_scope(engine) as session:
            yield session
    except (ValueError, LookupError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()


def _user(session: Session, name: str) -> User:
    user = get_user(session, name)
    if user is None:
        raise LookupError(f"no user named {name!r}")
    return user


def _stdin_is_tty() -> bool:
    return sys.stdin.isatty()


def _read_password() -> str:
    """A hidden prompt with confirmation on a terminal; otherwise the first line of stdin."""
    if _stdin_is_tty():
        return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\r\n")


@app.command()
def stats(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """How many users, conversations, messages, tasks, rankings, feedback, models and runs the store holds."""
    with _store() as session:
        counts = store_stats(session)
    if as_json:
        typer.echo(json.dumps(counts))
        return
    table = Table("table", "rows")
    for key, value in counts.items():
        table.add_row(key.replace("_", " "), str(value))
    console.print(
        f"store: {make_url(settings().db_url).render_as_string(hide_password=True)}", highlight=False
    )
    console.print(table)


@users_app.command("add")
def users_add(
    name: str = typer.Argument(..., help="Login name."),
    role: str = typer.Option(..., "--role", help=f"One of: {', '.join(ROLES)}."),
) -> None:
    """Add a user; the password comes from a hidden prompt, or from stdin when it is not a terminal."""
    if role not in ROLES:  # checked before asking for a password that would be thrown away
        err_console.print(f"[red]error:[/red] invalid role {role!r}: choose one of {', '.join(ROLES)}")
        raise typer.Exit(1)
    password = _read_password()
    with _store() as session:
        user = create_user(session, name, role, password)
        console.print(f"added {user.role} [bold]{user.name}[/bold] (id {user.id})", highlight=False)


@users_app.command("list")
def users_list() -> None:
    """List users with their role and number of active API keys."""
    with _store() as session:
        table = Table("id", "name", "role", "created", "API keys")
        for user in list_users(session):
            active = sum(k.revoked_at is None for k in user.api_keys)
            table.add_row(
                str(user.id), user.name, user.role, f"{user.created_at:%Y-%m-%d %H:%M}", str(active)
            )
    console.print(table)


@keys_app.command("create")
def keys_create(
    user_name: str = typer.Argument(..., metavar="USER", help="The user the key acts as."),
    name: str = typer.Option("", "--name", help="A label to recognise the key by."),
) -> None:
    """Create an API key and print it once (on stdout, alone); only its hash is stored."""
    with _store() as session:
        key, plaintext = create_api_key(session, _user(session, user_name), name)
        key_id = key.id
    typer.echo(plaintext)
    err_console.print(
        f"API key {key_id} for {user_name}: store it now, it cannot be shown again.", highlight=False
    )


@keys_app.command("list")
def keys_list(user_name: str = typer.Argument(..., metavar="USER")) -> None:
    """List a user's API keys (prefix only) and whether they are revoked."""
    with _store() as session:
        table = Table("id", "name", "prefix", "created", "revoked")
        for key in list_api_keys(session, _user(session, user_name)):
            revoked = f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else ""
            table.add_row(
                str(key.id), key.name, key.prefix + "...", f"{key.created_at:%Y-%m-%d %H:%M}", revoked
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: int = typer.Argument(..., metavar="KEY_ID")) -> None:
    """Revoke an API key: requests with it are refused from now on."""
    with _store() as session:
        key = revoke_api_key(session, key_id)
        console.print(f"revoked API key {key.id} ({key.prefix}...) of {key.user.name}", highlight=False)
