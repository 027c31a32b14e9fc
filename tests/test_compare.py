"""`hftlab compare` and `hftlab export` on run folders written by hand: cells, baselines,
attack eval variants, precisions, and what an export keeps."""

from __future__ import annotations

import json

import pytest
import yaml

from hftlab.cli import main
from hftlab.compare import collect_runs, compare_rows, compare_table
from hftlab.config import ConfigError


def test_attack_eval_variants_become_compare_columns(tmp_path) -> None:
    for defense, seed, triggered in (("sft", 0, 40.0), ("sft", 1, 50.0), ("lisa", 0, 10.0)):
        run = tmp_path / f"{defense}-{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(f"defense: {defense}\nseed: {seed}\n")
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": 5.0, "finetune_accuracy": 80.0, "n_eval_harmful": 100,
            "n_eval_task": 100, "seed": seed,
            "attack_eval": {"triggered": {"harmful_score": triggered, "n": 50}}}))
    metric = "attack_eval.triggered.harmful_score"
    rows = {r["name"]: r for r in compare_rows(tmp_path)}
    assert rows["defense=sft"][metric]["mean"] == 45.0
    lisa = rows["defense=lisa"][f"{metric}.vs_sft"]
    assert lisa["diff"] == -35.0 and lisa["test"].startswith("two-proportion")
    assert metric in compare_table(tmp_path).splitlines()[0]


def test_counts_are_not_tested_as_percentages_of_prompts(tmp_path) -> None:
    """A row count (the guardrail's harmful rows dropped) has no two-proportion test: with one
    seed on a side its difference is left out; with two or more a side, Welch applies."""
    runs = (("sft", 0, 30.0, 0), ("guardrail", 0, 20.0, 15), ("guardrail", 1, 22.0, 17),
            ("sft", 1, 34.0, 0))
    for defense, seed, hs, dropped in runs:
        run = tmp_path / f"{defense}-{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(f"defense: {defense}\nseed: {seed}\n")
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": seed,
            "data_defense_report": {"harmful_dropped": dropped}}))
    metrics = ("harmful_score", "data_defense_report.harmful_dropped")
    one_seed = compare_rows([r for r in collect_runs(tmp_path) if r.seed == 0 or
                             r.path.name.startswith("guardrail")], metrics=metrics)
    guard = {r["name"]: r for r in one_seed}["defense=guardrail"]
    assert guard["harmful_score.vs_sft"]["test"].startswith("two-proportion")
    assert guard["data_defense_report.harmful_dropped"]["mean"] == 16.0
    assert guard["data_defense_report.harmful_dropped.vs_sft"] is None
    both = {r["name"]: r for r in compare_rows(tmp_path, metrics=metrics)}["defense=guardrail"]
    diff = both["data_defense_report.harmful_dropped.vs_sft"]
    assert diff["diff"] == 16.0 and diff["test"] == "welch"


def test_baseline_can_be_any_varying_setting(tmp_path) -> None:
    for ratio, seed, hs in ((0.0, 0, 4.0), (0.0, 1, 6.0), (0.2, 0, 30.0), (0.2, 1, 34.0)):
        run = tmp_path / f"p{ratio}-s{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(f"seed: {seed}\nfinetune: {{poison_ratio: {ratio}}}\n")
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": seed}))
    rows = compare_rows(tmp_path, "poison_ratio=0.0")
    assert [r["name"] for r in rows] == ["poison_ratio=0.0", "poison_ratio=0.2"]
    diff = rows[1]["harmful_score.vs_poison_ratio=0.0"]
    assert diff["diff"] == 27.0 and diff["test"] == "welch"
    assert rows[0]["harmful_score.vs_poison_ratio=0.0"] is None
    # the default baseline of a sweep that varies only p: its lowest p
    default = compare_rows(tmp_path)[1]["harmful_score.vs_finetune.poison_ratio=0.0"]
    assert default == diff
    assert "Δ vs finetune.poison_ratio=0.0" in compare_table(tmp_path)
    with pytest.raises(ConfigError, match="not a setting that varies"):
        compare_rows(tmp_path, "lr=0.1")


def test_checkpointing_does_not_split_a_cell(tmp_path) -> None:
    """Runs of two sweeps, one checkpointing its stages, are the same experiment."""
    for seed, every in ((0, 0), (1, 10)):
        run = tmp_path / f"sft-{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(f"seed: {seed}\ncheckpoint_every: {every}\n")
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": 30.0 + seed, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": seed}))
    (row,) = compare_rows(tmp_path)
    assert row["seeds"] == [0, 1] and row["harmful_score"]["mean"] == 30.5


def test_cell_names_leave_out_empty_option_mappings(tmp_path) -> None:
    for name, defense, args in (("sft", "sft", {}), ("lisa", "lisa", {"alignment_step": 3})):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"seed": 0, "defense": defense, "defense_args": args}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": 10.0, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": 0}))
    names = [r["name"] for r in compare_rows(tmp_path)]
    assert names == ["defense=sft", "defense=lisa, defense_args={alignment_step: 3}"]


def test_export_keeps_records_and_leaves_outputs_behind(tmp_path, capsys) -> None:
    runs = tmp_path / "runs"
    for seed, hs in ((0, 10.0), (1, 14.0)):
        run = runs / f"defense-sft_seed-{seed}"
        (run / "eval").mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"seed": seed, "defense": "sft"}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": seed}))
        (run / "eval" / "completions.jsonl").write_text('{"completion": "x"}\n')
        (run / "adapter_model.safetensors").write_bytes(b"weights")
    (runs / "defense-sft_seed-0" / "align").mkdir()
    (runs / "defense-sft_seed-0" / "align" / "stage.json").write_text('{"defense_report": {}}')
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "config.yaml").write_text("seed: 2\n")
    out = tmp_path / "records"
    assert main(["export", str(runs), "--out", str(out)]) == 0
    assert "exported 2 run record(s)" in capsys.readouterr().out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "defense-sft_seed-0/align/stage.json", "defense-sft_seed-0/config.yaml",
        "defense-sft_seed-0/metrics.json", "defense-sft_seed-1/config.yaml",
        "defense-sft_seed-1/metrics.json"]
    assert compare_table(out) == compare_table(runs)
    assert main(["export", str(runs), "--out", str(runs / "records")]) == 2
    assert "lies inside" in capsys.readouterr().err


def test_runs_resolved_to_different_precisions_are_separate_cells(tmp_path) -> None:
    # `model.precision: auto` in both configs; one machine had bf16, the other did not
    for name, precision, hs in (("a", "bf16", 17.7), ("b", "bf16", 14.0), ("c", "fp32", 35.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"seed": ord(name), "defense": "sft", "model": {"precision": "auto"}}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": ord(name), "precision": precision}))
    rows = compare_rows(tmp_path)
    assert [r["name"] for r in rows] == ["precision=bf16", "precision=fp32"]
    assert [len(r["seeds"]) for r in rows] == [2, 1]
