"""The experiment builder: every plug-in and every check across fields, before any file is
written, for ``hftlab run``, every run of ``hftlab sweep --dry-run`` and ``run_pipeline``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hftlab.cli import main
from hftlab.config import ConfigError, load_config
from hftlab.experiment import build_experiment


def test_the_experiment_holds_every_plugin(tiny_config) -> None:
    experiment = build_experiment(tiny_config)
    assert experiment.defense.name == "sft" and experiment.attack.name == "harmful_mix"
    assert experiment.judge.name == "keyword" and experiment.task.name == "sst2"
    assert experiment.finetune_train == tiny_config.finetune.train


def test_the_config_alone_does_not_know_plugins() -> None:
    """Plug-in names are the builder's to check: the config module imports no registry."""
    config = load_config(None, ["defense=vacine"])
    with pytest.raises(ConfigError, match=r"^run.yaml: 'defense' unknown defense 'vacine'.*"
                                          r"Did you mean 'vaccine'"):
        build_experiment(config, "run.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("defense_args={bogus: 1}", r"'defense_args': 'sft' takes no options"),
    ("attack_args={bogus: 1}", r"'attack_args': .*unknown key 'bogus'"),
    ("eval.judge_args={bogus: 1}", r"'eval.judge_args': 'keyword' takes no options|"
                                   r"'eval.judge_args': .*unknown key 'bogus'"),
    ("defense=booster", "needs the provider's own harmful QA"),
    ("finetune.train.max_length=100000", "more than model"),
])
def test_bad_settings_fail_naming_the_key(tiny_overrides, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_experiment(load_config(None, [*tiny_overrides, override]))


def test_run_with_bad_defense_args_writes_nothing(tiny_overrides, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["run", str(write_config(tmp_path)), *tiny_overrides, "defense=vaccine",
                 "defense_args={bogus: 1}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "'defense_args'" in err and "bogus" in err


def test_run_pipeline_checks_before_touching_the_folder(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_pipeline

    config = load_config(None, [*tiny_overrides, "defense=vaccine", "defense_args={bogus: 1}"])
    with pytest.raises(ConfigError, match="bogus"):
        run_pipeline(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_sweep_dry_run_rejects_bad_defense_args_in_any_cell(tiny_overrides, tmp_path,
                                                            capsys) -> None:
    shared = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in tiny_overrides)}
    grid = [{"defense": ["sft"], "seed": [0, 1]},
            {"defense": ["vaccine"], "defense_args": [{"rho": 2.0}, {"bogus": 1}]}]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": write_config(tmp_path).name, "set": shared,
                                    "grid": grid, "out": str(tmp_path / "out")}))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "run defense-vaccine_defense_args-bogus=1:" in err
    assert "'defense_args'" in err and "unknown key 'bogus'" in err
    assert not (tmp_path / "out").exists()


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("seed: 0\n")
    return path
