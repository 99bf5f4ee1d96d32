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
