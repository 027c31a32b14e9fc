"""``hftlab sweep --backend ray`` on a two-node Ray cluster started on this machine (``ray start
--head`` plus ``ray start --address``, one CPU each): the same metrics as the local backend, one
trainer per shared alignment, and a run whose node is killed mid-run finishing from its
checkpoint after Ray's retry. ``--backend local`` never imports Ray."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hftlab.sweep import load_sweep, run_sweep

RAY_BIN = Path(sys.executable).parent / "ray"
COMPARED = ("harmful_score", "finetune_accuracy", "aligned", "base", "drift", "data_counts")


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all bound at once, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ray_env() -> dict[str, str]:
    # a dead node is noticed in ~3 s instead of ~30 s; one thread per process on shared cores
    return {**os.environ, "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "1000",
            "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def ray_start(*args: str) -> None:
    done = subprocess.run([str(RAY_BIN), "start", "--num-cpus=1", "--disable-usage-stats",
                           "--object-store-memory=80000000", *args],
                          env=ray_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, object]]:
    """A head node and a worker node on this machine; ``ray stop`` afterwards, even on failure."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'hftlab[cluster]')")
    if not RAY_BIN.exists():
        pytest.skip(f"no ray command next to {sys.executable}")
    temp = tempfile.mkdtemp(prefix="hray")  # short: Ray's socket paths must fit 107 bytes
    port, worker_port, client_port, dashboard_port = free_ports(4)
    try:
        ray_start("--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false",
                  f"--ray-client-server-port={client_port}", f"--dashboard-port={dashboard_port}")
        ray_start(f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}")
        yield {"address": f"127.0.0.1:{port}", "worker_port": worker_port}
    finally:
        subprocess.run([str(RAY_BIN), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def write_sweep(folder: Path, overrides: list[str], grid: dict, **shared: object) -> Path:
    settings = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}
    settings.update(shared)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text("seed: 0\n")
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": "run.yaml", "set": settings, "grid": grid,
                                    "out": str(folder / "out")}))
    return path


def sweep_ray(path: Path, address: str, *extra: str, wait: bool = True) -> subprocess.Popen:
    command = [sys.executable, "-m", "hftlab", "sweep", str(path), "--backend", "ray",
               "--address", address, *extra]
    process = subprocess.Popen(command, env=ray_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if wait:
        process.wait(timeout=300)
    return process


def metrics(run_dir: Path) -> dict:
    record = json.loads((run_dir / "metrics.json").read_text())
    return {key: record.get(key) for key in COMPARED}


def assert_same_metrics(got: Any, want: Any, where: str = "") -> None:
    """Equal, floats to 1e-5 relative: a Ray task runs one torch thread where the local sweep
    runs two, so reductions differ in the last bits (drift agreed to 3e-7 relative)."""
    if isinstance(want, float) and isinstance(got, float):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-9), (where, got, want)
    elif isinstance(want, dict) and isinstance(got, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same_metrics(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), where
        for index, (left, right) in enumerate(zip(got, want)):
            assert_same_metrics(left, right, f"{where}[{index}]")
    else:
        assert got == want, (where, got, want)


def test_local_sweep_imports_no_ray(tiny_overrides, tmp_path) -> None:
    code = ("import sys; import hftlab.sweep; from hftlab.cli import main; "
            "assert 'ray' not in sys.modules, 'import'; "
            "assert main(['sweep', sys.argv[1]]) == 0; "
            "assert 'ray' not in sys.modules, 'sweep'")
    path = write_sweep(tmp_path, tiny_overrides, {"seed": [0]})
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert (tmp_path / "out" / "runs" / "seed-0" / "metrics.json").exists()


def test_ray_sweep_matches_local_and_trains_a_shared_alignment_once(
        ray_cluster, tiny_model_dir, tmp_path) -> None:
    from hftlab.sweep_ray import attempts
    from tests.conftest import TINY_OVERRIDES

    base = [f"model.name={tiny_model_dir}", "alignment.seed=0"]
    local = write_sweep(tmp_path / "local", base + TINY_OVERRIDES, {"seed": [0, 1]},
                        cache_dir=str(tmp_path / "local" / "cache"))
    remote = write_sweep(tmp_path / "ray", base + TINY_OVERRIDES, {"seed": [0, 1]},
                         cache_dir=str(tmp_path / "ray" / "cache"))
    assert run_sweep(load_sweep(local)) == []
    process = sweep_ray(remote, str(ray_cluster["address"]))
    output = process.stdout.read()
    assert process.returncode == 0, output
    sweep = load_sweep(remote)
    for run in sweep.runs:
        assert_same_metrics(metrics(sweep.run_dir(run)),
                            metrics(local.parent / "out" / "runs" / run.name), run.name)
    aligned = [json.loads((sweep.run_dir(r) / "metrics.json").read_text())["stages"]["align"]
               ["cached"] for r in sweep.runs]
    assert sorted(aligned) == [False, True]  # the follower waited and used the cache
    assert [len(attempts(sweep, r)) for r in sweep.runs] == [1, 1]
    # resume: nothing left to do, no new attempt
    assert sweep_ray(remote, str(ray_cluster["address"])).returncode == 0
    assert [len(attempts(sweep, r)) for r in sweep.runs] == [1, 1]


def node_raylet(node_manager_port: int) -> int:
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if f"--node_manager_port={node_manager_port}" in " ".join(process.info["cmdline"] or []):
            return process.pid
    raise AssertionError(f"no raylet on port {node_manager_port}")


def test_ray_run_on_a_killed_node_resumes_from_its_checkpoint(
        ray_cluster, tiny_model_dir, tmp_path) -> None:
    import psutil

    from hftlab.checkpoint import checkpoint_step
    from hftlab.stages import CHECKPOINTS
    from hftlab.sweep_ray import attempts
    from tests.conftest import TINY_OVERRIDES

    # each run its own alignment, so both start at once, one per node (one CPU each); long
    # enough training that the kill lands mid-stage, a checkpoint every step
    path = write_sweep(tmp_path, [f"model.name={tiny_model_dir}", *TINY_OVERRIDES],
                       {"seed": [0, 1]}, cache_dir=str(tmp_path / "cache"),
                       checkpoint_every=1, **{"finetune.train.max_steps": 30})
    sweep = load_sweep(path)
    raylet = node_raylet(int(ray_cluster["worker_port"]))
    process = sweep_ray(path, str(ray_cluster["address"]), wait=False)
    victim = None
    deadline = time.monotonic() + 180
    try:
        while victim is None and time.monotonic() < deadline and process.poll() is None:
            for run in sweep.runs:
                tried = attempts(sweep, run)
                if tried and tried[0]["raylet_pid"] == raylet and checkpoint_step(
                        sweep.run_dir(run) / "finetune" / CHECKPOINTS):
                    victim = run
            time.sleep(0.2)
        assert victim is not None, "no run reached a checkpoint on the worker node"
        node = psutil.Process(raylet)
        for member in [*node.children(recursive=True), node]:
            member.send_signal(signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    tried = attempts(sweep, victim)
    assert len(tried) == 2, tried
    assert tried[1]["raylet_pid"] != raylet
    assert "finetune at step" in tried[1]["progress"], tried  # resumed, not restarted
    assert all((sweep.run_dir(r) / "metrics.json").exists() for r in sweep.runs)
