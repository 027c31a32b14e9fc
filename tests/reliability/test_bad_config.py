"""Bad configs fail before any work, as one line naming the key (or file) and the fix: numbers
out of range or not finite, YAML with duplicate keys or nothing in it, and settings that only
the model's architecture can judge (token lengths, LoRA targets), checked without its weights."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from pathlib import Path

import pytest

from hftlab.cli import main
from hftlab.config import NUMERIC_BOUNDS, Config, ConfigError, load_config
from hftlab.data.spec import DataSpec

QUICKSTART = "configs/quickstart.yaml"


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The run's stderr, asserted to be exactly one ``hftlab: error:`` line."""
    err = capsys.readouterr().err
    assert err.startswith("hftlab: error: "), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def run_main(args: list[str], out: Path) -> int:
    return main(["run", QUICKSTART, *args, "--out", str(out)])


# ------------------------------------------------------------------------- numeric settings

NUMERIC_CASES = [
    ("alignment.train.lr=.inf", "'alignment.train.lr' must be a finite number > 0, got inf"),
    ("alignment.train.lr=.nan", "'alignment.train.lr' must be a finite number > 0, got nan"),
    ("alignment.train.lr=-1", "'alignment.train.lr' must be a finite number > 0"),
    ("alignment.train.lr=0", "'alignment.train.lr' must be a finite number > 0"),
    ("finetune.train.lr=inf", "'finetune.train.lr' must be a finite number > 0, got inf"),
    ("finetune.train.lr=1e999", "'finetune.train.lr' must be a finite number > 0, got inf"),
    ("alignment.train.weight_decay=.nan", "'alignment.train.weight_decay' must be a finite "
     "number ≥ 0"),
    ("finetune.train.weight_decay=-0.1", "'finetune.train.weight_decay' must be a finite "
     "number ≥ 0"),
    ("finetune.train.warmup_ratio=.inf", r"'finetune.train.warmup_ratio' must be in \[0, 1\)"),
    ("alignment.train.warmup_ratio=1", r"'alignment.train.warmup_ratio' must be in \[0, 1\)"),
    ("finetune.train.max_grad_norm=-1", r"'finetune.train.max_grad_norm' must be a finite "
     r"number ≥ 0 \(0 turns clipping off\)"),
    ("alignment.train.max_grad_norm=.nan", "'alignment.train.max_grad_norm' must be a finite"),
    ("alignment.train.epochs=.inf", "'alignment.train.epochs' must be a finite number > 0"),
    ("alignment.train.epochs=0", "'alignment.train.epochs' must be a finite number > 0"),
    ("finetune.train.epochs=-2", "'finetune.train.epochs' must be a finite number > 0"),
    ("alignment.train.max_steps=-5", r"'alignment.train.max_steps' must be a whole number ≥ 1 "
     r"or null \(null: train for `epochs`\), got -5"),
    ("finetune.train.max_steps=0", "'finetune.train.max_steps' must be a whole number ≥ 1"),
    ("finetune.train.batch_size=0", "'finetune.train.batch_size' must be a whole number ≥ 1"),
    ("alignment.train.grad_accum=0", "'alignment.train.grad_accum' must be a whole number ≥ 1"),
    ("finetune.train.max_length=0", "'finetune.train.max_length' must be a whole number ≥ 1"),
    ("alignment.train.lora.dropout=1", r"'alignment.train.lora.dropout' must be in \[0, 1\)"),
    ("finetune.train.lora.dropout=.nan", r"'finetune.train.lora.dropout' must be in \[0, 1\)"),
    ("alignment.train.lora.alpha=0", "'alignment.train.lora.alpha' must be a whole number > 0"),
    ("finetune.train.lora.r=0", "'finetune.train.lora.r' must be a whole number ≥ 1"),
    ("finetune.poison_ratio=.nan", r"'finetune.poison_ratio' must be in \[0, 1\], got nan"),
    ("finetune.poison_ratio=.inf", r"'finetune.poison_ratio' must be in \[0, 1\], got inf"),
    ("finetune.n=0", "'finetune.n' must be a whole number ≥ 1"),
    ("eval.max_new_tokens=0", "'eval.max_new_tokens' must be a whole number ≥ 1"),
    ("eval.task_max_new_tokens=0", r"'eval.task_max_new_tokens' must be a whole number ≥ 1 or "
     r"null \(null: eval.max_new_tokens\)"),
    ("eval.generation_max_new_tokens=0", "'eval.generation_max_new_tokens' must be a whole "
     "number ≥ 1 or null"),
    ("eval.batch_size=0", "'eval.batch_size' must be a whole number ≥ 1"),
    ("mechanisms.batch_size=0", "'mechanisms.batch_size' must be a whole number ≥ 1"),
    ("mechanisms.every=-1", r"'mechanisms.every' must be a whole number ≥ 0 \(0 turns the "
     r"curves off\)"),
    ("seed=-1", r"'seed' must be in \[0, 2147483647\], got -1"),
    ("seed=2147483648", r"'seed' must be in \[0, 2147483647\]"),
    ("alignment.seed=-1", r"'alignment.seed' must be in \[0, 2147483647\] or null"),
    ("seed=" + "9" * 400, r"'seed' must be in \[0, 2147483647\], got 9999"),
    ("checkpoint_every=-1", r"'checkpoint_every' must be a whole number ≥ 0 \(0: no checkpoints"),
    ("eval.harmful.n=0", r"'eval.harmful.n' must be a whole number ≥ 1 or null \(null: every "
     r"row\)"),
    ("eval.task.offset=-1", "'eval.task.offset' must be a whole number ≥ 0"),
    ("finetune.harmful_data.n=-3", "'finetune.harmful_data.n' must be a whole number ≥ 1"),
    ("provider_harmful={kind: demo_harmful_qa, n: 0}", "'provider_harmful.n' must be a whole "
     "number ≥ 1"),
    ("eval.harmless={kind: demo_harmful_prompts, offset: -2}", "'eval.harmless.offset' must be "
     "a whole number ≥ 0"),
    ("finetune.train.lora.target_modules=[]", r"'finetune.train.lora.target_modules' is \[\]; "
     "list module names"),
    ("alignment.train.lora.target_modules=[all-linear, q_proj]", "'all-linear' stands alone"),
]


