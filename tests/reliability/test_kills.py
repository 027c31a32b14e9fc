"""A kill between any two writes of a run (a stage's file, a cache entry, a checkpoint's file,
the metrics) is recovered by rerunning the same command: the rerun ends with the
metrics of an uninterrupted run, and no temporary is left in the run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.config import load_config
from hftlab.faults import SimulatedKill, fault_at
from hftlab.pipeline import run_pipeline


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "stages"}


def relative(path: Path, tmp_path: Path) -> str:
    return str(path.relative_to(tmp_path))


def test_a_kill_before_any_write_is_recovered_by_the_rerun(tiny_overrides, tmp_path) -> None:
    def config(name: str):
        return load_config(None, [*tiny_overrides, "checkpoint_every=2",
                                  f"cache_dir={tmp_path / name / 'cache'}"])

    with fault_at(-1) as seen:
        reference = run_pipeline(config("reference"), tmp_path / "reference" / "run")
    changes = [relative(p, tmp_path / "reference") for p in seen]
    names = {Path(c).name for c in changes}
    # every kind of file a run writes is among the changes a kill can fall between
    assert {"config.yaml", "user_data.jsonl", "stage.json", "manifest.json", "meta.json",
            "latest.json", "trainer.json", "trainer.safetensors", "rng-0.json",
            "completions.jsonl", "curves.json", "drift.json", "metrics.json"} <= names, names
    for k, change in enumerate(changes):
        run = tmp_path / f"kill-{k}" / "run"
        with pytest.raises(SimulatedKill), fault_at(k):
            run_pipeline(config(f"kill-{k}"), run)
        assert comparable(run_pipeline(config(f"kill-{k}"), run)) == comparable(reference), (
            f"killed before change {k} ({change})")
        leftovers = [relative(p, run) for p in run.rglob(".*")]
        assert not leftovers, f"killed before change {k} ({change}): {leftovers}"


def test_temporaries_of_killed_writes_are_removed_when_the_stage_reruns(tiny_overrides,
                                                                          tmp_path) -> None:
    """A real kill -9 runs no cleanup: its temporaries stay until the stage runs again."""
    config = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    with pytest.raises(SimulatedKill), fault_at(0, under=run / "finetune"):
        run_pipeline(config, run)
    planted = [run / "finetune" / ".curves.json.x1y2", run / "finetune" / ".model.a1b2"]
    planted[0].write_text("[")
    planted[1].mkdir()
    (planted[1] / "adapter_model.safetensors").write_bytes(b"\0")
    run_pipeline(config, run)
    assert not any(p.exists() for p in planted)
