"""Where models run and in which dtype, decided once for training and serving."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def pick_device() -> torch.device:
    """CUDA when available, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device | str) -> str:
    """What a report says a run ran on: the GPU's name on CUDA ("NVIDIA H100 80GB HBM3"), else the type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """True when the CPU has native bf16 dot products (AMX or AVX512-BF16): bf16 matmuls beat fp32 ~3x."""
    # torch's reported capability stops at AVX512 even on such machines, so read the CPU flags
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split() for line in text.splitlines() if line.startswith("flags")), [])
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 on CUDA and bf16-capable CPUs, else None (fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        # fp16 would need loss scaling; GPUs without bf16 train in fp32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_bf16_matmul():
        return torch.bfloat16
    return None
