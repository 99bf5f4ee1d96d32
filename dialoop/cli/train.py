"""`dialoop train sft|rm|ppo`: one option per field of the stage's config dataclass.

`config_command(train_app, "name", ConfigCls, help)` registers `fn(config)` as a command whose options are
the config's fields (`--batch-size 8`, `--packing/--no-packing`); the PPO stage adds its command the same way.
Distributed: `accelerate launch --multi_gpu --num_processes N -m dialoop.cli train sft ...` runs the same
commands (on a machine without GPUs the processes train on the CPU over gloo). The data is loaded here
(`dialoop.cli.data_sources`, a file or the store) and handed to the stage.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from dialoop.cli._app import app
from dialoop.train.config import RewardConfig, SFTConfig

C = TypeVar("C")

train_app = typer.Typer(
    help="Train a stage of the recipe: sft, rm (reward model), ppo.", no_args_is_help=True
)
app.add_typer(train_app, name="train")

console = Console(stderr=True)


def config_command(
    typer_app: typer.Typer, name: str, config_cls: type[C], help: str
) -> Callable[[Callable[[C], None]], Callable[[C], None]]:
    """Decorator: register `fn(config)` as command `name`, with one option per field of `config_cls`."""
    hints = typing.get_type_hints(config_cls)

    def decorator(fn: Callable[[C], None]) -> Callable[[C], None]:
        params = []
        for f in dataclasses.fields(config_cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            flag = "--" + f.name.replace("_", "-")
            names = [f"{flag}/--no-{f.name.replace('_', '-')}"] if hints[f.name] is bool else [flag]
            names += f.metadata.get("short_flags", [])  # e.g. ["-v"]
            option = typer.Option(
                default, *names, help=f.metadata.get("help"), show_default=default is not None
            )
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]
                )
            )

        def command(**kwargs: Any) -> None:
            try:
                config = config_cls(**kwargs)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from exc
            fn(config)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__name__ = name
        command.__doc__ = help
        typer_app.command(name, help=help)(command)
        return fn

    return decorator


def run_stage(stage: Callable[[], Path]) -> None:
    """Run a training stage; its known failures become one red line and exit code 1 (2 for bad input)."""
    from dialoop.train.strategy import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = stage()
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    except NonFiniteLossError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
        console.print(f"[green]model written to[/green] {out}")


@config_command(train_app, "sft", SFTConfig, "Supervised fine-tuning on demonstrations (store, or --data).")
def sft(config: SFTConfig) -> None:
    def stage() -> Path:
        from dialoop.cli.data_sources import load_chat_examples
        from dialoop.train.sft import train_sft

        return train_sft(config, load_chat_examples(config.data, config.format))

    run_stage(stage)


@config_command(train_app, "rm", RewardConfig, "The K-way reward model on rankings (store, or --data).")
def rm(config: RewardConfig) -> None:
    def stage() -> Path:
        from dialoop.cli.data_sources import load_chat_examples, load_ranking_examples
        from dialoop.train.reward import train_reward_model

        rankings = load_ranking_examples(config.data, config.format)
        references = None
        if config.reference_data is not None:
            references = load_chat_examples(config.reference_data, config.reference_format)
        return train_reward_model(config, rankings, references=references)

    run_stage(stage)
