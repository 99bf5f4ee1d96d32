"""The root `dialoop` typer app; each module of this package registers its commands on it."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="dialoop",
    help="Dialoop: demonstrations, comparisons, SFT, reward model, PPO, and a chat assistant.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
