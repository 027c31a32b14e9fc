"""The Python API on the tiny model: hftlab.run returns the typed metrics it wrote,
hftlab.sweep the run folders, hftlab.compare flat rows; import hftlab loads no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hftlab
from hftlab.config import ConfigError
from hftlab.stats import SHARED


def test_import_hftlab_loads_no_torch() -> None:
    code = ("import sys, hftlab; hftlab.RunMetrics; "
            "print('torch' in sys.modules, 'hftlab.pipeline' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        hftlab.nothing  # noqa: B018


def overrides_dict(tiny_overrides: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in tiny_overrides)}


def test_run_from_overrides_and_settings(tiny_overrides, tiny_config, tmp_path) -> None:
    out = tmp_path / "run"
    metrics = hftlab.run(None, out, overrides_dict(tiny_overrides), seed=3)
    assert isinstance(metrics, hftlab.RunMetrics)
    assert metrics.seed == 3 and metrics.final.n_eval_harmful == 6
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["schema_version"] == 2 and hftlab.RunMetrics.from_dict(saved) == metrics
    assert (out / "report.md").is_file()
    # a Config object with a dotted override: a cached run, the same scores
    again = hftlab.run(tiny_config, tmp_path / "again", {"seed": 3})
    assert again.final == metrics.final
    with pytest.raises(ConfigError, match="defense_args"):
        hftlab.run(tiny_config, tmp_path / "bad", defense="lisa", defense_args={"nope": 1})
    assert not (tmp_path / "bad").exists()


def test_sweep_and_compare(tiny_overrides, tmp_path: Path) -> None:
    shared = overrides_dict(tiny_overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "config": "run.yaml", "set": shared, "out": str(tmp_path / "out"),
        "grid": {"defense": ["sft", "safe_instr"], "seed": [0, 1]}}))
    (tmp_path / "run.yaml").write_text("seed: 0\n")
    folders = hftlab.sweep(path, only=["defense-sft_*"])
    assert [f.name for f in folders] == ["defense-sft_seed-0", "defense-sft_seed-1"]
    assert all((f / "metrics.json").is_file() for f in folders)
    hftlab.sweep(path)
    rows = hftlab.compare(tmp_path / "out" / "runs")
    assert [r["cell"] for r in rows] == ["defense=sft", "defense=safe_instr"]
    safe = rows[1]
    assert safe["defense"] == "safe_instr" and safe["seeds"] == [0, 1]
    # Welch across seeds; no test where every seed of both cells gave one score (tiny model)
    varies = safe["harmful_score.std"] or rows[0]["harmful_score.std"]
    assert safe["harmful_score.n"] == 2
    assert safe["harmful_score.test"] == ("welch" if varies else SHARED)
    assert (safe["harmful_score.diff_ci95_low"] is None) == (not varies)
    # plain values only: a DataFrame (or a CSV) takes the rows as they are
    assert all(not isinstance(v, dict) for row in rows for v in row.values())
    assert hftlab.compare(tmp_path / "out" / "runs", baseline="safe_instr",
                          metrics=["aligned.harmful_score"])[0]["cell"] == "defense=safe_instr"
