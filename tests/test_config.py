from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.cli import main
from hftlab.config import ConfigError, dump_config, load_config
from hftlab.experiment import build_experiment


def test_defaults_are_valid() -> None:
    config = load_config(None)
    assert config.defense == "sft" and config.attack == "harmful_mix"


def test_dotted_overrides_reach_nested_fields_and_keep_siblings() -> None:
    config = load_config(None, ["finetune.poison_ratio=0.2", "seed=2", "eval.harmful.n=7",
                                "alignment.train.lr=1e-3", "finetune.train.lora.r=4"])
    assert config.finetune.poison_ratio == 0.2 and config.seed == 2
    assert config.eval.harmful.n == 7 and config.eval.harmful.kind == "demo_harmful_prompts"
    assert config.eval.harmful.offset == 130  # sibling kept from the default
    assert config.alignment.train.lr == 1e-3  # YAML reads 1e-3 as a string; coerced
    assert config.finetune.train.lora.r == 4 and config.finetune.train.lora.alpha == 16


def test_a_new_data_kind_replaces_the_default_source() -> None:
    config = load_config(None, ["eval.harmful={kind: advbench, path: x.csv}"])
    assert config.eval.harmful.offset == 0 and config.eval.harmful.n is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("finetune.poison_rate=0.1", "Did you mean 'finetune.poison_ratio'"),
        ("finetune.poison_ratio=1.5", r"must be in \[0, 1\]"),
        ("finetune.poison_ratio=-0.1", r"must be in \[0, 1\]"),
        ("defense=vacine", "unknown defense 'vacine'"),
        ("attack=nope", "unknown attack 'nope'"),
        ("eval.judge=kw", "unknown judge 'kw'"),
        ("finetune.n=many", "'finetune.n' must be a whole number"),
        ("model.precision=fp8", "choose one of"),
        ("finetune.task=mnli", "unknown task 'mnli'"),
        ("seed", "must look like key=value"),
        ("attack_args={bogus: 1}", "unknown key 'bogus'"),
    ],
)
def test_bad_values_fail_with_the_key_named(override: str, message: str) -> None:
    # plug-in names and options are checked when the experiment is built
    with pytest.raises(ConfigError, match=message):
        build_experiment(load_config(None, [override]))


def test_yaml_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("finetune:\n  nn: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'finetune.nn'.*'finetune.n'"):
        load_config(path)


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    config = load_config(None, ["finetune.n=50"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_cli_bad_config_exits_nonzero_with_one_clear_message(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("seed: 0\n")
    code = main(["run", str(path), "finetune.poison_ratio=2", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("hftlab: error:") and "poison_ratio" in err
    assert "Traceback" not in err


def test_shipped_configs_load() -> None:
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in root.glob("*.yaml"):
        if path.name != "service.yaml":  # the service's own config (tests/serve)
            load_config(path)


class TestLoraPresets:
    def test_preset_fills_the_adapter(self) -> None:
        from hftlab.config import LORA_PRESETS

        config = load_config("configs/cpu_sst2.yaml", ["finetune.train.lora={preset: reference}"])
        lora = config.finetune.train.lora
        assert (lora.r, lora.alpha, lora.dropout) == (32, 4, 0.0)
        assert lora.target_modules == ["q_proj", "k_proj", "v_proj"]
        assert lora.scale == 0.125
        assert config.alignment.train.lora.r == 8  # the other stage keeps its own
        assert LORA_PRESETS["reference"]["r"] == 32  # not mutated by the run

    def test_keys_beside_the_preset_win(self) -> None:
        config = load_config(None, ["alignment.train.lora={preset: vaccine, r: 4}"])
        lora = config.alignment.train.lora
        assert (lora.r, lora.alpha, lora.dropout) == (4, 4, 0.1)

    def test_yaml_preset_replaces_the_defaults(self, tmp_path) -> None:
        path = tmp_path / "c.yaml"
        path.write_text("alignment:\n  train:\n    lora: {preset: antidote}\n")
        assert load_config(path).alignment.train.lora.r == 256

    def test_unknown_preset_names_the_key_and_the_presets(self) -> None:
        with pytest.raises(ConfigError, match=r"alignment.train.lora.preset.*Did you mean "
                           r"'reference'.*Known: antidote, cpu"):
            load_config(None, ["alignment.train.lora={preset: refrence}"])

    def test_resolved_config_round_trips_without_the_preset_name(self, tmp_path) -> None:
        from hftlab.config import dump_config

        config = load_config(None, ["finetune.train.lora={preset: reference}"])
        path = tmp_path / "c.yaml"
        path.write_text(dump_config(config))
        assert "preset" not in path.read_text()
        assert load_config(path).finetune.train.lora == config.finetune.train.lora

    def test_reference_protocol_config_loads(self) -> None:
        config = load_config("configs/cpu_sst2_ref.yaml")
        assert config.alignment.train.lora.scale == config.finetune.train.lora.scale == 0.125
        assert config.alignment.data.kind == "mix"


def test_preset_override_replaces_the_files_adapter() -> None:
    config = load_config("configs/cpu_sst2.yaml", ["alignment.train.lora.preset=reference"])
    lora = config.alignment.train.lora
    assert (lora.r, lora.alpha, lora.target_modules) == (32, 4, ["q_proj", "k_proj", "v_proj"])
    later = load_config("configs/cpu_sst2.yaml", ["alignment.train.lora.preset=reference",
                                                  "alignment.train.lora.r=16"])
    assert (later.alignment.train.lora.r, later.alignment.train.lora.alpha) == (16, 4)
