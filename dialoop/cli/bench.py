"""`dialoop bench ...`: the speed and memory benchmarks (targets live here, never in timed tests)."""

from __future__ import annotations

import json
import logging

import typer
from rich.console import Console
from rich.table import Table

from dialoop.cli._app import app

console = Console()
err_console = Console(stderr=True)

bench_app = typer.Typer(help="Benchmarks: speed and memory targets.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("serve")
def bench_serve_command(
    model: str | None = typer.Option(
        None, "--model", help="HF model directory (default: the embedded default).", show_default=False
    ),
    concurrency: str = typer.Option("1,4,8", "--concurrency", help="Comma-separated numbers of streams."),
    rounds: int = typer.Option(2, "--rounds", help="Rounds of simultaneous streams per level."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="max_tokens of each request."),
    threads: int | None = typer.Option(
        None, "--threads", help="torch CPU threads (default: torch's choice).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Time to first token and aggregate tokens/s of the server for 1, 4 and 8 concurrent streams."""
    from dialoop.bench.serve import bench_serve

    logging.basicConfig(level=logging.WARNING)
    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
        result = bench_serve(model, concurrency=levels, rounds=rounds, max_tokens=max_tokens, threads=threads)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"dialoop bench serve ({result['device']}, max_tokens={result['max_tokens']})")
    for column in ("streams", "requests", "tokens", "tokens/s", "TTFT p50 ms", "TTFT p95 ms"):
        table.add_column(column, justify="right")
    for lv in result["levels"]:
        table.add_row(
            str(lv["concurrency"]),
            str(lv["requests"]),
            str(lv["completion_tokens"]),
            f"{lv['tokens_per_s']:.1f}",
            f"{lv['ttft_p50_ms']:.0f}",
            f"{lv['ttft_p95_ms']:.0f}",
        )
    console.print(table)
    verdict = "[green]meets[/green]" if result["meets_target"] else "[red]misses[/red]"
    console.print(
        f"speedup at {result['speedup_at']} streams: {result['speedup']}x, {verdict} the "
        f"{result['target_speedup']}x target"
    )


@bench_app.command("web")
def bench_web_command(
    users: int = typer.Option(500, "--users", min=1, help="Simulated people (every other one a trainer)."),
    duration: float = typer.Option(60.0, "--duration", min=1, help="Seconds of load after all have started."),
    workers: int = typer.Option(
        2, "--workers", min=1, help="Web processes of the server (`serve --workers`)."
    ),
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Store to run on (default: a new database on --postgres, dropped afterwards).",
        show_default=False,
    ),
    postgres: str = typer.Option(
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "--postgres",
        help="PostgreSQL server for the new database.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="HF model directory (default: a tiny random model).", show_default=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Simulated trainers and users (log in, pages, chat, rank, demonstrations) against `dialoop serve
    --workers N`: errors other than 429, p50/p95 latency per route, writes acknowledged vs found."""
    from dialoop.bench.web import bench_web

    logging.basicConfig(level=logging.WARNING)
    try:
        result = bench_web(
            users=users,
            duration_s=duration,
            workers=workers,
            database_url=database_url,
            postgres_url=postgres,
            model=model,
        )
    except (ValueError, RuntimeError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"dialoop bench web ({users} people, {workers} workers, {result['store']})")
    for column in ("route", "requests", "p50 ms", "p95 ms", "statuses"):
        table.add_column(column, justify="right" if column != "route" else "left")
    for route, row in result["routes"].items():
        table.add_row(
            route, str(row["requests"]), f"{row['p50_ms']:.0f}", f"{row['p95_ms']:.0f}", str(row["statuses"])
        )
    console.print(table)
    console.print(
        f"errors other than 429: {result['errors_other_than_429']}; writes acknowledged "
        f"{result['writes_acknowledged']}, found {result['writes_found']}"
    )


@bench_app.command("ppo")
def bench_ppo_command(
    model: str | None = typer.Option(
        None, "--model", help="HF model directory (default: the embedded default).", show_default=False
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 where fast), bf16 or fp32."),
    batch: int = typer.Option(8, "--batch", help="Episodes (prompts) per PPO step."),
    mini_batch: int = typer.Option(8, "--mini-batch", help="Episodes per optimizer update."),
    ppo_epochs: int = typer.Option(1, "--ppo-epochs", help="Passes over each batch of rollouts."),
    new_tokens: int = typer.Option(64, "--new-tokens", help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.7, "--temperature", help="Sampling temperature."),
    lr: float = typer.Option(3e-6, "--lr", help="AdamW learning rate."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed warm-up steps."),
    steps: int = typer.Option(3, "--steps", help="Timed steps (the median is reported)."),
    threads: int = typer.Option(2, "--threads", help="CPU threads."),
    lora_r: int = typer.Option(0, "--lora-r", help="LoRA rank (0: full fine-tuning, as TRL's harness)."),
    trainable_layers: int = typer.Option(
        0, "--trainable-layers", help="Train only the top N transformer blocks (0: all, as TRL's harness)."
    ),
    fused_value_pass: bool = typer.Option(
        False, "--fused-value-pass/--no-fused-value-pass", help="Old values from the first training pass."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the reward head and of sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line (the harness's format)."),
) -> None:
    """Seconds per PPO step and peak memory, with the workload of the TRL PPO harness (../shared/peers)."""
    from dialoop.bench.ppo import PPOBenchConfig, bench_ppo, summary_line

    logging.basicConfig(level=logging.WARNING)
    cfg = PPOBenchConfig(
        model=model,
        device=device,
        precision=precision,
        batch=batch,
        mini_batch=mini_batch,
        ppo_epochs=ppo_epochs,
        new_tokens=new_tokens,
        temperature=temperature,
        lr=lr,
        warmup=warmup,
        steps=steps,
        threads=threads,
        lora_r=lora_r,
        trainable_layers=trainable_layers,
        fused_value_pass=fused_value_pass,
        seed=seed,
    )
    try:
        result = bench_ppo(cfg)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(result))
        return
    console.print(summary_line(result), highlight=False)
