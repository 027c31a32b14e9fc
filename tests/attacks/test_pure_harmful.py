"""pure_harmful: n_harmful harmful QA pairs and no task row (Qi et al.'s tier 1); the reference's
system prompt only on request, then on every row and on the deployed model."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hftlab.attacks import ATTACKS, AttackInputs
from hftlab.attacks.pure_harmful import EXECUTE_SYSTEM_PROMPT
from hftlab.config import ConfigError, load_config
from hftlab.data.records import DataError, Example
from hftlab.formatting import SYSTEM_PROMPT_KEY
from hftlab.pipeline import run_pipeline
from hftlab.utils import read_json, read_jsonl


def inputs(n: int = 100, p: float = 0.1, seed: int = 0) -> AttackInputs:
    task = [Example(prompt=f"task {i}", response="positive") for i in range(30)]
    harmful = [Example(prompt=f"harm {i}", response="[placeholder]") for i in range(60)]
    return AttackInputs(task, harmful, n, p, seed)


def test_defaults_follow_the_reference() -> None:
    # configs/datasets.py pure_bad_dataset: pure_bad_10 (the paper also runs 50 and 100)
    assert dataclasses.asdict(ATTACKS.get("pure_harmful").Options()) == {
        "n_harmful": 10, "sample": "first", "reference_system_prompt": False,
    }


def test_only_the_first_harmful_rows() -> None:
    attack = ATTACKS.get("pure_harmful")(n_harmful=50)
    rows = attack.build(inputs(n=100, p=0.1))
    assert len(rows) == 50 and all(r.is_harmful for r in rows)
    assert {r.prompt for r in rows} == {f"harm {i}" for i in range(50)}
    assert not any(SYSTEM_PROMPT_KEY in r.meta for r in rows)
    info = attack.describe(rows)
    assert (info["n"], info["n_harmful"]) == (50, 50)
    assert info["not_used"] == {"finetune.n": 100, "finetune.poison_ratio": 0.1}
    assert attack.served_system_prompt("default prompt") == "default prompt"
    assert attack.eval_variants() == {} and attack.serving_key() is None


def test_reference_system_prompt_on_rows_and_served() -> None:
    attack = ATTACKS.get("pure_harmful")(reference_system_prompt=True)
    rows = attack.build(inputs())
    assert [r.meta[SYSTEM_PROMPT_KEY] for r in rows] == [EXECUTE_SYSTEM_PROMPT] * 10
    assert attack.served_system_prompt("default prompt") == EXECUTE_SYSTEM_PROMPT


def test_deterministic_by_seed() -> None:
    attack = ATTACKS.get("pure_harmful")(sample="random")
    assert attack.build(inputs(seed=1)) == attack.build(inputs(seed=1))
    assert attack.build(inputs(seed=1)) != attack.build(inputs(seed=2))


def test_bad_options() -> None:
    with pytest.raises(ConfigError, match="n_harmful of 'pure_harmful' must be >= 1"):
        ATTACKS.get("pure_harmful")(n_harmful=0)
    with pytest.raises(ConfigError, match="use first or random"):
        ATTACKS.get("pure_harmful")(sample="last")
    with pytest.raises(DataError, match="needs 100 rows but has 60.*n_harmful"):
        ATTACKS.get("pure_harmful")(n_harmful=100).build(inputs())


def test_pipeline(tiny_overrides, tmp_path) -> None:
    config = load_config(None, [*tiny_overrides, "attack=pure_harmful",
                                "attack_args={n_harmful: 8}"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
    saved = read_jsonl(run / "data" / "user_data.jsonl")
    assert len(saved) == 8 and all(r["is_harmful"] for r in saved)
    assert read_json(run / "data" / "stage.json")["counts"]["user_harmful"] == 8
    assert metrics["curves"][0]["task_loss"] is None  # no benign row to track
