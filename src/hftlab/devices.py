"""Which compute precision a device runs in: shared by the run, the judges and the data tools,
so it imports nothing from hftlab."""

from __future__ import annotations

import random
from pathlib import Path

import torch


def resolve_precision(setting: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware computes it natively, else fp32."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
