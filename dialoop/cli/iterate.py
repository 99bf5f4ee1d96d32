"""`dialoop demo`, `dialoop iterate`, `dialoop eval`: the whole loop, one iteration, the report card."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from dialoop.cli._app import app
from dialoop.cli.train import config_command
from dialoop.iteration import IterationKnobs
from dialoop.settings import settings

console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    if not verbose:
        # the stages' own bars and lines say what happens; per-load bars and reports would drown them
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _fail(exc: BaseException) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(2)


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def _print_card(report: dict[str, Any]) -> None:
    table = Table(title="Report card (held-out prompts)")
    for column in ("model", "gold", "win vs SFT", "EOS", "tokens", "KL to SFT"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for m in report["models"]:
        table.add_row(
            m["name"],
            _fmt(m["gold_mean"]),
            _fmt(m["win_rate_vs_sft"], percent=True),
            _fmt(m["eos_rate"], percent=True),
            f"{m['mean_length_tokens']:.1f}",
            _fmt(m["kl_to_sft"]),
        )
    console.print(table)
    rm = report.get("reward_model")
    if rm:
        console.print(
            f"reward model accuracy vs gold order: {_fmt(rm['accuracy'], True)} on {rm['pairs']} pairs"
            f" of {rm['model']}'s replies"
        )
        if rm["final_model"] != rm["model"]:
            console.print(
                f"  on {rm['final_model']}'s replies: {_fmt(rm['accuracy_final_model'], True)}"
                f" on {rm['pairs_final_model']} pairs"
            )
    comparisons = report.get("rm_comparisons")
    if comparisons:
        console.print(
            "reward model's comparisons: " + ", ".join(f"{n} {source}" for source, n in comparisons.items())
        )
    for name, target in (report.get("targets") or {}).items():
        met = "[green]met[/green]" if target["pass"] else "[red]not met[/red]"
        console.print(f"  {met}  {name}: {_fmt(target['value'])} (target {target['threshold']})")


@dataclass
class DemoOptions:
    """The options of `dialoop demo` (also read from `--config FILE.yaml`; the demo saves the resolved ones in
    its directory as `demo_config.yaml`). A budget left unset keeps the demo's own (`demo_config`)."""

    out: Path | None = field(
        default=None,
        metadata={"help": "Directory for the store, models and report (default: DIALOOP_HOME/demos/<time>)."},
    )
    quick: bool = field(
        default=False, metadata={"help": "A tiny model and tiny budgets: every stage in seconds."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the simulated trainers, prompts and training."})
    trainers: int | None = field(default=None, metadata={"help": "Simulated trainers."})
    demonstrations: int | None = field(default=None, metadata={"help": "Demonstrations written for SFT."})
    chats_per_round: int | None = field(
        default=None, metadata={"help": "Chats per round, one comparison task each."}
    )
    rounds: int | None = field(default=None, metadata={"help": "RM + PPO iterations after SFT."})
    verbose: bool = field(
        default=False, metadata={"help": "Log what each stage does.", "short_flags": ["-v"]}
    )


@config_command(
    app,
    "demo",
    DemoOptions,
    "Run the whole loop with simulated trainers: demonstrations, SFT, chats, rankings, RM, PPO, twice.",
    saved_as="demo_config.yaml",
    leave_out=("out",),
)
def demo(options: DemoOptions) -> Path:
    # imported when the command runs: the demo imports torch, which other commands do without
    from dialoop.demo import demo_config, run_demo

    _setup_logging(options.verbose)
    out = options.out or settings().home / "demos" / time.strftime("%Y%m%d-%H%M%S")
    config = demo_config(out, quick=options.quick, seed=options.seed)
    budgets = {
        name: getattr(options, name)
        for name in ("trainers", "demonstrations", "chats_per_round", "rounds")
        if getattr(options, name) is not None
    }
    config = dataclasses.replace(config, **budgets)
    config.on_stage = lambda stage, seconds: console.print(
        f"[green]✓[/green] {stage} [dim]({seconds:.0f} s)[/dim]"
    )
    started = time.perf_counter()
    try:
        result = run_demo(config)
    except (FileExistsError, ValueError) as exc:
        raise _fail(exc) from exc
    _print_card(result.report)
    console.print(f"\ntotal {time.perf_counter() - started:.0f} s")
    console.print(f"report: [bold]{result.report_path}[/bold]  (and {result.out / 'report.json'})")
    if "policy" in result.models:
        console.print(f"chat with the result: [bold]dialoop serve --model {result.models['policy']}[/bold]")
    return result.out


@dataclass
class IterateOptions(IterationKnobs):
    """The options of `dialoop iterate`: the iteration's knobs, where its runs go and how much it logs."""

    work_dir: Path | None = field(
        default=None, metadata={"help": "Where runs go (default: DIALOOP_HOME/runs)."}
    )
    verbose: bool = field(
        default=False, metadata={"help": "Log what each stage does.", "short_flags": ["-v"]}
    )


@config_command(
    app,
    "iterate",
    IterateOptions,
    "One iteration on the store: SFT (new demonstrations), RM (all rankings), PPO; resumes after a crash.",
    saved_as="iterate_config.yaml",
    leave_out=(),
)
def iterate(options: IterateOptions) -> Path:
    # imported when the command runs: the loop imports torch, which other commands do without
    from dialoop.loop import IterationConfig, NothingToTrain, run_iteration
    from dialoop.store.migrate import open_store

    _setup_logging(options.verbose)
    try:
        config = IterationConfig.from_knobs(
            options,
            work_dir=options.work_dir,
            on_stage=lambda stage, status: console.print(f"[bold]{stage}[/bold]: {status}"),
        )
    except ValueError as exc:
        raise _fail(exc) from exc
    engine = open_store(settings().db_url)
    try:
        result = run_iteration(engine, config)
    except (NothingToTrain, FileExistsError, ValueError) as exc:
        raise _fail(exc) from exc
    finally:
        engine.dispose()
    table = Table(title=f"Iteration {result.iteration}")
    for column in ("stage", "status", "version", "seconds", "note"):
        table.add_column(column)
    for s in result.stages.values():
        table.add_row(s.stage, s.status, str(s.version_id or "–"), f"{s.seconds:.0f}", s.note)
    console.print(table)
    if result.report is not None:
        _print_card(result.report)
        console.print(f"report: [bold]{result.work_dir / 'report' / 'report.html'}[/bold]")
    console.print(f"policy version {result.policy_version_id}" + (" is served" if options.deploy else ""))
    return result.work_dir


@app.command("eval")
def eval_(
    model: Path = typer.Option(..., "--model", help="The model to evaluate (an HF directory)."),
    sft: Path | None = typer.Option(None, "--sft", help="The SFT model: win rate and KL are against it."),
    rm: Path | None = typer.Option(None, "--rm", help="A reward model: its accuracy against the gold order."),
    out: Path | None = typer.Option(
        None, "--out", help="Report directory (default: DIALOOP_HOME/evals/<time>)."
    ),
    prompts: int = typer.Option(128, help="Held-out prompts (the sim eval split)."),
    max_new_tokens: int = typer.Option(96, help="Longest reply sampled."),
    temperature: float = typer.Option(0.7, help="Sampling temperature (the KL is measured at it)."),
    seed: int = typer.Option(0, help="Which eval prompts, and the sampling seeds."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each stage does."),
) -> None:
    """The report card of a model on held-out prompts: gold score, win rate and KL vs SFT, RM accuracy."""
    # imported when the command runs: the report card imports torch, which other commands do without
    from dialoop.evaluate import EvalConfig, ModelSpec, evaluate_models, write_report
    from dialoop.modeling import ModelLoadError

    _setup_logging(verbose)
    models = ([ModelSpec("sft", sft)] if sft is not None else []) + [ModelSpec("model", model)]
    try:
        config = EvalConfig(
            prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed
        )
        report, samples = evaluate_models(
            models, sft="sft" if sft is not None else None, reward_model=rm, config=config
        )
    except (ModelLoadError, ValueError, OSError) as exc:
        raise _fail(exc) from exc
    path = write_report(report, out or settings().home / "evals" / time.strftime("%Y%m%d-%H%M%S"), samples)
    _print_card(report)
    console.print(f"report: [bold]{path}[/bold]")
