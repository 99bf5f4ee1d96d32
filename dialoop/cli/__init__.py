"""The `dialoop` command. Argument handling only: the logic lives in the packages it calls."""

# each module below registers its commands on `app`
from dialoop.cli._app import app

__all__ = ["app"]
