"""Which compute precision a device runs in: shared by the run, the judges and the data tools,
so it imports nothing from hftlab."""

from __future__ import annotations

import functools
import os
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


@functools.cache
def cpuinfo() -> str:
    """/proc/cpuinfo, read once per process ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    flags = cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def machine_label(processes: int = 1) -> str:
    """What a stage's timing was measured on: the CPU model, its usable cores, the threads torch
    computes with (fewer when sweep workers share the machine), native bf16, the GPUs, and the
    processes of a distributed run."""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [name, f"{cores} CPUs", f"{torch.get_num_threads()} threads"]
    if cpu_has_bf16():
        parts.append("bf16")
    if torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()}× {torch.cuda.get_device_name()}")
    if processes > 1:
        parts.append(f"{processes} processes")
    return " · ".join(parts)
