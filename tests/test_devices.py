"""The machine a stage's timing names."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from hftlab import devices
from hftlab.devices import machine_label


def test_machine_label_names_the_gpus_the_run_computed_on(monkeypatch) -> None:
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device=None: "H100")
    monkeypatch.setattr(devices.torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(devices, "usable_cores", lambda: set(range(16)))
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(devices.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    label = machine_label(8, torch.device("cuda", 3))
    assert label.endswith(" · 16 CPUs · 4 threads · 8× H100 · 8 processes")
    # a CPU run names no GPU, whatever the node holds
    assert "×" not in machine_label(1, torch.device("cpu"))
    assert machine_label(1, torch.device("cpu")).endswith(" · 16 CPUs · 4 threads · AVX2 kernels")
    assert machine_label(1).endswith(" · 16 CPUs · 4 threads · AVX2 kernels")


def test_machine_label_names_the_kernels_the_environment_chose() -> None:
    # fp32 results of the same run differ in their last bits between AVX2 and AVX512 kernels
    code = "from hftlab.devices import machine_label; print(machine_label())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
    assert printed.strip().endswith(" · DEFAULT kernels")
