"""Which compute precision a device runs in, and the label of the machine a stage ran on:
shared by the run, the judges and the data tools, so it imports nothing from hftlab."""

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


def machine_label(processes: int = 1, device: torch.device | None = None) -> str:
    """What a stage's timing was measured on: the CPU model, its usable cores, the threads torch
    computes with (fewer when sweep workers share the machine), native bf16, the vector kernels
    torch dispatches to on a CPU (``ATEN_CPU_CAPABILITY`` lowers them, and they change both speed
    and the last bits of fp32 results), the GPUs the run computed on (one per process, as
    accelerate places them), and the processes of a distributed run."""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    parts = [name, f"{len(usable_cores())} CPUs", f"{torch.get_num_threads()} threads"]
    if cpu_has_bf16():
        parts.append("bf16")
    if device is None or device.type == "cpu":
        parts.append(f"{torch.backends.cpu.get_cpu_capability()} kernels")
    if device is not None and device.type == "cuda":  # not the node's idle GPUs
        parts.append(f"{processes}× {torch.cuda.get_device_name(device)}")
    if processes > 1:
        parts.append(f"{processes} processes")
    return " · ".join(parts)


@functools.cache
def usable_cores() -> frozenset[int]:
    """The CPUs this process may run on, read once: an OpenMP runtime may later pin the calling
    thread to one of them."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))
