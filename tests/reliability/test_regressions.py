"""Cases a hostile or careless user tried that already behaved, kept so they stay that way:
malformed data files give one line naming file, row and fix; a stop at any stage boundary
resumes to the same result; one seed gives one result; YAML never runs code; harmful
completions never reach the console."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hftlab.pipeline as pipeline
from hftlab.cli import main
from hftlab.config import ConfigError, load_config
from hftlab.experiment import build_experiment
from hftlab.pipeline import STAGES, run_pipeline

SST2_ROWS = [{"sentence": f"a fine film number {i}", "label": i % 2} for i in range(40)]


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


MALFORMED = {
    # id: (config key, data spec without path, file name, file content, words the error names)
    "sst2-broken-json-line": ("finetune.task_data", "kind: sst2", "t.jsonl",
                              jsonl(SST2_ROWS[:3]) + "{oops\n", ["line 4", "malformed JSON"]),
    "sst2-missing-label": ("finetune.task_data", "kind: sst2", "t.jsonl",
                           jsonl([{"sentence": "x"}]), ["line 1", "'label'"]),
    "sst2-bad-label": ("finetune.task_data", "kind: sst2", "t.jsonl",
                       jsonl([{"sentence": "x", "label": -1}]), ["line 1", "0/1"]),
    "sst2-empty-sentence": ("finetune.task_data", "kind: sst2", "t.jsonl",
                            jsonl([{"sentence": "", "label": 1}]), ["line 1", "is empty"]),
    "sst2-tsv-columns": ("finetune.task_data", "kind: sst2", "t.tsv",
                         "sentence\tlabel\nok\t1\ntoo\tmany\tfields\n", ["line 3", "fields"]),
    "sst2-not-utf8": ("finetune.task_data", "kind: sst2", "t.jsonl",
                      b"\xff\xfe junk".decode("latin-1"), ["UTF-8"]),
    "sst2-unknown-suffix": ("finetune.task_data", "kind: sst2", "t.xml", "<x/>",
                            ["unsupported file type"]),
    "sst2-too-few-rows": ("finetune.task_data", "kind: sst2, n: 1000", "t.jsonl",
                          jsonl(SST2_ROWS), ["has only 40"]),
    "beavertails-not-a-list": ("finetune.harmful_data", "kind: beavertails", "b.json",
                               '{"prompt": "x"}', ["expected a JSON list"]),
    "beavertails-bad-is-safe": ("finetune.harmful_data", "kind: beavertails", "b.jsonl",
                                jsonl([{"prompt": "p", "response": "r", "is_safe": "maybe"}]),
                                ["line 1", "true or false"]),
    "refusal-no-prompt": ("alignment.data", "kind: refusal", "r.jsonl",
                          jsonl([{"text": "x"}]), ["line 1", "'instruction'"]),
    "refusal-number-response": ("alignment.data", "kind: refusal", "r.jsonl",
                                jsonl([{"prompt": "p", "response": 3}]),
                                ["line 1", "must be a string"]),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_a_malformed_data_file_is_one_line_naming_file_and_row(case, tiny_overrides, tmp_path,
                                                               capsys) -> None:
    key, spec, name, content, words = MALFORMED[case]
    data = tmp_path / name
    data.write_text(content, encoding="latin-1" if case == "sst2-not-utf8" else "utf-8")
    out = tmp_path / "run"
    code = main(["run", "configs/quickstart.yaml", *tiny_overrides,
                 f"{key}={{{spec}, path: {data}}}", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(data) in err
    for word in words:
        assert word in err, err
    assert not out.exists()


def without_stages(metrics) -> dict:
    """A run's metrics without its timings (seconds and cache paths differ between runs)."""
    return {k: v for k, v in metrics.to_dict().items() if k != "stages"}


@pytest.mark.parametrize("stopped_before", STAGES[1:])
def test_a_run_stopped_at_a_stage_boundary_resumes_to_the_same_result(
        stopped_before, tiny_config, tmp_path, monkeypatch) -> None:
    reference = run_pipeline(tiny_config, tmp_path / "reference")
    run = tmp_path / "run"
    real = pipeline.run_stage

    def stop(ctx, name, fn, seed):
        if name == stopped_before:
            raise KeyboardInterrupt
        return real(ctx, name, fn, seed)

    tiny_config.cache_dir = str(tmp_path / "own-cache")
    monkeypatch.setattr(pipeline, "run_stage", stop)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config, run)
    monkeypatch.setattr(pipeline, "run_stage", real)
    assert without_stages(run_pipeline(tiny_config, run)) == without_stages(reference)


def test_one_seed_gives_one_result(tiny_config, tmp_path) -> None:
    first = run_pipeline(tiny_config, tmp_path / "a")
    tiny_config.cache_dir = str(tmp_path / "second-cache")
    second = run_pipeline(tiny_config, tmp_path / "b")
    assert without_stages(first) == without_stages(second)


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_never_runs_code(where, tiny_overrides, tmp_path) -> None:
    marker = tmp_path / "executed"
    payload = ("!!python/object/apply:pathlib.Path.touch "
               f'[!!python/object/apply:pathlib.Path ["{marker}"]]')
    config = tmp_path / "c.yaml"
    config.write_text(f"seed: {payload}\n" if where == "file" else "seed: 1\n")
    overrides = [f"seed={payload}"] if where == "override" else []
    with pytest.raises(ConfigError):
        load_config(config, [*tiny_overrides, *overrides])
    assert not marker.exists()


def test_harmful_completions_never_reach_the_console(tiny_overrides, tmp_path, capsys,
                                                    monkeypatch) -> None:
    import hftlab.eval_stage as eval_stage

    real = eval_stage.generate

    def marked(model, formatter, prompts, *args, **kwargs):
        answers = real(model, formatter, prompts, *args, **kwargs)
        return [f"MARKED-COMPLETION-{i} {a}" for i, a in enumerate(answers)]

    monkeypatch.setattr(eval_stage, "generate", marked)
    out = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides, "-v", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr()
    assert "MARKED-COMPLETION-0" in (out / "eval" / "completions.jsonl").read_text()
    assert "MARKED-COMPLETION" not in printed.out + printed.err


@pytest.mark.parametrize("override,suggestion", [
    ("defense=boostr", "booster"), ("attack=harmfull_mix", "harmful_mix"),
    ("eval.judge=keywrod", "keyword"), ("finetune.poison_ratoi=0.1", "poison_ratio"),
    ("finetune.train.lora.rr=4", "'finetune.train.lora.r'"),
], ids=["defense", "attack", "judge", "key", "nested-key"])
def test_a_typo_gets_did_you_mean(override, suggestion, tiny_overrides) -> None:
    with pytest.raises(ConfigError, match=suggestion):  # names: the experiment builder's check
        build_experiment(load_config(None, [*tiny_overrides, override]))


def test_resume_reads_no_file_outside_the_run_and_cache(tiny_config, tmp_path) -> None:
    run = tmp_path / "run"
    run_pipeline(tiny_config, run)
    before = {p: p.stat().st_mtime_ns for p in Path(run).rglob("*") if p.is_file()}
    run_pipeline(tiny_config, run)
    after = {p: p.stat().st_mtime_ns for p in Path(run).rglob("*") if p.is_file()}
    changed = sorted(str(p.relative_to(run)) for p in after if before.get(p) != after[p])
    assert changed in (["config.yaml", "metrics.json"], ["metrics.json"], ["config.yaml"], [])
