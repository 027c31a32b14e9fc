"""docs/defenses.md and the settings tables: computed from the code, checked against the file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from hftlab.config import TrainConfig
from hftlab.defense_settings import (
    ABSENT,
    DOCS_PATH,
    ROOT,
    check_key,
    docs_drift,
    format_value,
    markdown_table,
    reference_config,
    render_docs,
    setting_rows,
    text_lines,
)
from hftlab.defenses import DEFENSES, Defense
from hftlab.defenses.base import ReferenceSetting
from hftlab.defenses.booster import Booster
from hftlab.defenses.lisa import CPU_PRESET, Lisa


class Toy(Defense):
    """A defense outside the registry: its table is built without protocol files."""

    name = "toy"
    reference_settings = (
        ReferenceSetting("defense_args.strength", 0.5, "toy/run.sh", "calibrated"),
        ReferenceSetting("defense_args.steps", 3, "toy/run.sh"),
        ReferenceSetting("finetune.train.lr", 1e-5, "toy/run.sh"),
    )

    @dataclass
    class Options:
        strength: float = 0.25
        steps: int = 3


def test_docs_file_is_up_to_date() -> None:
    problem = docs_drift(ROOT / DOCS_PATH)
    assert problem is None, f"{problem} (regenerate: .venv/bin/hftlab docs)"


def test_drift_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "defenses.md"
    assert "does not exist" in docs_drift(path)
    text = render_docs()
    path.write_text(text)
    assert docs_drift(path) is None
    path.write_text(text.replace("| `defense_args.lamb` | 5 |", "| `defense_args.lamb` | 6 |"))
    assert "out of date" in docs_drift(path)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_declared_key_resolves(name: str) -> None:
    cls = DEFENSES.get(name)
    rows = setting_rows(cls)
    assert [r.key for r in rows] == [s.key for s in cls.reference_settings]
    for row in rows:
        # the repository has both protocol files, so every value is computed
        assert ABSENT not in (row.default, row.cpu), row.key


@pytest.mark.parametrize("name", DEFENSES.names())
def test_option_default_column_is_the_options_default(name: str) -> None:
    cls = DEFENSES.get(name)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls.Options)} if cls.Options else {}
    for row in setting_rows(cls):
        if row.key.startswith("defense_args."):
            assert row.default == format_value(defaults[row.key.split(".", 1)[1]]), row.key


def test_unknown_keys_are_errors() -> None:
    check_key(Booster, "defense_args.lamb")
    check_key(Booster, "provider_harmful.n")  # through DataSpec | None
    check_key(Booster, "alignment.train.lora.target_modules")
    for key in ("defense_args.lambda", "finetune.train.learning_rate", "alignment.data.rows",
                "nonsense"):
        with pytest.raises(KeyError, match="reference setting"):
            check_key(Booster, key)


def test_a_defense_without_protocol_files(tmp_path: Path) -> None:
    rows = {r.key: r for r in setting_rows(Toy, root=tmp_path)}
    # options come from Options, computed (0.25 is declared nowhere but in Options)
    assert rows["defense_args.strength"].default == "0.25"
    assert rows["defense_args.steps"].default == "3"
    # config paths need the protocol files
    assert rows["finetune.train.lr"].default == ABSENT
    assert rows["defense_args.strength"].cpu == ABSENT


def test_rows_that_differ_from_the_reference_are_marked(tmp_path: Path) -> None:
    rows = {r.key: r for r in setting_rows(Toy, root=tmp_path)}
    assert rows["defense_args.strength"].default_differs
    assert not rows["defense_args.steps"].default_differs
    assert not rows["finetune.train.lr"].default_differs  # absent: nothing to compare
    table = markdown_table(list(rows.values()))
    assert "| `defense_args.strength` | 0.5 | toy/run.sh | **0.25** | — | calibrated |" in table
    assert "| `defense_args.steps` | 3 | toy/run.sh | 3 | — |  |" in table
    assert "defense_args.strength: 0.5 / ≠0.25 / —" in text_lines(list(rows.values()))


def test_the_cpu_preset_is_the_sweep_cell() -> None:
    rows = {r.key: r for r in setting_rows(Lisa)}
    # configs/sweeps/cpu_defenses.yaml runs lisa with lisa.CPU_PRESET as defense_args
    assert rows["defense_args.alignment_step"].cpu == str(CPU_PRESET["alignment_step"])
    assert rows["defense_args.alignment_step"].cpu_differs
    assert rows["defense_args.alignment_step"].default == "100"


def test_finetune_settings_go_through_the_defense_hook(monkeypatch) -> None:
    def finetune_train(self: Defense, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, lr=0.125)

    monkeypatch.setattr(Booster, "finetune_train", finetune_train)
    rows = {r.key: r for r in setting_rows(Booster)}
    assert rows["finetune.train.lr"].default == rows["finetune.train.lr"].cpu == "0.125"
    # other stages: the config's own values
    assert rows["alignment.train.lr"].default == format_value(
        reference_config("booster").alignment.train.lr)


def test_values_are_shown_compactly() -> None:
    from hftlab.data.spec import DataSpec

    assert format_value(5e-4) == "5e-4" and format_value(1e9) == "1e9"
    assert format_value(["q_proj", "v_proj"]) == "q_proj, v_proj"
    assert format_value(None) == "null" and format_value(False) == "false"
    spec = DataSpec(kind="refusal", path="runs/data/refusals.jsonl", n=100)
    assert format_value(spec) == "refusal runs/data/refusals.jsonl n=100"
    mix = DataSpec(kind="mix", options={"sources": [
        {"kind": "refusal", "path": "a.jsonl"}, {"kind": "refusal", "path": "b.json", "n": 5}]})
    assert format_value(mix) == "mix(refusal a.jsonl; refusal b.json n=5)"
    # which rows a kind keeps is part of the data: options are shown
    mix.options["sources"][1]["options"] = {"with_input": True, "exclude": ["as an AI"]}
    assert format_value(mix) == (
        "mix(refusal a.jsonl; refusal b.json n=5 with_input=true exclude=as an AI)")
