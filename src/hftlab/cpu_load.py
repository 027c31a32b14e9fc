"""How much of a stage's cores other work took: a stage timed beside other processes runs as
slowly as on a slower CPU, and the machine's label cannot tell the two apart.

Linux only (``/proc/stat``): elsewhere every value here is None. The busy time counts the
cores this process may run on, so in a container that limits CPU by quota rather than by
cpuset it counts the host's other tenants, and the throttling itself is not seen.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from hftlab.devices import usable_cores

#: below this, kernel ticks (10 ms per core) are too coarse to tell load apart
SHORTEST_SECONDS = 1.0
#: other work up to this many cores beyond the spare ones is not counted as contention
TOLERATED_CORES = 0.25


@dataclass(frozen=True)
class CpuClock:
    """CPU time read at one moment."""

    busy: float | None  # seconds the usable cores were busy: every process, hypervisor steal
    own: float  # this process's CPU seconds, all its threads (not its child processes)
    wall: float


def cpu_clock() -> CpuClock:
    """Now's CPU time; ``busy`` is None where /proc/stat is absent or names none of the usable
    cores (a container that renumbers them)."""
    own, wall = time.process_time(), time.monotonic()
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return CpuClock(None, own, wall)
    cores, ticks, counted = usable_cores(), 0, 0
    for line in lines:
        name, *fields = line.split() or [""]
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores):
            continue
        # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
        values = [int(f) for f in fields[:8] if f.isdigit()] + [0] * 8
        ticks += sum(values[i] for i in (0, 1, 2, 5, 6, 7))
        counted += 1
    busy = ticks / os.sysconf("SC_CLK_TCK") if counted else None
    return CpuClock(busy, own, wall)


def other_cores(start: CpuClock, end: CpuClock) -> float | None:
    """Cores that other processes (sibling ranks and sweep workers included) and the
    hypervisor kept busy between two clocks, on average. None without /proc/stat, for an
    interval too short to tell, or where the busy time does not hold this process's own (a
    kernel that does not count it)."""
    seconds = end.wall - start.wall
    if start.busy is None or end.busy is None or seconds < SHORTEST_SECONDS:
        return None
    busy, own = end.busy - start.busy, end.own - start.own
    tick_error = 2 * len(usable_cores()) / os.sysconf("SC_CLK_TCK")
    if busy < own - tick_error:
        return None
    return max(0.0, busy - own) / seconds


def cores_used(start: CpuClock, end: CpuClock) -> float:
    """The cores this process kept busy between two clocks, on average."""
    return (end.own - start.own) / max(end.wall - start.wall, 1e-9)


def contended(others: float | None, needed: float) -> bool:
    """Whether other work took cores this process needed (``needed``: its compute threads on a
    CPU, the cores it used on a GPU), by more than a quarter of a core on average. Load on a
    hyperthread's sibling slows a run too, and is counted only once it takes the spare
    logical CPUs."""
    if others is None:
        return False
    spare = max(0.0, len(usable_cores()) - needed)
    return others > spare + TOLERATED_CORES
