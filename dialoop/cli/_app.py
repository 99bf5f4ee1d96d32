"""The root `dialoop` typer app; each module of this package registers its commands on it."""

from __future__ import annotations

from pathlib import Path

import typer

from dialoop.settings import configure

app = typer.Typer(
    name="dialoop",
    help="Dialoop: demonstrations, comparisons, SFT, reward model, PPO, and a chat assistant.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    home: Path | None = typer.Option(
        None, "--home", help="Data directory (default: $DIALOOP_HOME or ~/.dialoop).", show_default=False
    ),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Store URL, e.g. postgresql://user@host/db (default: $DIALOOP_DATABASE_URL or SQLite in home).",
        show_default=False,
    ),
) -> None:
    """Dialoop: demonstrations, comparisons, SFT, reward model, PPO, and a chat assistant."""
    configure(home=home, database_url=database_url)
