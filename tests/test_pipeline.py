"""End to end on the tiny model: every stage, resume, determinism, caching, loud failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hftlab import pipeline
from hftlab.config import ConfigError, load_config
from hftlab.data.records import DataError
from hftlab.pipeline import STAGES, run_pipeline
from hftlab.utils import read_jsonl

REQUIRED_KEYS = {
    "harmful_score", "finetune_accuracy", "aligned.harmful_score", "aligned.finetune_accuracy",
    "base.harmful_score", "judge", "n_eval_harmful", "n_eval_task", "curves", "drift", "stages",
    "versions", "seed",
}


def comparable(metrics: dict) -> dict:
    """Metrics without wall-clock fields."""
    return {k: v for k, v in metrics.items() if k not in ("stages",)}


def test_every_stage_writes_its_artifacts(tiny_config, tmp_path: Path) -> None:
    run = tmp_path / "run"
    metrics = run_pipeline(tiny_config, run)
    assert REQUIRED_KEYS <= set(metrics)
    for stage in STAGES:
        assert (run / stage / "stage.json").exists()
    assert (run / "config.yaml").exists()
    user = read_jsonl(run / "data" / "user_data.jsonl")
    assert len(user) == 20 and sum(r["is_harmful"] for r in user) == 4
    completions = read_jsonl(run / "eval" / "completions.jsonl")
    assert len(completions) == 12 and {"prompt", "completion"} <= set(completions[0])
    assert metrics["n_eval_harmful"] == 6 and metrics["n_eval_task"] == 6
    assert metrics["empty_harmful_completions"] == sum(
        not r["completion"].strip() for r in completions if r["set"] == "harmful")
    assert 0 <= metrics["harmful_score"] <= 100 and 0 <= metrics["finetune_accuracy"] <= 100
    # curves at steps 0, 2, 4, each with the three losses
    assert [c["step"] for c in metrics["curves"]] == [0, 2, 4]
    assert all(c["alignment_loss"] > 0 and c["harmful_loss"] > 0 for c in metrics["curves"])
    assert len(metrics["drift"]["per_layer"]) == 3  # embeddings + 2 blocks
    assert metrics["drift"]["per_layer"][0] == 0.0  # LoRA does not touch the embeddings
    assert metrics["drift"]["mean"] > 0
    for stage in ("align", "finetune"):
        timing = metrics["stages"][stage]
        assert timing["tokens"] > 0 and timing["tokens_per_s"] > 0 and timing["peak_rss_mb"] > 0
        # the machine that timed it: CPU, usable cores, the threads torch computed with
        assert f"{torch.get_num_threads()} threads" in timing["machine"]
        assert " CPUs · " in timing["machine"]
        # and the load other processes put on its cores meanwhile
        # (absent: a stage under a second, too short for the kernel's 10 ms ticks)
        assert timing.get("other_cores") is None or timing["other_cores"] >= 0
        assert isinstance(timing.get("contended", False), bool)
    assert json.loads((run / "metrics.json").read_text())["seed"] == 0


def test_same_config_same_metrics_and_alignment_cache_reused(tiny_config, tmp_path) -> None:
    first = run_pipeline(tiny_config, tmp_path / "a")
    second = run_pipeline(tiny_config, tmp_path / "b")
    assert comparable(first) == comparable(second)
    assert second["stages"]["align"]["cached"] is True
    # trained or reused, the alignment's record names the rows it trained on by content
    from hftlab.context import RunContext
    from hftlab.data.loaders import data_fingerprint

    rows = RunContext(tiny_config, tmp_path / "c").load(tiny_config.alignment.data)
    for run in ("a", "b"):
        stage = json.loads((tmp_path / run / "align" / "stage.json").read_text())
        assert stage["data_fingerprint"] == data_fingerprint(rows)


def test_interrupted_run_resumes_to_the_same_metrics(
    tiny_config, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = run_pipeline(tiny_config, tmp_path / "reference", force=True)
    run = tmp_path / "interrupted"
    original = pipeline.stage_eval

    def crash(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "stage_eval", crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_config, run)
    assert (run / "finetune" / "stage.json").exists()
    assert not (run / "eval" / "stage.json").exists() and not (run / "metrics.json").exists()
    finetune_marker = (run / "finetune" / "stage.json").stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "stage_eval", original)
    resumed = run_pipeline(tiny_config, run)
    assert (run / "finetune" / "stage.json").stat().st_mtime_ns == finetune_marker  # skipped
    assert comparable(resumed) == comparable(reference)


def test_run_killed_mid_stage_resumes_from_its_checkpoint(
    tiny_overrides, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hftlab.train import SFTTrainer

    config = load_config(None, [*tiny_overrides, "checkpoint_every=1"])
    run = tmp_path / "killed"
    save = SFTTrainer.save_checkpoint

    def save_then_die(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if self.stage == "finetune" and self.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SFTTrainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, run)
    assert (run / "finetune" / "checkpoint" / "latest.json").is_file()
    assert not (run / "finetune" / "stage.json").exists()
    assert not (run / "align" / "checkpoint").exists()  # removed once the stage completed
    monkeypatch.setattr(SFTTrainer, "save_checkpoint", save)
    resumed = run_pipeline(config, run)
    assert not (run / "finetune" / "checkpoint").exists()
    finetune = json.loads((run / "finetune" / "stage.json").read_text())
    assert finetune["steps"] == 4 and finetune["resumed_from_step"] == 2
    # an uninterrupted run without checkpoints (own cache: nothing shared) gives the same run
    plain = load_config(None, [*tiny_overrides, f"cache_dir={tmp_path / 'other-cache'}"])
    reference = run_pipeline(plain, tmp_path / "reference")
    assert comparable(resumed) == comparable(reference)


def test_checkpoint_every_is_not_part_of_the_run(tiny_overrides, tmp_path) -> None:
    from hftlab.compare import collect_runs
    from hftlab.context import RunContext
    from hftlab.pipeline import prepare_run_dir

    def guard_run_dir(config, run, force):
        prepare_run_dir(RunContext(config, run, force))

    run = tmp_path / "run"
    run.mkdir()
    guard_run_dir(load_config(None, tiny_overrides), run, force=False)
    guard_run_dir(load_config(None, [*tiny_overrides, "checkpoint_every=5"]), run, force=False)
    assert "checkpoint_every: 5" in (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="different config"):
        guard_run_dir(load_config(None, [*tiny_overrides, "seed=1"]), run, force=False)
    (run / "metrics.json").write_text("{}")
    assert "checkpoint_every" not in collect_runs(tmp_path)[0].settings


def test_checkpoint_every_must_not_be_negative(tiny_overrides) -> None:
    with pytest.raises(ConfigError, match="checkpoint_every"):
        load_config(None, [*tiny_overrides, "checkpoint_every=-1"])


def test_force_redoes_stages(tiny_config, tmp_path) -> None:
    run = tmp_path / "run"
    run_pipeline(tiny_config, run)
    marker = (run / "finetune" / "stage.json").stat().st_mtime_ns
    run_pipeline(tiny_config, run, force=True)
    assert (run / "finetune" / "stage.json").stat().st_mtime_ns != marker


def test_other_config_in_same_run_dir_is_refused(tiny_overrides, tmp_path) -> None:
    run = tmp_path / "run"
    run_pipeline(load_config(None, tiny_overrides), run)
    with pytest.raises(ConfigError, match="different config"):
        run_pipeline(load_config(None, [*tiny_overrides, "seed=3"]), run)


def test_overlapping_provider_and_user_harmful_rows_fail_loudly(tiny_overrides, tmp_path) -> None:
    config = load_config(None, [*tiny_overrides, "finetune.harmful_data.offset=0"])
    with pytest.raises(DataError, match="disjoint"):
        run_pipeline(config, tmp_path / "run")


def test_too_many_rows_requested_fails_before_training(tiny_overrides, tmp_path) -> None:
    config = load_config(None, [*tiny_overrides, "finetune.n=1000"])
    with pytest.raises(DataError, match="finetune.n=1000"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run" / "align").exists()


def test_full_finetuning_and_alpaca_format(tiny_overrides, tmp_path) -> None:
    config = load_config(
        None,
        [*tiny_overrides, "finetune.train.method=full", "model.prompt_format=alpaca",
         "mechanisms.drift=false"],
    )
    metrics = run_pipeline(config, tmp_path / "run")
    assert metrics["drift"] is None
    assert (tmp_path / "run" / "finetune" / "model" / "model.safetensors").exists()


def test_without_alignment_the_aligned_model_is_the_base(tiny_overrides, tmp_path) -> None:
    config = load_config(None, [*tiny_overrides, "alignment.enabled=false"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert metrics["aligned.harmful_score"] == metrics["base.harmful_score"]


def test_fixed_alignment_seed_shares_one_aligned_model_across_run_seeds(
    tiny_overrides, tmp_path
) -> None:
    first = run_pipeline(load_config(None, [*tiny_overrides, "alignment.seed=0", "seed=1"]),
                         tmp_path / "a")
    second = run_pipeline(load_config(None, [*tiny_overrides, "alignment.seed=0", "seed=2"]),
                          tmp_path / "b")
    assert first["stages"]["align"]["cached"] is False
    assert second["stages"]["align"]["cached"] is True
    assert first["aligned.harmful_score"] == second["aligned.harmful_score"]
    assert first["curves"] != second["curves"]  # the fine-tuning seeds differ


def test_run_started_by_an_older_version_resumes(tiny_config, tmp_path) -> None:
    """A config.yaml written before a setting existed (here: eval.hs_plus) still matches."""
    from hftlab.config import dump_config

    run = tmp_path / "run"
    run_pipeline(tiny_config, run)
    older = "\n".join(line for line in dump_config(tiny_config).splitlines()
                      if "hs_plus" not in line) + "\n"
    (run / "config.yaml").write_text(older)
    (run / "metrics.json").unlink()
    run_pipeline(tiny_config, run)  # no "different config" error
    assert (run / "metrics.json").exists()
