"""The `dialoop` command. Argument handling only: the logic lives in the packages it calls."""

# each module below registers its commands on `app`
from dialoop.cli import admin  # noqa: F401
from dialoop.cli import bench  # noqa: F401
from dialoop.cli import data  # noqa: F401
from dialoop.cli import loop  # noqa: F401
from dialoop.cli import serve  # noqa: F401
from dialoop.cli import train  # noqa: F401
from dialoop.cli import train_ppo  # noqa: F401
from dialoop.cli._app import app

__all__ = ["app"]
