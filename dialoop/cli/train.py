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
from dialoop.cli.config_file import ConfigFileError, read_config_file, write_config_file
from dialoop.train.config import RewardConfig, SFTConfig

C = TypeVar("C")

train_app = typer.Typer(
    help="Train a stage of the recipe: sft, rm (reward model), ppo.", no_args_is_help=True
)
app.add_typer(train_app, name="train")

console = Console(stderr=True)


CONFIG_HELP = (
    "A YAML file of these options (`batch_size: 8`); options given on the command line override it. "
    "A run saves its resolved options in its directory: `--config RUN_DIR/{saved_as}` repeats it."
)


def config_command(
    typer_app: typer.Typer,
    name: str,
    config_cls: type[C],
    help: str,
    *,
    saved_as: str = "train_config.yaml",
    leave_out: tuple[str, ...] = ("out", "resume"),
) -> Callable[[Callable[[C], Path | None]], Callable[[C], Path | None]]:
    """Decorator: register `fn(config)` as command `name`, with one option per field of `config_cls` and
    `--config FILE.yaml`. `fn` returns the run's directory (or None); the resolved options, but for
    `leave_out` (where a repeat must not write), are saved there as `saved_as`."""
    hints = typing.get_type_hints(config_cls)

    def decorator(fn: Callable[[C], Path | None]) -> Callable[[C], Path | None]:
        params = [
            inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(
                    None, "--config", help=CONFIG_HELP.format(saved_as=saved_as), show_default=False
                ),
                annotation=Path | None,
            ),
        ]
        for f in dataclasses.fields(config_cls):  # type: ignore[arg-type]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc,operator]
            flag = "--" + f.name.replace("_", "-")
            is_bool = hints[f.name] in (bool, bool | None)
            names = [f"{flag}/--no-{f.name.replace('_', '-')}"] if is_bool else [flag]
            names += f.metadata.get("short_flags", [])  # e.g. ["-v"]
            option = typer.Option(
                default, *names, help=f.metadata.get("help"), show_default=default is not None
            )
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]
                )
            )

        def command(ctx: typer.Context, config: Path | None = None, **kwargs: Any) -> None:
            if config is not None:
                kwargs |= _file_options(config, config_cls, ctx)
            try:
                resolved = config_cls(**kwargs)
            except ValueError as exc:
                raise typer.BadParameter(str(exc)) from exc
            run_dir = fn(resolved)
            if run_dir is not None and os.environ.get("RANK", "0") == "0":
                command_line = " ".join(["dialoop", *ctx.command_path.split()[1:]])
                header = f"{command_line} --config THIS_FILE repeats this run (its resolved options)"
                write_config_file(run_dir / saved_as, resolved, leave_out=leave_out, header=header)

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__name__ = name
        command.__doc__ = help
        typer_app.command(name, help=help)(command)
        return fn

    return decorator


def _file_options(path: Path, config_cls: type, ctx: typer.Context) -> dict[str, Any]:
    """The options of a config file that the command line does not give."""
    try:
        values = read_config_file(path, config_cls)
    except ConfigFileError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    return {
        key: value
        for key, value in values.items()
        if getattr(ctx.get_parameter_source(key), "name", None) != "COMMANDLINE"
    }


def run_stage(stage: Callable[[], Path]) -> Path:
    """Run a training stage and return its run dir; its known failures become one red line and exit code 1
    (2 for bad input)."""
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
    return out


@config_command(train_app, "sft", SFTConfig, "Supervised fine-tuning on demonstrations (store, or --data).")
def sft(config: SFTConfig) -> Path:
    def stage() -> Path:
        from dialoop.cli.data_sources import load_chat_examples
        from dialoop.train.sft import train_sft

        return train_sft(config, load_chat_examples(config.data, config.format))

    return run_stage(stage)


@config_command(train_app, "rm", RewardConfig, "The K-way reward model on rankings (store, or --data).")
def rm(config: RewardConfig) -> Path:
    def stage() -> Path:
        from dialoop.cli.data_sources import load_chat_examples, load_ranking_examples
        from dialoop.train.reward import train_reward_model

        rankings = load_ranking_examples(config.data, config.format)
        references = None
        if config.reference_data is not None:
            references = load_chat_examples(config.reference_data, config.reference_format)
        return train_reward_model(config, rankings, references=references)

    return run_stage(stage)
