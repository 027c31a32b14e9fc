"""The machine a stage's timing names, and the load other processes put on its cores."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from hftlab import devices
from hftlab.devices import CpuClock, contended, cpu_clock, machine_label, other_cores


def test_machine_label_names_the_gpus_the_run_computed_on(monkeypatch) -> None:
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device=None: "H100")
    monkeypatch.setattr(devices.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(devices, "usable_cores", lambda: set(range(16)))
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    label = machine_label(8, torch.device("cuda", 3))
    assert label.endswith(" · 16 CPUs · 4 threads · 8× H100 · 8 processes")
    # a CPU run names no GPU, whatever the node holds
    assert "×" not in machine_label(1, torch.device("cpu"))
    assert machine_label(1).endswith(" · 16 CPUs · 4 threads")


def test_other_cores_is_the_machine_busy_time_less_this_process() -> None:
    start, end = CpuClock(busy=100.0, own=10.0, wall=0.0), CpuClock(130.0, 20.0, 10.0)
    # 30 busy seconds on the cores in 10 s, 10 of them this process's: 2 cores of other work
    assert other_cores(start, end) == pytest.approx(2.0)
    # the kernel's 10 ms ticks can count less than the process's own clock: never below 0
    assert other_cores(start, CpuClock(105.0, 20.0, 10.0)) == 0.0
    assert other_cores(CpuClock(None, 0.0, 0.0), CpuClock(None, 1.0, 1.0)) is None


def test_contended_means_other_work_took_cores_the_run_needed(monkeypatch) -> None:
    monkeypatch.setattr(devices, "usable_cores", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(devices.torch, "get_num_threads", lambda: 2)
    # 4 cores, 2 threads: two are spare, and a quarter core more is tolerated
    assert not contended(2.2)
    assert contended(2.3)
    # two processes of 2 threads use every core: any other work beyond a quarter core counts
    assert contended(0.3, processes=2) and not contended(0.2, processes=2)
    assert not contended(None)


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_the_cores_clock_counts_this_process_work() -> None:
    start = cpu_clock()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # keep one core busy
        pass
    end = cpu_clock()
    assert end.own - start.own >= 0.3
    # the cores' busy time holds this process's (kernel ticks of 10 ms: within 0.05 s)
    assert end.busy - start.busy >= end.own - start.own - 0.05
    assert other_cores(start, end) >= 0.0
