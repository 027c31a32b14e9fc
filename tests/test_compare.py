"""`hftlab compare` and `hftlab export` on run folders written by hand: cells, baselines,
attack eval variants, precisions, what an export keeps; typos that exit 2, Δ without an
interval where seeds share the value, and CSV / JSON that carry the markdown table's numbers."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import pytest
import yaml

import hftlab
from hftlab.cli import main
from hftlab.compare import collect_runs, compare_rows, compare_table
from hftlab.compare_format import METRIC_FIELDS
from hftlab.config import ConfigError
from hftlab.stats import SHARED


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
    # a record with an option this version no longer has is compared as saved
    for name, defense, args in (("sft", "sft", {}), ("lisa", "lisa", {"alignment_step": 3}),
                                ("old", "antidote", {"retired_option": 1})):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"seed": 0, "defense": defense, "defense_args": args}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": 10.0, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": 0}))
    names = [r["name"] for r in compare_rows(tmp_path)]
    assert names == ["defense=sft", "defense=lisa, defense_args={alignment_step: 3}",
                     "defense=antidote, defense_args={retired_option: 1}"]


def test_mix_sources_that_differ_name_the_cell_by_that_source_alone(tmp_path) -> None:
    """Alignment mixes that differ in one source's options are named by that field, not by
    the whole list of sources."""
    def mix(stl_options: dict) -> dict:
        return {"kind": "mix", "options": {"sources": [
            {"kind": "refusal", "path": "paired.jsonl"},
            {"kind": "refusal", "path": "stl.json", "n": 150, "options": stl_options}]}}

    for name, options in (("plain", {"refusals_only": True}),
                          ("filtered", {"refusals_only": True, "exclude": ["as an AI"]})):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"seed": 0, "alignment": {"data": mix(options)}}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": 10.0, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": 0}))
    names = sorted(r["name"] for r in compare_rows(tmp_path))
    assert names == ["sources[1].options={exclude: ['as an AI'], refusals_only: True}",
                     "sources[1].options={refusals_only: True}"]


def test_task_refusal_is_a_percentage_of_the_task_prompts() -> None:
    from hftlab.compare import is_percentage

    assert is_percentage("task_refusal") and is_percentage("aligned.task_refusal")


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


def test_a_defense_that_trains_its_own_adapter_pairs_with_sft_on_that_adapter(tmp_path) -> None:
    """Antidote fine-tunes its own rank-256 adapter (``finetune_lora``): its cell is named by
    the adapter that trained, and its baseline is sft on that adapter, not on the config's."""
    reference = {"method": "lora", "lora": {"preset": "reference"}}
    antidote = {"method": "lora", "lora": {"preset": "antidote"}}
    for name, defense, args, train, hs in (
            ("sft-r32", "sft", {}, reference, 80.0), ("sft-r256", "sft", {}, antidote, 70.0),
            ("antidote", "antidote", {}, reference, 4.0),
            ("antidote-own", "antidote", {"finetune_lora": None}, reference, 10.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"seed": 0, "defense": defense, "defense_args": args, "finetune": {"train": train}}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": 0}))
    rows = {r["name"]: r for r in compare_rows(tmp_path)}
    assert rows["defense=antidote, r=256"]["harmful_score.vs_sft"]["diff"] == -66.0
    own = rows["defense=antidote, defense_args={finetune_lora: None}, r=32"]
    assert own["harmful_score.vs_sft"]["diff"] == -70.0


def test_settings_that_share_a_short_name_are_named_in_full(tmp_path) -> None:
    """T-Vaccine aligned on its own adapter (r 8) and fine-tuned on the protocol's (r 32, also
    varying, against the antidote-preset sft): each r is named by its whole key, and T-Vaccine's
    baseline is sft aligned on the same adapter."""
    reference, vaccine = {"lora": {"preset": "reference"}}, {"lora": {"preset": "vaccine"}}
    antidote = {"lora": {"preset": "antidote"}}
    for name, defense, align, finetune, hs in (
            ("sft", "sft", reference, reference, 80.0),
            ("sft-r256", "sft", reference, antidote, 78.0),
            ("sft-vaccine", "sft", vaccine, reference, 60.0),
            ("t_vaccine", "t_vaccine", vaccine, reference, 30.0)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(
            {"seed": 0, "defense": defense, "alignment": {"train": align},
             "finetune": {"train": finetune}}))
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": 80.0, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": 0}))
    rows = {r["name"]: r for r in compare_rows(tmp_path)}
    name = next(n for n in rows if "defense=t_vaccine" in n)
    assert "alignment.train.lora.r=8" in name and "finetune.train.lora.r=32" in name
    assert ", r=" not in name and not name.startswith("r=")
    assert rows[name]["harmful_score.vs_sft"]["diff"] == -30.0


