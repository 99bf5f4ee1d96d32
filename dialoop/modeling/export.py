"""`dialoop export-model`: a run's model as a standard Hugging Face directory for other tools.

A run dir already holds full weights (a LoRA run's merged into them, its adapters in `RUN/adapter`).
The export writes them in the dtype asked for, with the tokenizer, its chat template and a generation
config whose EOS is the template's end-of-turn token, so `transformers`' `from_pretrained` and vLLM load
it as it is. Without `merge_lora`, a LoRA run exports its adapters instead (peft format, with the
tokenizer), for servers that apply adapters to the base model.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from dialoop.modeling.heads import load_reward_model
from dialoop.modeling.loading import ModelLoadError, load_causal_lm, load_tokenizer, save_model_dir

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # RUN/adapter: a LoRA run's adapters (peft format), next to the merged model
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def is_reward_model(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def _check_adapter_base(run_dir: Path, adapter: Path) -> None:
    """Adapters alone fit their base model only when training kept its vocabulary (no template tokens or pad
    added): otherwise the base's embeddings have fewer rows than the run's."""
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base_config = Path(str(base)) / "config.json"
    if not base_config.is_file():
        return  # a hub id: its vocabulary cannot be checked offline
    rows = json.loads(base_config.read_text()).get("vocab_size")
    run_rows = json.loads((run_dir / "config.json").read_text()).get("vocab_size")
    if rows != run_rows:
        raise ValueError(
            f"the run grew the vocabulary of its base model {base} ({rows} -> {run_rows} tokens: chat "
            "template or pad tokens were added), so its adapters do not fit that base alone: export with "
            "--merge-lora"
        )


def export_model(
    run_dir: str | Path, out: str | Path, *, merge_lora: bool = False, dtype: str = "fp32"
) -> Path:
    """Write the model of `run_dir` (a run dir or any model dir Dialoop wrote) to `out`; returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not (run_dir / "config.json").is_file():
        raise ModelLoadError(f"{run_dir} holds no model (no config.json): is it a finished run's directory?")
    if out.exists() and (out.resolve() == run_dir.resolve() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty: choose another --out")
    adapter = run_dir / ADAPTER_DIR
    tokenizer = load_tokenizer(run_dir)
    if adapter.is_dir() and not merge_lora:
        _check_adapter_base(run_dir, adapter)
        out.mkdir(parents=True, exist_ok=True)
        for path in adapter.iterdir():
            if path.is_file():
                shutil.copy2(path, out / path.name)
        tokenizer.save_pretrained(out)
        log.info("LoRA adapters of %s written to %s (--merge-lora writes full weights)", run_dir, out)
        return out
    torch_dtype = DTYPES[dtype]
    if is_reward_model(run_dir):
        model = load_reward_model(run_dir, dtype=torch_dtype, device="cpu")
    else:
        model = load_causal_lm(run_dir, dtype=torch_dtype, device="cpu", tokenizer=tokenizer)
    model.config.dtype = torch_dtype
    save_model_dir(model, tokenizer, out)
    log.info("%s written to %s in %s", run_dir, out, dtype)
    return out
