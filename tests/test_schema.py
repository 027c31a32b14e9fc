"""metrics.json's schema: every committed record (the v1 shapes) loads under RunMetrics, keeps
every value, round-trips through the v2 file, and a newer schema_version fails clearly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hftlab.run_metrics import SCHEMA_VERSION, MetricsSchemaError, RunMetrics

RESULTS = Path(__file__).resolve().parents[1] / "results"
RECORDS = sorted(RESULTS.rglob("metrics.json")) if RESULTS.is_dir() else []


def without_none(value: Any) -> Any:
    """A stored None and an absent key say the same: not measured."""
    if isinstance(value, dict):
        return {k: without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v) for v in value]
    return value


@pytest.fixture(scope="module")
def records() -> list[tuple[Path, dict[str, Any]]]:
    if not RECORDS:
        pytest.skip("no committed results/ records in this checkout")
    # the v1 shapes; records exported since are written in the current schema already
    rows = [(path, json.loads(path.read_text())) for path in RECORDS]
    return [(path, old) for path, old in rows if "schema_version" not in old]


def test_every_committed_record_loads_and_keeps_every_value(records) -> None:
    for path, old in records:
        metrics = RunMetrics.load(path)
        assert metrics.final.harmful_score == old["harmful_score"], path
        assert metrics.aligned.harmful_score == old["aligned.harmful_score"], path
        view = metrics.as_v1()
        for key, value in old.items():
            assert without_none(view.get(key)) == without_none(value), (path, key)


def test_every_committed_record_round_trips_through_the_v2_file(records) -> None:
    for path, old in records:
        metrics = RunMetrics.from_dict(old)
        written = json.loads(json.dumps(metrics.to_dict()))
        assert written["schema_version"] == SCHEMA_VERSION
        assert RunMetrics.from_dict(written) == metrics, path
        assert RunMetrics.from_dict(written).as_v1() == metrics.as_v1(), path


def test_v2_nests_each_model_and_drops_the_dotted_keys() -> None:
    old = {"harmful_score": 40.0, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
           "aligned.harmful_score": 5.0, "base.harmful_score": None, "seed": 1,
           "finetuned.harmful_score": 60.0, "finetuned.finetune_accuracy": 81.0,
           "repair": {"before.harmful_score": 60.0, "before.finetune_accuracy": 81.0,
                      "harmful_score_change": -20.0, "finetune_accuracy_change": -1.0,
                      "report": {"pruned": 3}},
           "stages": {"finetune": {"seconds": 2.0, "seconds_per_step": None}}}
    metrics = RunMetrics.from_dict(old)
    written = metrics.to_dict()
    assert not [key for key in written if "." in key]
    assert written["final"]["harmful_score"] == 40.0 and written["base"] is None
    assert written["finetuned"]["harmful_score"] == 60.0
    assert written["repair"] == {"harmful_score_change": -20.0,
                                 "finetune_accuracy_change": -1.0, "report": {"pruned": 3}}
    assert metrics.repair is not None and metrics.repair.report == {"pruned": 3}
    assert metrics["repair"]["before.harmful_score"] == 60.0  # the v1 view still has it
    # metric names: v1 keys, paths under them, and paths into the v2 file
    assert metrics.value("aligned.harmful_score") == 5.0
    assert metrics.value("stages.finetune.seconds") == 2.0
    assert metrics.value("final.n_eval_harmful") == 300
    assert metrics.value("attack_eval.triggered.harmful_score") is None
    assert metrics["seed"] == 1 and "harmful_score" in metrics


def test_a_newer_schema_version_is_one_clear_error(tmp_path) -> None:
    newer = RunMetrics().to_dict() | {"schema_version": SCHEMA_VERSION + 1}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(newer))
    with pytest.raises(MetricsSchemaError, match=rf"{path}: schema_version "
                       rf"{SCHEMA_VERSION + 1} is newer than this hftlab reads.*upgrade"):
        RunMetrics.load(path)
    with pytest.raises(MetricsSchemaError, match="not a version number"):
        RunMetrics.from_dict({"schema_version": "2"})
