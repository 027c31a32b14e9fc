"""Several defenses in one run: hooks compose in order, clashing training steps are rejected,
and the alignment cache key is the alignment member's own."""

from __future__ import annotations

import pytest

from hftlab.config import ConfigError, load_config
from hftlab.data.records import Example
from hftlab.defenses import ALIGNMENT, DEFENSES, FINETUNE, Defense
from hftlab.defenses.composite import CompositeDefense, build_defense
from hftlab.experiment import build_experiment


class AddRow(Defense):
    """A data-only fine-tuning-stage defense (not registered)."""

    name = "add_row"
    stages = (FINETUNE,)

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def prepare_data(self, stage, examples, ctx):
        return [*examples, Example(self.text, "ok")] if stage == FINETUNE else examples

    def inference_system_prompt(self, system_prompt):
        return f"{self.text} {system_prompt or ''}".strip()


def test_single_names_build_the_plain_defense() -> None:
    assert type(build_defense("vaccine", {"rho": 1.0})).__name__ == "Vaccine"
    assert build_defense(["booster"], {"lamb": 2.0}).options.lamb == 2.0


def test_clashing_training_steps_are_rejected() -> None:
    with pytest.raises(ConfigError, match="alignment"):
        build_defense(["vaccine", "booster"], {})
    with pytest.raises(ConfigError, match="twice"):
        CompositeDefense([DEFENSES.get("vaccine")(), DEFENSES.get("vaccine")()])
    with pytest.raises(ConfigError, match="sft"):
        build_defense(["sft", "vaccine"], {})
    with pytest.raises(ConfigError, match="keyed by defense name"):
        build_defense(["vaccine", "booster"], {"rho": 1.0})


def test_hooks_compose_in_order() -> None:
    booster = DEFENSES.get("booster")(lamb=3.0)
    combo = CompositeDefense([booster, AddRow("first"), AddRow2()])
    assert combo.name == "booster+add_row+add_row2"
    assert combo.stages == (ALIGNMENT, FINETUNE)
    assert combo.needs_provider_harmful
    rows = combo.prepare_data(FINETUNE, [Example("user", "x")], ctx=None)
    assert [r.prompt for r in rows] == ["user", "first", "second"]
    assert combo.inference_system_prompt("sys") == "second first sys"
    assert combo.owner(ALIGNMENT) is booster and combo.owner(FINETUNE) is None
    # a combo reuses the aligned checkpoint of its alignment member alone
    assert combo.cache_key(ALIGNMENT) == booster.cache_key(ALIGNMENT)
    assert combo.options_dict()["booster"]["lamb"] == 3.0


class AddRow2(AddRow):
    name = "add_row2"

    def __init__(self) -> None:
        super().__init__("second")


def test_config_accepts_a_list_and_checks_every_name() -> None:
    config = load_config(None, ["defense=[booster, vaccine]"])
    assert config.defense_names == ["booster", "vaccine"]
    assert config.defense_label == "booster+vaccine"
    with pytest.raises(ConfigError, match="boster"):  # names: checked by the experiment builder
        build_experiment(load_config(None, ["defense=[boster]"]))
    with pytest.raises(ConfigError, match="empty"):
        load_config(None, ["defense=[]"])


def test_an_alignment_and_a_finetuning_defense_run_together(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_pipeline
    from hftlab.utils import read_json

    harmful = "provider_harmful={kind: demo_harmful_qa, n: 16}"
    steps = ["alignment.train.max_steps=2", "finetune.train.max_steps=4"]
    combo = load_config(None, [*tiny_overrides, harmful, *steps, "defense=[booster, lisa]",
                               "defense_args={lisa: {alignment_step: 1, finetune_step: 1}}"])
    metrics = run_pipeline(combo, tmp_path / "combo")
    assert metrics["defense"] == "booster+lisa"
    align = read_json(tmp_path / "combo" / "align" / "stage.json")
    finetune = read_json(tmp_path / "combo" / "finetune" / "stage.json")
    assert set(align["defense_report"]) == {"booster"}
    assert finetune["defense_report"]["lisa"]["alignment_steps"] == 2
    alone = load_config(None, [*tiny_overrides, harmful, *steps, "defense=booster"])
    run_pipeline(alone, tmp_path / "alone")
    again = read_json(tmp_path / "alone" / "align" / "stage.json")
    assert again["cached"] and again["key"] == align["key"]  # the combo's checkpoint is reused


@pytest.mark.parametrize(("names", "args", "message"), [
    (["booster", "kl"], {}, "fine-tunes the alignment LoRA itself"),
    (["panacea", "safelora"], {}, "fine-tunes the alignment LoRA itself"),
    (["tar", "antidote"], {"antidote": {"finetune_lora": None}}, "aligns on top of the SFT"),
])
def test_hooks_that_change_the_aligned_model_do_not_compose(names, args, message) -> None:
    from hftlab.defenses.composite import build_defense

    with pytest.raises(ConfigError, match=message):
        build_defense(names, args)


def test_continuing_member_composes_once_it_uses_a_fresh_adapter() -> None:
    from hftlab.defenses.composite import build_defense

    defense = build_defense(["booster", "kl"], {"booster": {"single_lora": False}})
    assert not defense.continues_alignment_adapter()
