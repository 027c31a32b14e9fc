"""``finetune.precision``: the fine-tuning stage alone computes in another precision, from the
aligned model of the run's own precision (one aligned checkpoint serves both)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from hftlab.compare import Cell, baseline_setting, compare_rows
from hftlab.config import ConfigError, load_config
from hftlab.context import RunContext
from hftlab.metrics import finetune_precision
from hftlab.pipeline import run_pipeline
from hftlab.plot_labels import series_names
from hftlab.report import console_summary
from hftlab.run_metrics import FinalScores, RunMetrics
from hftlab.stages import training
from hftlab.sweep import run_name


def context(tiny_overrides, tmp_path, *extra: str) -> RunContext:
    config = load_config(None, [*tiny_overrides, "model.precision=bf16", *extra])
    return RunContext(config, tmp_path / "run")


def test_it_changes_the_finetune_key_and_not_the_alignment_or_evaluation(tiny_overrides,
                                                                          tmp_path) -> None:
    plain = context(tiny_overrides, tmp_path)
    fp32 = context(tiny_overrides, tmp_path, "finetune.precision=fp32")
    same = context(tiny_overrides, tmp_path, "finetune.precision=bf16")
    assert (plain.precision, fp32.precision, fp32.finetune_precision) == ("bf16", "bf16", "fp32")
    assert fp32.alignment_key() == plain.alignment_key()
    assert fp32.finetune_key() != plain.finetune_key()
    assert same.finetune_key() == plain.finetune_key()  # the run's own precision: no new entry
    assert fp32.eval_key() == plain.eval_key()  # the evaluation stays at model.precision


def test_an_unknown_precision_is_one_error_naming_the_key(tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="'finetune.precision' is 'fp16'; choose one of auto"):
        load_config(None, [*tiny_overrides, "finetune.precision=fp16"])
    # a fixed storage dtype would overrule the stage's precision (bf16 weights, "fp32" run)
    with pytest.raises(ConfigError, match="'finetune.precision' needs model.dtype: auto"):
        load_config(None, [*tiny_overrides, "finetune.precision=fp32", "model.dtype=bfloat16"])


def test_a_skipped_fine_tuning_records_no_precision_of_its_own() -> None:
    ctx = SimpleNamespace(precision="bf16")
    assert finetune_precision(ctx, {"precision": "fp32", "steps": 4}) == "fp32"
    assert finetune_precision(ctx, {"precision": "bf16", "steps": 4}) is None
    # the guardrail left no row: nothing trained, the aligned model is served at bf16
    assert finetune_precision(ctx, {"steps": 0, "skipped": "no uploaded rows left"}) is None


def test_the_fine_tuning_trains_in_it_and_the_record_says_so(tiny_overrides, tmp_path,
                                                             monkeypatch) -> None:
    seen: dict[str, tuple[str, torch.dtype]] = {}
    make = training.SFTTrainer

    def recording(model, train_cfg, accelerator, pad, hook, *args, precision, **kwargs):
        seen[hook] = (precision, next(p.dtype for n, p in model.named_parameters()
                                      if "lora" not in n))
        return make(model, train_cfg, accelerator, pad, hook, *args, precision=precision,
                    **kwargs)

    monkeypatch.setattr(training, "SFTTrainer", recording)
    config = load_config(None, [*tiny_overrides, "model.precision=bf16",
                                "finetune.precision=fp32"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    # alignment in bf16 on bf16 weights, fine-tuning in fp32 on fp32 weights
    assert seen == {"alignment": ("bf16", torch.bfloat16), "finetune": ("fp32", torch.float32)}
    assert (metrics.precision, metrics.finetune_precision) == ("bf16", "fp32")
    assert json.loads((run / "finetune" / "stage.json").read_text())["precision"] == "fp32"
    assert "bf16 (fine-tuning fp32)" in console_summary(metrics)


def test_the_record_round_trips_and_is_its_own_cell(tmp_path) -> None:
    record = RunMetrics(seed=0, precision="bf16", finetune_precision="fp32")
    assert RunMetrics.from_dict(record.to_dict()).finetune_precision == "fp32"
    assert "finetune_precision" not in RunMetrics(precision="bf16").to_dict()
    runs = [("a", "kl", 0, None), ("b", "kl", 1, None), ("c", "kl", 0, "fp32"),
            ("d", "kl", 1, "fp32"), ("e", "sft", 0, None)]
    for name, defense, seed, trained_in in runs:
        run = tmp_path / name
        run.mkdir()
        # finetune.precision: bf16 on a bf16 run is the run's own precision: no cell of its own
        settings = {"seed": seed, "defense": defense, "model": {"precision": "bf16"},
                    "finetune": {"precision": trained_in or "bf16"}}
        (run / "config.yaml").write_text(yaml.safe_dump(settings))
        scores = FinalScores(harmful_score=20.0, finetune_accuracy=80.0, n_eval_harmful=300,
                             n_eval_task=872)
        (run / "metrics.json").write_text(json.dumps(RunMetrics(
            seed=seed, precision="bf16", finetune_precision=trained_in,
            final=scores).to_dict()))
    rows = compare_rows(tmp_path)
    assert [r["name"] for r in rows] == ["defense=sft", "defense=kl",
                                         "defense=kl, finetune.precision=fp32"]
    assert [len(r["seeds"]) for r in rows] == [1, 2, 2]
    rows = compare_rows(tmp_path / "a")
    assert [r["name"] for r in rows] == [""]  # one cell: "(all runs)"


def test_its_runs_and_cells_are_named_with_their_section() -> None:
    # "precision-fp32" alone would read as the whole run's precision
    assert run_name({"defense": "kl", "finetune.precision": "fp32", "seed": 0}) == (
        "defense-kl_finetune.precision-fp32_seed-0")
    assert run_name({"model.precision": "fp32"}) == "precision-fp32"
    labels = [{"defense": "kl", "model.precision": "bf16", "finetune.precision": None},
              {"defense": "kl", "model.precision": "bf16", "finetune.precision": "fp32"},
              {"defense": "kl", "model.precision": "fp32", "finetune.precision": None}]
    assert series_names(labels) == [
        "kl, finetune.precision=None, precision=bf16", "kl, finetune.precision=fp32",
        "kl, finetune.precision=None, precision=fp32"]
    # --baseline precision=... is the run's precision; the fine-tuning's needs its section
    cells = [Cell(label, []) for label in labels]
    assert baseline_setting(cells, "precision=fp32") == ("model.precision", "fp32")
    assert baseline_setting(cells, "finetune.precision=fp32") == ("finetune.precision", "fp32")
