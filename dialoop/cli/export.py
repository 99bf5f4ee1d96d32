"""`dialoop export-model RUN_DIR --out DIR`: a run's model as a standard Hugging Face directory."""

from __future__ import annotations

from pathlib import Path

import typer

from dialoop.cli._app import app


@app.command("export-model")
def export_model(
    run_dir: Path = typer.Argument(
        ..., help="A run directory (train sft|rm|ppo) or any model dir Dialoop wrote."
    ),
    out: Path = typer.Option(..., "--out", help="Directory to write (must not exist or be empty)."),
    merge_lora: bool = typer.Option(
        False,
        "--merge-lora",
        help="For a LoRA run: full weights with the adapters merged (default for a LoRA run: the adapters "
        "only, peft format). Other runs always export full weights.",
    ),
    dtype: str = typer.Option("fp32", "--dtype", help="Weight dtype: bf16, fp16 or fp32."),
) -> None:
    """Write a run's model as a standard HF dir (config, safetensors, tokenizer with its chat template,
    generation config with the end-of-turn EOS) that transformers and vLLM load."""
    from dialoop.modeling.export import export_model as export
    from dialoop.modeling.loading import ModelLoadError

    try:
        written = export(run_dir, out, merge_lora=merge_lora, dtype=dtype)
    except (ModelLoadError, FileExistsError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(str(written))
