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


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """True when the CPU has AMX bf16 tiles, where bf16 matmuls beat fp32 by far."""
    # torch's reported capability stops at AVX512 even on AMX machines, so read the CPU flags
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any("amx_bf16" in line.split() for line in text.splitlines() if line.startswith("flags"))


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `device`: bf16 on CUDA and AMX CPUs where supported, else None (fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        # fp16 would need loss scaling; GPUs without bf16 train in fp32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and cpu_has_amx_bf16():
        return torch.bfloat16
    return None