@pytest.mark.parametrize(("override", "message"), NUMERIC_CASES,
                         ids=[case[0][:50] for case in NUMERIC_CASES])
def test_a_bad_number_is_refused_with_its_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(("override", "message"), [
    ("alignment.train.lr=.inf", "'alignment.train.lr' must be a finite number > 0"),
    ("alignment.train.max_steps=-5", "'alignment.train.max_steps' must be a whole number ≥ 1"),
    ("eval.task_max_new_tokens=0", "'eval.task_max_new_tokens' must be a whole number ≥ 1"),
], ids=["lr-inf", "max_steps-negative", "task_max_new_tokens-zero"])
def test_through_the_cli_a_bad_number_writes_nothing(override: str, message: str,
                                                     tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run_main([override], out) == 2
    err = one_error_line(capsys)
    assert QUICKSTART in err and message in err
    assert not out.exists()


def numeric_fields(cls: type, seen: set[type]) -> list[tuple[type, str]]:
    """Every (dataclass, field) of the config tree whose type is int or float (maybe None)."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp) or (tp,)
        if any(a in (int, float) for a in args):
            found.append((cls, f.name))
        for arg in args:
            if dataclasses.is_dataclass(arg) and arg not in seen:
                seen.add(arg)
                found.extend(numeric_fields(arg, seen))
    return found


def test_every_numeric_setting_has_a_range() -> None:
    """A numeric field added to the config without a range in NUMERIC_BOUNDS fails here."""
    fields = numeric_fields(Config, {Config, DataSpec}) + numeric_fields(DataSpec, set())
    missing = [f"{cls.__name__}.{name}" for cls, name in fields
               if name not in NUMERIC_BOUNDS.get(cls, {})]
    assert not missing, f"add these to config.NUMERIC_BOUNDS: {missing}"
    assert len(fields) >= 25


def test_a_plugin_option_must_be_finite(tiny_overrides, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert run_main([*tiny_overrides, "defense=booster", "defense_args={lamb: .nan}",
                     "provider_harmful={kind: demo_harmful_qa, n: 20}"], out) == 2
    err = one_error_line(capsys)
    assert "'lamb' must be a finite number, got nan" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------- YAML

YAML_CASES = [
    ("duplicate-top", "seed: 1\nseed: 2\n",
     r"c.yaml:2: key 'seed' is given twice in one mapping \(also on line 1\); keep one"),
    ("duplicate-nested", "finetune:\n  n: 3\n  poison_ratio: 0.1\n  n: 4\n",
     r"c.yaml:4: key 'n' is given twice in one mapping \(also on line 2\)"),
    ("duplicate-section", "eval:\n  batch_size: 2\nseed: 0\neval:\n  max_new_tokens: 8\n",
     r"c.yaml:4: key 'eval' is given twice"),
    ("duplicate-flow", "eval: {batch_size: 2, batch_size: 4}\n",
     r"c.yaml:1: key 'batch_size' is given twice"),
    ("duplicate-deep", "defense: sft\nattack_args: {}\nfinetune:\n  train:\n    lora:\n"
     "      r: 4\n      r: 8\n", r"c.yaml:7: key 'r' is given twice"),
    ("empty", "", r"c.yaml is empty .*start from configs/quickstart.yaml"),
    ("only-comments", "# nothing yet\n\n# still nothing\n", r"c.yaml is empty .*quickstart"),
    ("null", "null\n", r"c.yaml is empty \(nothing but comments or null\)"),
    ("tilde", "~\n", r"c.yaml is empty"),
    ("a-list", "- seed\n- 2\n", r"c.yaml: the top level must be a mapping"),
    ("a-scalar", "seed=2\n", r"c.yaml: the top level must be a mapping"),
    ("unclosed-flow", "seed: [1, 2\n", r"c.yaml:2:1: not valid YAML: expected ',' or ']'"),
    ("bad-indent", "finetune:\n  n: 3\n poison_ratio: 0.1\n", r"c.yaml:3:2: not valid YAML"),
    ("tab-indent", "finetune:\n\tn: 3\n", r"c.yaml:2:1: not valid YAML"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in YAML_CASES],
                         ids=[c[0] for c in YAML_CASES])
def test_a_bad_yaml_file_names_the_file_and_line(text: str, message: str,
                                                 tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_through_the_cli_a_duplicate_key_writes_nothing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("finetune:\n  n: 3\n  n: 4\n")
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"{path}:3: key 'n' is given twice" in err
    assert not out.exists()


def test_an_empty_config_is_not_a_default_run(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# TODO\n")
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert f"config file {path} is empty" in err and "configs/quickstart.yaml" in err
    assert not out.exists()


def test_merge_keys_may_override_what_they_merge(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("alignment:\n  train: &base {lr: 0.001, batch_size: 4}\n"
                    "finetune:\n  train:\n    <<: *base\n    lr: 0.0001\n")
    config = load_config(path)
    assert config.finetune.train.lr == 0.0001 and config.finetune.train.batch_size == 4


OVERRIDE_CASES = [
    ("eval.harmful={kind: demo_harmful_prompts, n: 3, n: 4}",
     r"override 'eval.harmful=.*': key 'n' is given twice in one mapping; keep one"),
    ("eval.harmful={kind: demo_harmful_prompts", r"override 'eval.harmful=.*': not valid YAML"),
    ("finetune.train.lora.target_modules=[q_proj", r"override .*: not valid YAML"),
    ("eval..n=3", r"override 'eval..n=3': 'eval..n' has an empty part"),
]


@pytest.mark.parametrize(("override", "message"), OVERRIDE_CASES,
                         ids=["duplicate", "unclosed-mapping", "unclosed-list", "empty-part"])
def test_a_bad_override_value_names_the_override(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "folder", "binary", "unreadable"])
def test_a_config_that_cannot_be_read_is_one_line(kind: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    expected = {"missing": "does not exist", "folder": "is a folder; give a YAML file",
                "binary": "cannot be read", "unreadable": "cannot be read"}[kind]
    if kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00seed: 1\n")
    elif kind == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_text("seed: 1\n")
        path.chmod(0)
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = one_error_line(capsys)
    assert str(path) in err and expected in err
    assert not out.exists()


# ------------------------------------------------------------ settings the model must allow

MODEL_CASES = [
    ("eval.max_new_tokens=5000", r"'eval.max_new_tokens' is 5000, more than model .* can "
     r"attend to \(its context is 1024 tokens, max_position_embeddings\); set it to at most "
     "1024"),
    ("eval.task_max_new_tokens=2000", "'eval.task_max_new_tokens' is 2000, more than model"),
    ("eval.generation_max_new_tokens=1025", "'eval.generation_max_new_tokens' is 1025"),
    ("alignment.train.max_length=4096", "'alignment.train.max_length' is 4096"),
    ("finetune.train.max_length=2048", "'finetune.train.max_length' is 2048"),
    ("finetune.train.lora.target_modules=[q_prj, v_proj]",
     r"'finetune.train.lora.target_modules' names 'q_prj' \(did you mean 'q_proj'\?\), which "
     r"model .* does not have; its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, "
     r"q_proj, up_proj, v_proj \(or use all-linear\)"),
    ("alignment.train.lora.target_modules=[query_key_value]",
     r"'alignment.train.lora.target_modules' names 'query_key_value'"),
    ("finetune.train.lora.target_modules=[self_attn.q_proj, mlp.gate_prj]",
     r"names 'mlp.gate_prj' \(did you mean 'gate_proj'\?\)"),
    ("alignment.train.lora={preset: reference, target_modules: [qproj, kproj]}",
     r"names 'qproj' \(did you mean 'q_proj'\?\), 'kproj' \(did you mean 'k_proj'\?\)"),
]


@pytest.mark.parametrize(("override", "message"), MODEL_CASES,
                         ids=[case[0] for case in MODEL_CASES])
def test_settings_the_model_cannot_take_fail_before_any_work(
        override: str, message: str, tiny_overrides, tmp_path, capsys, monkeypatch) -> None:
    import hftlab.context

    def no_data(*args, **kwargs):  # the check must come before any data set is read
        raise AssertionError("data were loaded before the model checks")

    monkeypatch.setattr(hftlab.context, "load_examples", no_data)
    out = tmp_path / "run"
    assert run_main([*tiny_overrides, override], out) == 2
    err = one_error_line(capsys)
    assert re.search(message, err), err
    assert not out.exists()


def test_lora_targets_of_a_disabled_alignment_are_not_checked(tiny_config, tmp_path) -> None:
    from hftlab.experiment import check_model_fits
    from hftlab.model import model_shape

    config = tiny_config
    config.alignment.enabled = False
    config.alignment.train.lora.target_modules = ["nothing_like_it"]
    check_model_fits(config, config.finetune.train, config.model.name)
    assert model_shape(config.model.name).context == 1024


def test_all_linear_targets_every_linear_layer(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from hftlab.config import TrainConfig
    from hftlab.model import attach_trainable, missing_lora_targets, model_shape

    assert missing_lora_targets(["all-linear"], model_shape(str(tiny_model_dir)).modules) == []
    train = TrainConfig()
    train.lora.target_modules = ["all-linear"]
    model = attach_trainable(AutoModelForCausalLM.from_pretrained(tiny_model_dir), train)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
               if ".lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted
