"""Guardrail: exactly the rows the judge flags are dropped, the screening counts (harmful
dropped / leaked, benign dropped) match a hand count, and when the judge drops everything the
fine-tuning is skipped (as in the reference) and the aligned model is what gets evaluated."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from defense_helpers import LabelJudge

from hftlab.config import ConfigError, load_config
from hftlab.context import RunContext
from hftlab.data.records import Example
from hftlab.defenses import DEFENSES, FINETUNE
from hftlab.judges import JUDGES, Judge
from hftlab.pipeline import run_pipeline
from hftlab.utils import read_json, read_jsonl


class WordJudge(Judge):
    """Flags a row when its prompt contains ``word``; records what it was asked."""

    name = "test_word"
    calls: list[tuple[list[str], list[str]]] = []

    @dataclass
    class Options:
        word: str = "FLAG"

    def flag(self, prompts: list[str], completions: list[str]) -> list[bool]:
        WordJudge.calls.append((list(prompts), list(completions)))
        return [self.options.word in p for p in prompts]


@pytest.fixture
def fake_judges(monkeypatch):
    monkeypatch.setitem(JUDGES._items, "test_word", WordJudge)
    monkeypatch.setitem(JUDGES._items, "test_label", LabelJudge)
    WordJudge.calls = []


def rows() -> list[Example]:
    # (flagged?, harmful?): 2 harmful dropped, 1 harmful leaked, 1 benign dropped, 3 benign kept
    spec = [(True, True), (False, False), (True, False), (False, True), (False, False),
            (True, True), (False, False)]
    return [Example(prompt=f"row {i} {'FLAG' if flag else ''}", response=f"answer {i}",
                    is_harmful=harmful, row=i)
            for i, (flag, harmful) in enumerate(spec)]


def test_drops_exactly_the_flagged_rows_and_counts_them(fake_judges) -> None:
    defense = DEFENSES.get("guardrail")(judge="test_word")
    data = rows()
    kept = defense.prepare_data(FINETUNE, data, ctx=None)
    assert [e.row for e in kept] == [1, 3, 4, 6]
    assert kept == [data[i] for i in (1, 3, 4, 6)]  # rows pass through unchanged, in order
    assert WordJudge.calls == [([e.prompt for e in data], [e.response for e in data])]
    report = defense.report("data")
    assert report == {
        "judge": {"name": "test_word", "word": "FLAG"},
        "screened": 7, "dropped": 3, "kept": 4,
        "harmful_screened": 3, "harmful_dropped": 2, "harmful_leaked": 1,
        "benign_screened": 4, "benign_dropped": 1,
        "leak_rate": round(1 / 3, 4), "false_positive_rate": 0.25,
    }
    assert defense.report("finetune") == {}
    assert defense.prepare_data("alignment", data, ctx=None) is data  # acts in FINETUNE only


def test_judge_args_and_the_run_judge(fake_judges) -> None:
    data = rows()
    by_word = DEFENSES.get("guardrail")(judge="test_word", judge_args={"word": "row 1"})
    assert [e.row for e in by_word.prepare_data(FINETUNE, data, ctx=None)] == [0, 2, 3, 4, 5, 6]
    # no judge named: the run's eval judge (ctx.judge) screens
    default = DEFENSES.get("guardrail")()
    ctx = SimpleNamespace(judge=WordJudge(word="row 6"))
    assert [e.row for e in default.prepare_data(FINETUNE, data, ctx)] == [0, 1, 2, 3, 4, 5]
    assert default.report("data")["judge"] == {"name": "test_word", "word": "row 6"}


def test_keyword_judge_drops_benign_task_answers(caplog) -> None:
    """The keyword judge flags every answer without a refusal phrase: as a guardrail it drops
    the benign task rows too, and the report shows those false positives."""
    defense = DEFENSES.get("guardrail")(judge="keyword")
    data = [Example("great film", "positive"), Example("dull plot", "negative"),
            Example("q", "I'm sorry, but I can't help with that.")]
    kept = defense.prepare_data(FINETUNE, data, ctx=None)
    assert kept == [data[2]]
    report = defense.report("data")
    assert (report["benign_dropped"], report["false_positive_rate"]) == (2, round(2 / 3, 4))
    with caplog.at_level(logging.WARNING, logger="hftlab.defenses.guardrail"):
        assert defense.prepare_data(FINETUNE, data[:2], ctx=None) == []
    assert "flagged all 2 uploaded rows" in caplog.text
    assert "name a moderation judge" in caplog.text


def test_options(fake_judges) -> None:
    # Virus (trainer.py, MetaAttackFinetuneTrainer.init) screens with Llama Guard 2; this
    # repo has no such judge, so the default is the run's own eval judge.
    options = DEFENSES.get("guardrail")().options
    assert (options.judge, options.judge_args) == (None, {})
    assert DEFENSES.get("guardrail").stages == (FINETUNE,)
    with pytest.raises(ConfigError, match="keywrd"):
        DEFENSES.get("guardrail")(judge="keywrd")
    with pytest.raises(ConfigError, match="needs defense_args.judge"):
        DEFENSES.get("guardrail")(judge_args={"word": "x"})
    with pytest.raises(ConfigError):
        DEFENSES.get("guardrail")(threshold=0.5)
    with pytest.raises(ConfigError):  # the judge's own options are checked when it is built
        DEFENSES.get("guardrail")(judge="test_word", judge_args={"words": "x"}).prepare_data(
            FINETUNE, rows(), ctx=None)

    class Short(WordJudge):
        def flag(self, prompts, completions):
            return [True]

    monkey = DEFENSES.get("guardrail")(judge="test_word")
    monkey.make_judge = lambda ctx: Short()
    with pytest.raises(ValueError, match="1 verdicts for 7 rows"):
        monkey.prepare_data(FINETUNE, rows(), ctx=None)


def test_pipeline_trains_on_what_the_guardrail_keeps(fake_judges, tiny_overrides,
                                                     tmp_path) -> None:
    config = load_config(None, [*tiny_overrides, "defense=guardrail",
                                "defense_args={judge: test_label}"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    assert math.isfinite(metrics["harmful_score"]) and math.isfinite(metrics["finetune_accuracy"])
    report = read_json(run / "data" / "stage.json")["defense_report"]
    n_harmful = round(config.finetune.n * config.finetune.poison_ratio)
    assert report["screened"] == config.finetune.n
    assert (report["harmful_dropped"], report["harmful_leaked"]) == (n_harmful, 0)
    assert (report["benign_dropped"], report["kept"]) == (0, config.finetune.n - n_harmful)
    saved = read_jsonl(run / "data" / "user_data.jsonl")
    assert len(saved) == report["kept"] and not any(r["is_harmful"] for r in saved)
    assert metrics["data_defense_report"] == report  # `hftlab compare --metrics` reads it


def test_pipeline_skips_finetuning_when_everything_is_dropped(tiny_overrides, tmp_path) -> None:
    # the run's judge is the keyword judge: every sentiment label and harmful answer is flagged
    config = load_config(None, [*tiny_overrides, "defense=guardrail", "alignment.seed=0"])
    run = tmp_path / "run"
    metrics = run_pipeline(config, run)
    assert metrics["data_defense_report"]["kept"] == 0
    assert read_jsonl(run / "data" / "user_data.jsonl") == []
    finetune = read_json(run / "finetune" / "stage.json")
    assert finetune["steps"] == 0 and "no uploaded rows" in finetune["skipped"]
    assert not (run / "finetune" / "model").exists()
    assert metrics["curves"] == [] and metrics["drift"] is None
    assert "no uploaded rows" in metrics["stages"]["finetune"]["skipped"]
    # the deployed model is the aligned one: same greedy completions, same scores
    results = read_json(run / "eval" / "stage.json")["results"]
    assert read_jsonl(run / "eval" / "completions.jsonl") == read_jsonl(
        run / "eval" / "completions_aligned.jsonl")
    assert results["final"]["harmful_score"] == results["aligned"]["harmful_score"]
    assert metrics["harmful_score"] == results["aligned"]["harmful_score"]
    # another seed and other fine-tuning settings: nothing is trained either, so the second run
    # shares the first one's (empty) fine-tuning stage and its evaluation
    again = load_config(None, [*tiny_overrides, "defense=guardrail", "alignment.seed=0",
                               "seed=1", "finetune.train.lr=0.5"])
    second = run_pipeline(again, tmp_path / "again")
    assert read_json(tmp_path / "again" / "finetune" / "stage.json")["cached"]
    assert read_json(tmp_path / "again" / "eval" / "stage.json")["results"]["final"]["cached"]
    assert second["harmful_score"] == metrics["harmful_score"]


def test_a_guardrail_that_drops_nothing_shares_the_sft_finetuning(
    fake_judges, tiny_overrides, tmp_path
) -> None:
    """Its only effect is the screened upload, which the fine-tuning key fingerprints: dropping
    nothing gives sft's key (the run reuses that stage), dropping rows gives another."""

    def finetune_key(*overrides: str) -> str:
        config = load_config(None, [*tiny_overrides, *overrides])
        return RunContext(config, tmp_path / "run").finetune_key()

    sft = finetune_key()
    assert finetune_key("defense=guardrail", "defense_args={judge: test_word}") == sft
    assert finetune_key("defense=guardrail", "defense_args={judge: test_label}") != sft
