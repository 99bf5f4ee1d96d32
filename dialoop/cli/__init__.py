"""The `dialoop` command. Argument handling only: the logic lives in the packages it calls."""

from dialoop.cli import data, users  # noqa: F401  (each module registers its commands)
from dialoop.cli._app import app

__all__ = ["app"]