def write_runs(folder, runs) -> None:
    """Run records by hand: (defense, seed, HS, FA, align seconds per step) each."""
    for defense, seed, hs, fa, per_step in runs:
        run = folder / f"{defense}-{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"defense: {defense}\nseed: {seed}\n")
        (run / "metrics.json").write_text(json.dumps({
            "harmful_score": hs, "finetune_accuracy": fa, "n_eval_harmful": 300,
            "n_eval_task": 872, "seed": seed,
            "stages": {"align": {"seconds": 10 * per_step, "seconds_per_step": per_step}}}))


# sft and vaccine on three seeds, lisa on one; the seeds of each defense share one alignment
RUNS = [("sft", 0, 30.0, 80.0, 4.8), ("sft", 1, 34.0, 82.5, 4.8), ("sft", 2, 35.0, 81.0, 4.8),
        ("vaccine", 0, 11.0, 70.0, 10.6), ("vaccine", 1, 12.0, 72.5, 10.6),
        ("vaccine", 2, 11.33, 71.0, 10.6), ("lisa", 0, 6.0, 72.0, 4.8)]


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "vacine"], "unknown baseline 'vacine'.*did you mean vaccine\\?"),
    (["--metrics", "harmful_scor"], "unknown metric 'harmful_scor'.*did you mean harmful_score\\?"),
    (["--metrics", "stages.align.secs_per_step"],
     "did you mean stages.align.seconds_per_step\\?"),
    (["--metrics", "stages.align"], "block of metrics.json.*stages.align.seconds_per_step"),
    (["--baseline", "defence=sft"], "not a setting that varies.*did you mean defense\\?"),
    (["--baseline", "defense=tar"], "defense=tar matches no cell; defense is one of lisa"),
])
def test_typos_exit_2_with_did_you_mean(tmp_path, capsys, argv, message) -> None:
    write_runs(tmp_path, RUNS)
    assert main(["compare", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert err.startswith("hftlab: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_a_known_key_every_run_left_empty_is_not_a_typo(tmp_path, capsys) -> None:
    write_runs(tmp_path, RUNS)
    assert main(["compare", str(tmp_path), "--metrics", "over_refusal"]) == 0
    assert "| defense=sft | 0,1,2 | — | — |" in capsys.readouterr().out


def test_seeds_that_share_the_value_get_no_interval(tmp_path, capsys) -> None:
    write_runs(tmp_path, RUNS)
    metric = "stages.align.seconds_per_step"
    rows = {r["name"]: r for r in compare_rows(tmp_path, metrics=(metric,))}
    shared = rows["defense=vaccine"][f"{metric}.vs_sft"]
    assert shared["diff"] == pytest.approx(5.8) and shared["ci95"] is None
    assert not shared["significant"] and shared["test"] == SHARED
    # lisa has one seed and a timing is no percentage: no test at all
    assert rows["defense=lisa"][f"{metric}.vs_sft"] is None
    assert main(["compare", str(tmp_path), "--metrics", metric]) == 0
    out = capsys.readouterr().out
    assert "| defense=vaccine | 0,1,2 | 10.6 ± 0.0 | +5.8 (no interval) |" in out
    assert "(no interval) = every seed of both cells gave one value" in out
    # a percentage with zero spread on both sides: no two-proportion test either
    same = [r for r in RUNS if r[0] != "lisa"]
    same = [(d, s, 12.0 if d == "sft" else 20.0, fa, t) for d, s, _, fa, t in same]
    write_runs(tmp_path / "same", same)
    (row,) = [r for r in compare_rows(tmp_path / "same") if r["name"] == "defense=vaccine"]
    assert row["harmful_score.vs_sft"]["ci95"] is None


def markdown_cells(text: str) -> list[list[str]]:
    return [line.strip("| ").split(" | ") for line in text.splitlines()
            if line.startswith("|")][2:]


def expected_cells(row: dict, metrics: list[str]) -> list[str]:
    """The markdown table's cells, formatted here from a machine row's numbers."""
    cells = [row["cell"], ",".join(map(str, row["seeds"]))]
    for m in metrics:
        mean, std, diff = row[f"{m}.mean"], row[f"{m}.std"], row[f"{m}.diff"]
        if mean is None:
            cells += ["—", "—"]
            continue
        cells.append(f"{mean:.1f}" + ("" if std is None else f" ± {std:.1f}"))
        low, high = row[f"{m}.diff_ci95_low"], row[f"{m}.diff_ci95_high"]
        if diff is None:
            cells.append("—")
        elif low is None:
            cells.append(f"{diff:+.1f} (no interval)")
        else:
            cells.append(f"{diff:+.1f} [{low:+.1f}, {high:+.1f}]"
                         + (" *" if row[f"{m}.significant"] else ""))
    return cells


def csv_rows(text: str) -> list[dict]:
    def value(key: str, text: str):
        if text == "":
            return None
        if text in ("true", "false"):
            return text == "true"
        if key == "seeds":
            return json.loads(text)
        try:
            return float(text)
        except ValueError:
            return text
    return [{k: value(k, v) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text))]


ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ["results/parity_first_mix_bf16"],
    ["results/parity_first_mix_bf16", "--baseline", "finetune.poison_ratio=0.0"],
    ["results/cpu_defenses_fp32", "--metrics", "aligned.harmful_score",
     "stages.align.seconds_per_step", "drift.mean", "empty_harmful_completions"],
]


@pytest.mark.parametrize("args", [None, *COMMANDS], ids=["by-hand", *map(" ".join, COMMANDS)])
def test_csv_and_json_carry_the_markdown_numbers(tmp_path, capsys, monkeypatch, args) -> None:
    if args is None:
        write_runs(tmp_path / "runs", RUNS)
        args = [str(tmp_path / "runs"), "--metrics", "harmful_score", "finetune_accuracy",
                "stages.align.seconds_per_step"]
    elif not (ROOT / args[0]).is_dir():
        pytest.skip(f"{args[0]} is not in this checkout")
    monkeypatch.chdir(ROOT)
    outputs = {}
    for fmt in ("markdown", "csv", "json"):
        assert main(["compare", *args, "--format", fmt]) == 0
        outputs[fmt] = capsys.readouterr().out
    table = markdown_cells(outputs["markdown"])
    data = json.loads(outputs["json"])
    metrics = data["metrics"]
    assert [expected_cells(r, metrics) for r in data["rows"]] == table
    from_csv = csv_rows(outputs["csv"])
    assert [expected_cells(r, metrics) for r in from_csv] == table
    numeric = [k for k, v in data["rows"][0].items() if k.split(".")[-1] in METRIC_FIELDS]
    for json_row, csv_row in zip(data["rows"], from_csv):
        assert {k: json_row[k] for k in numeric} == {k: csv_row[k] for k in numeric}
        assert isinstance(json_row[f"{metrics[0]}.mean"], float | int)
    # the Python API returns the same rows
    api_rows = hftlab.compare(*args[:1], **({"baseline": args[2]} if "--baseline" in args
                                            else {}), metrics=metrics)
    assert json.loads(json.dumps(api_rows)) == data["rows"]
    if importlib.util.find_spec("pandas"):
        import pandas as pd

        frame = pd.read_csv(io.StringIO(outputs["csv"]))
        assert list(frame[f"{metrics[0]}.mean"]) == pytest.approx(
            [r[f"{metrics[0]}.mean"] for r in data["rows"]])


def test_out_writes_the_file_and_says_where(tmp_path, capsys) -> None:
    write_runs(tmp_path / "runs", RUNS)
    for fmt, name in (("json", "a/b.json"), ("csv", "c.csv"), ("markdown", "t.md")):
        out = tmp_path / name
        argv = ["compare", str(tmp_path / "runs"), "--out", str(out)]
        assert main(argv + (["--format", fmt] if fmt != "markdown" else [])) == 0
        printed = capsys.readouterr().out
        assert printed == f"wrote {out} ({fmt})\n"
        assert main(["compare", str(tmp_path / "runs"), "--format", fmt]) == 0
        assert out.read_text() == capsys.readouterr().out
    assert main(["compare", str(tmp_path / "runs"), "--out", str(tmp_path)]) == 2
    assert main(["compare", str(tmp_path / "runs"), "--format", "xml"]) == 2
    assert "invalid choice" in capsys.readouterr().err
