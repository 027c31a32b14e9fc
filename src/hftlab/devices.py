"""Which compute precision a device runs in: shared by the run, the judges and the data tools,
so it imports nothing from hftlab."""

from __future__ import annotations

import functools
import os
import random
import time
from dataclasses import dataclass
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
    computes with (fewer when sweep workers share the machine), native bf16, the GPUs the run
    computed on (one per process, as accelerate places them), and the processes of a
    distributed run."""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo().splitlines()
                 if line.startswith("model name")), "unknown CPU")
    parts = [name, f"{len(usable_cores())} CPUs", f"{torch.get_num_threads()} threads"]
    if cpu_has_bf16():
        parts.append("bf16")
    if device is not None and device.type == "cuda":  # not the node's idle GPUs
        parts.append(f"{processes}× {torch.cuda.get_device_name(device)}")
    if processes > 1:
        parts.append(f"{processes} processes")
    return " · ".join(parts)


def usable_cores() -> set[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class CpuClock:
    """CPU time read at one moment, to tell how much of the machine other work took."""

    busy: float | None  # seconds the usable cores were busy: every process, hypervisor steal
    own: float  # this process's CPU seconds, all its threads
    wall: float


def cpu_clock() -> CpuClock:
    """Now's CPU time; ``busy`` is None where there is no /proc/stat (not Linux)."""
    own, wall = time.process_time(), time.monotonic()
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return CpuClock(None, own, wall)
    cores, ticks = usable_cores(), 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        user, nice, system, _, _, irq, softirq, steal = (int(f) for f in fields[:8])
        ticks += user + nice + system + irq + softirq + steal
    return CpuClock(ticks / os.sysconf("SC_CLK_TCK"), own, wall)


def other_cores(start: CpuClock, end: CpuClock) -> float | None:
    """Cores that other processes (and the hypervisor) kept busy between two clocks, on
    average: the load a stage's timing shared its cores with. None without /proc/stat."""
    if start.busy is None or end.busy is None or end.wall <= start.wall:
        return None
    others = (end.busy - start.busy) - (end.own - start.own)
    return max(0.0, others / (end.wall - start.wall))


def contended(others: float | None, processes: int = 1) -> bool:
    """Whether other work took cores this run's threads needed, on average more than a quarter
    of a core: the stage's speed is then the machine's under load, not the run's."""
    if others is None:
        return False
    spare = max(0, len(usable_cores()) - torch.get_num_threads() * processes)
    return others > spare + 0.25
