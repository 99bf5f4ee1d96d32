"""Attention in fp32 inside bf16 models on CPUs: PyTorch's bf16 SDPA kernels are the slow part there.

Measured on this project's 2-core AVX512-BF16 CPU (no AMX), one thread, SmolLM2-135M shapes: a decoding
step's attention took 0.80 ms per layer in bf16 and 0.13 ms in fp32; forward + backward over 8 x 102 tokens
37 ms against 14 ms. The matmuls stay in bf16 (where the CPU is fast); only q, k, v are upcast around SDPA.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "sdpa_fp32"
_registered = False


def _sdpa_fp32_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out_dtype = value.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(out_dtype), weights


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _sdpa_fp32_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def wants_fp32_attention(device: torch.device, dtype: torch.dtype) -> bool:
    """True for bf16 compute on a CPU (CUDA's bf16 attention kernels are fast)."""
    return device.type == "cpu" and dtype == torch.bfloat16


def use_fp32_attention(model: torch.nn.Module) -> None:
    """Switch an HF model (or a peft wrapper of one) from `sdpa` to fp32 SDPA; other kinds are left alone."""
    get_base = getattr(model, "get_base_model", None)
    hf_model: Any = get_base() if callable(get_base) else model
    if getattr(hf_model.config, "_attn_implementation", None) != "sdpa":
        return
    _register()
    hf_model.set_attn_implementation(NAME)


def restore_sdpa(model: torch.nn.Module) -> None:
    """Back to the stock `sdpa` implementation (before a model is saved or handed to other code)."""
    get_base = getattr(model, "get_base_model", None)
    hf_model: Any = get_base() if callable(get_base) else model
    if getattr(hf_model.config, "_attn_implementation", None) == NAME:
        hf_model.set_attn_implementation("sdpa")
