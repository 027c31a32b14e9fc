"""`hftlab sweep` and `hftlab compare` on the tiny model: the grid, resuming, the per-cell
statistics and the baseline differences, bad sweep files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from hftlab.cli import main
from hftlab.compare import collect_runs, compare_rows
from hftlab.config import ConfigError, dump_config, load_config
from hftlab.context import MARKER
from hftlab.sweep import (
    AlignmentOrder,
    PlannedRun,
    alignment_group,
    describe_plan,
    load_sweep,
    run_name,
    run_progress,
    run_sweep,
    start_sweep,
)


def write_sweep(tmp_path: Path, tiny_overrides: list[str], grid: object, **extra) -> Path:
    shared = dict(item.split("=", 1) for item in tiny_overrides)
    shared = {k: yaml.safe_load(v) for k, v in shared.items()}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": "run.yaml", "set": shared, "grid": grid,
                                    "out": str(tmp_path / "out"), **extra}))
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    return path


def test_grid_runs_resumes_and_compares(tiny_overrides, tmp_path, capsys) -> None:
    grid = {"defense": ["sft", "safe_instr"], "seed": [0, 1]}
    sweep = load_sweep(write_sweep(tmp_path, tiny_overrides, grid))
    assert [r.name for r in sweep.runs] == [
        "defense-sft_seed-0", "defense-sft_seed-1",
        "defense-safe_instr_seed-0", "defense-safe_instr_seed-1"]
    assert run_sweep(sweep) == []
    plan = json.loads((sweep.out / "sweep.json").read_text())
    assert len(plan["runs"]) == 4
    stamps = {p: p.stat().st_mtime_ns for p in (sweep.out / "runs").rglob("metrics.json")}
    assert len(stamps) == 4
    assert run_sweep(sweep) == []  # resume: nothing left to do
    assert stamps == {p: p.stat().st_mtime_ns for p in (sweep.out / "runs").rglob("metrics.json")}

    records = collect_runs(sweep.out / "runs")
    rows = {r["name"]: r for r in compare_rows(sweep.out / "runs")}
    assert set(rows) == {"defense=sft", "defense=safe_instr"}
    hs = [r.metrics["harmful_score"] for r in records
          if r.settings["defense"] == "safe_instr"]
    assert rows["defense=safe_instr"]["harmful_score"]["mean"] == pytest.approx(
        sum(hs) / 2, abs=1e-3)
    assert rows["defense=safe_instr"]["seeds"] == [0, 1]
    versus = rows["defense=safe_instr"]["harmful_score.vs_sft"]
    sft_hs = [r.metrics["harmful_score"] for r in records if r.settings["defense"] == "sft"]
    assert versus["diff"] == pytest.approx(sum(hs) / 2 - sum(sft_hs) / 2, abs=1e-3)
    assert rows["defense=sft"]["harmful_score.vs_sft"] is None

    # a copied run folder is counted once
    both = tmp_path / "both"
    shutil.copytree(sweep.out / "runs", both / "a")
    shutil.copytree(records[0].path, both / "b")
    assert {r["name"]: r["seeds"] for r in compare_rows(both)} == {
        r["name"]: r["seeds"] for r in compare_rows(sweep.out / "runs")}

    assert main(["compare", str(sweep.out / "runs")]) == 0
    table = capsys.readouterr().out
    assert "defense=safe_instr" in table and "Δ vs sft" in table


def test_union_of_grids_and_mapping_values(tiny_overrides, tmp_path) -> None:
    grid = [{"defense": ["sft"], "finetune.poison_ratio": [0.0, 0.2]},
            {"defense": ["safe_instr"], "defense_args": [{"ratio": 0.1}],
             "finetune.poison_ratio": [0.2]},
            {"defense": ["sft"], "finetune.poison_ratio": [0.2]}]  # repeats a run
    sweep = load_sweep(write_sweep(tmp_path, tiny_overrides, grid))
    assert len(sweep.runs) == 3
    assert 'defense_args={"ratio": 0.1}' in sweep.runs[2].overrides
    assert run_name({"defense_args": {"fraction": 0.1}}) == "defense_args-fraction=0.1"
    long = {"defense_args": {f"option_{i}": i for i in range(9)}}
    assert len(run_name(long)) == len("defense_args-") + 8


@pytest.mark.parametrize("grid, message", [
    ({"defense": "sft"}, "non-empty list"),
    ({"finetune.poison_ratio": [0.1, 7]}, "run poison_ratio-7"),
    ({"defense": ["no_such_defense"]}, "no_such_defense"),
])
def test_bad_sweep_files_fail_before_running(tiny_overrides, tmp_path, grid, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(write_sweep(tmp_path, tiny_overrides, grid))


def test_only_keeps_matching_runs(tiny_overrides, tmp_path) -> None:
    path = write_sweep(tmp_path, tiny_overrides, {"defense": ["sft", "kl"], "seed": [0, 1]})
    names = [r.name for r in load_sweep(path, ["defense-kl*", "*seed-0"]).runs]
    assert names == ["defense-sft_seed-0", "defense-kl_seed-0", "defense-kl_seed-1"]
    with pytest.raises(ConfigError, match="no run name matches"):
        load_sweep(path, ["nothing*"])


def test_unknown_sweep_key(tiny_overrides, tmp_path) -> None:
    path = write_sweep(tmp_path, tiny_overrides, {"seed": [0]}, seeds=[1])
    assert main(["sweep", str(path), "--dry-run"]) == 2


def test_parallel_workers_finish_every_run(tiny_overrides, tmp_path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, tiny_overrides, {"seed": [0, 1]}))
    assert run_sweep(sweep, workers=2) == []
    assert len(list((sweep.out / "runs").rglob("metrics.json"))) == 2


def test_only_one_run_trains_each_uncached_alignment() -> None:
    a1, a2, a3, b1, c1 = (PlannedRun(name, [], {}) for name in ("a1", "a2", "a3", "b1", "c1"))
    order = AlignmentOrder([(a1, "A", False), (a2, "A", False), (a3, "A", False),
                            (b1, "B", True), (c1, "C", False)])
    assert [r.name for r in order.start()] == ["a1", "c1", "b1"]  # cached B starts at once
    assert order.finished(a1, ok=False) == [a2]  # a failed leader hands the alignment on
    assert order.finished(a2, ok=True) == [a3]
    assert order.finished(a3, ok=True) == [] and order.finished(c1, ok=True) == []
    # a broken pool: whatever still waits is handed back (to be recorded as failed)
    broken = AlignmentOrder([(a1, "A", False), (a2, "A", False), (a3, "A", False)])
    assert broken.remaining() == [a2, a3] and broken.finished(a1, ok=False) == []


def test_alignment_group_sees_the_cache(tiny_overrides, tmp_path) -> None:
    grid = {"finetune.poison_ratio": [0.0, 0.2]}  # one alignment, two runs
    sweep = load_sweep(write_sweep(tmp_path, tiny_overrides, grid))
    key_before, cached_before = alignment_group(sweep, sweep.runs[0])
    assert not cached_before
    plan = describe_plan(sweep)
    assert all(f"[new, alignment {key_before} to train]" in line for line in plan[:2])
    assert plan[2].endswith("0 done, 0 resume, 2 new; 1 aligned checkpoint(s) to train")
    assert run_sweep(sweep, workers=1) == []
    assert alignment_group(sweep, sweep.runs[1]) == (key_before, True)
    assert describe_plan(sweep)[2].endswith("2 done, 0 resume, 0 new; 0 aligned checkpoint(s) "
                                            "to train")


def test_run_progress_names_the_last_finished_stage(tmp_path) -> None:
    run = tmp_path / "run"
    assert run_progress(run) == "new"
    for stage in ("data", "align"):
        (run / stage).mkdir(parents=True)
        (run / stage / MARKER).write_text("{}")
    (run / "finetune").mkdir()  # started, not finished: resumes from here
    assert run_progress(run) == "after align"
    (run / "finetune" / "checkpoint").mkdir()
    (run / "finetune" / "checkpoint" / "latest.json").write_text(
        json.dumps({"format": 2, "step": 30, "folder": "step-000030"}))
    assert run_progress(run) == "after align, finetune at step 30"
    (run / "metrics.json").write_text("{}")
    assert run_progress(run) == "done"


def test_runs_from_an_older_version_share_a_cell(tiny_overrides, tmp_path) -> None:
    sweep = load_sweep(write_sweep(tmp_path, tiny_overrides, {"seed": [0, 1]}))
    assert run_sweep(sweep) == []
    old = sweep.run_dir(sweep.runs[0]) / "config.yaml"
    old.write_text("\n".join(line for line in old.read_text().splitlines()
                             if "hs_plus" not in line) + "\n")
    rows = compare_rows(sweep.out / "runs")
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1]


def test_a_finished_run_made_with_another_config_stops_the_sweep(tiny_overrides, tmp_path) -> None:
    # the sweep's run config changed after a run finished: counting that run as done would put
    # two experiments in one table
    sweep = load_sweep(write_sweep(tmp_path, tiny_overrides, {"seed": [0, 1]}))
    run_dir = sweep.run_dir(sweep.runs[0])
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")
    planned = load_config(sweep.config, sweep.runs[0].overrides)
    other = load_config(sweep.config, [*sweep.runs[0].overrides, "finetune.poison_ratio=0.3"])
    (run_dir / "config.yaml").write_text(dump_config(other))
    assert "made with another config" in describe_plan(sweep)[0]
    with pytest.raises(ConfigError, match=r"1 finished run\(s\) .*seed-0"):
        start_sweep(sweep)
    assert not (sweep.out / "sweep.json").exists()  # nothing written
    (run_dir / "config.yaml").write_text(dump_config(planned))
    assert [r.name for r in start_sweep(sweep)] == [sweep.runs[1].name]


def test_workers_end_when_the_sweep_process_is_killed(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from hftlab.sweep import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    spawn = multiprocessing.get_context('spawn')\n"
        "    pool = ProcessPoolExecutor(1, mp_context=spawn, initializer=exit_with_parent,\n"
        "                               initargs=(os.getpid(), 0.1))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 60)\n"
        "    time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    status = Path(f"/proc/{worker}/status")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if status.exists():  # Linux: a zombie waiting to be reaped has ended too
                if "\tZ" in next(line for line in status.read_text().splitlines()
                                 if line.startswith("State:")):
                    return
            else:
                os.kill(worker, 0)
        except (ProcessLookupError, FileNotFoundError, StopIteration):
            return
        time.sleep(0.1)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the worker outlived the killed sweep process")


def test_a_dead_worker_is_named_as_such() -> None:
    from concurrent.futures.process import BrokenProcessPool

    from hftlab.sweep import _describe

    assert "fewer --workers" in _describe(BrokenProcessPool("terminated abruptly"))
    assert _describe(ConfigError("bad key")) == "bad key"
