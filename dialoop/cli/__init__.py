"""The `dialoop` command. Argument handling only: the logic lives in the packages it calls.

A command imports the packages it runs (torch, the trainers, the server) inside its function, so that
`dialoop users ...` or `dialoop --help` starts without loading torch."""

# each module below registers its commands on `app`
from dialoop.cli import (
    admin,  # noqa: F401
    bench,  # noqa: F401
    data,  # noqa: F401
    export,  # noqa: F401
    iterate,  # noqa: F401
    serve,  # noqa: F401
    train,  # noqa: F401
    train_ppo,  # noqa: F401
)
from dialoop.cli._app import app

__all__ = ["app"]
