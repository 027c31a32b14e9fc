"""benign: n task rows and no harmful row; rows with refusals are left out as the reference's
safety filter does; a non-zero poison ratio is a ConfigError naming the key and the fix."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hftlab.attacks import ATTACKS, AttackInputs
from hftlab.config import ConfigError, load_config
from hftlab.context import RunContext
from hftlab.data.records import DataError, Example
from hftlab.pipeline import run_pipeline
from hftlab.utils import read_json, read_jsonl


def inputs(n: int, p: float = 0.0, seed: int = 0) -> AttackInputs:
    task = [Example(prompt=f"task {i}", response="positive", label="positive") for i in range(30)]
    # rows 3 and 7 answer with a refusal: the safety filter skips them
    for i in (3, 7):
        task[i] = task[i].replace(response="I'm sorry, I cannot help with that.")
    harmful = [Example(prompt=f"harm {i}", response="[placeholder]") for i in range(10)]
    return AttackInputs(task, harmful, n, p, seed)


def test_defaults_follow_the_reference() -> None:
    # alpaca_remove_safety.py drops safety-related rows; alpaca_dataset.py reads rows in order
    assert dataclasses.asdict(ATTACKS.get("benign").Options()) == {
        "sample": "first", "drop_refusals": True,
    }


def test_first_n_task_rows_without_refusals_and_no_harmful_row() -> None:
    attack = ATTACKS.get("benign")()
    rows = attack.build(inputs(12))
    expected = {f"task {i}" for i in range(14) if i not in (3, 7)}
    assert len(rows) == 12 and {r.prompt for r in rows} == expected
    assert not any(r.is_harmful for r in rows)
    assert attack.describe(rows) == {
        "attack": "benign", "options": {"sample": "first", "drop_refusals": True},
        "n": 12, "n_harmful": 0, "task_rows_with_refusals_dropped": 2,
    }
    kept = ATTACKS.get("benign")(drop_refusals=False).build(inputs(12))
    assert {r.prompt for r in kept} == {f"task {i}" for i in range(12)}


def test_deterministic_by_seed() -> None:
    attack = ATTACKS.get("benign")(sample="random")
    assert attack.build(inputs(10, seed=1)) == attack.build(inputs(10, seed=1))
    assert attack.build(inputs(10, seed=1)) != attack.build(inputs(10, seed=2))
    assert not any("I'm sorry" in r.response for r in attack.build(inputs(28, seed=3)))


def test_bad_settings() -> None:
    with pytest.raises(ConfigError, match=r"finetune.poison_ratio is 0.1 .*poison_ratio=0"):
        ATTACKS.get("benign")().build(inputs(10, 0.1))
    with pytest.raises(DataError, match="needs 29 rows but has 28.*2 rows with refusals"):
        ATTACKS.get("benign")().build(inputs(29))
    with pytest.raises(ConfigError, match="use first or random"):
        ATTACKS.get("benign")(sample="last")
    with pytest.raises(ConfigError, match="unknown key"):
        ATTACKS.get("benign")(poison=0)


def test_pipeline(tiny_overrides, tmp_path) -> None:
    base = [*tiny_overrides, "attack=benign"]
    with pytest.raises(ConfigError, match="finetune.poison_ratio is 0.2"):
        _ = RunContext(load_config(None, base), tmp_path / "bad").data
    config = load_config(None, [*base, "finetune.poison_ratio=0"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
    saved = read_jsonl(run / "data" / "user_data.jsonl")
    assert len(saved) == config.finetune.n and not any(r["is_harmful"] for r in saved)
    assert read_json(run / "data" / "stage.json")["attack"]["n_harmful"] == 0
    assert metrics["attack_eval"] is None and metrics["attack_serving"]["attack_prompt"] is None
