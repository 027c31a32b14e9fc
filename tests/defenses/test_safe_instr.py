"""SafeInstr: exactly round(ratio · n_user) refusal rows (or n) are added on top of the user's
rows, drawn from the right refusal set by the run's seed; the user's rows are untouched and keep
their order; overlaps with held-out sets and bad options fail."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest

from hftlab.config import Config, ConfigError, load_config
from hftlab.data.loaders import load_examples
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec
from hftlab.defenses import DEFENSES, FINETUNE


def safe_instr(**options):
    return DEFENSES.get("safe_instr")(**options)


@dataclass
class Ctx:
    """The part of the run context prepare_data reads: the config and the loader."""

    config: Config

    def load(self, spec: DataSpec) -> list[Example]:
        return load_examples(spec, None)


def ctx(*overrides: str) -> Ctx:
    return Ctx(load_config(None, list(overrides)))


def user_rows(n: int = 100, n_harmful: int = 10) -> list[Example]:
    # placeholders: the flag is what matters here, not the text
    return [Example(f"user prompt {i}", f"answer {i}", is_harmful=i < n_harmful,
                    source="user", row=i) for i in range(n)]


def key(e: Example) -> tuple:
    return (e.prompt, e.response, e.source, e.row)


def test_adds_the_expected_refusal_rows_from_the_alignment_data() -> None:
    c = ctx("seed=3")
    user = user_rows()
    before = copy.deepcopy(user)
    defense = safe_instr()
    out = defense.prepare_data(FINETUNE, user, c)
    assert out[:100] == before and user == before  # the user's rows: unchanged, in order
    added = out[100:]
    assert len(added) == 3  # round(0.03 · 100)
    pool = {key(e): e for e in load_examples(c.config.alignment.data)}  # demo_refusal rows 0-89
    for row in added:
        assert key(row) in pool and not row.is_harmful and row.meta["added_by"] == "safe_instr"
        assert row.response == pool[key(row)].response
    assert len({key(e) for e in added}) == 3  # without replacement
    report = defense.report("data")
    assert report["safety_rows_added"] == 3 and report["source"] == "alignment.data"
    assert report["rows"] == sorted(e.row for e in added) and report["user_rows"] == 100
    assert defense.report("finetune") == {}
    # the sample is fixed by the seed, and another seed draws another one
    again = safe_instr().prepare_data(FINETUNE, user_rows(), ctx("seed=3"))
    assert [key(e) for e in again] == [key(e) for e in out]
    others = [[key(e) for e in safe_instr().prepare_data(FINETUNE, user_rows(), ctx(f"seed={s}"))]
              for s in (4, 5)]
    assert any(o[100:] != [key(e) for e in added] for o in others)


def test_only_the_refusals_of_a_mixed_alignment_set_are_added() -> None:
    # configs/cpu_sst2_ref.yaml's alignment data answers benign prompts helpfully beside its
    # refusals; the paper adds (harmful instruction → refusal) pairs only
    mixed = ctx("alignment.data={kind: mix, options: {sources: [{kind: demo_refusal, n: 6}, "
                "{kind: demo_sentiment, n: 60}]}}")
    defense = safe_instr(n=6)
    added = defense.prepare_data(FINETUNE, user_rows(), mixed)[100:]
    assert sorted(e.row for e in added) == list(range(6))
    assert all(e.source.endswith("harmful.jsonl") for e in added)  # none of sentiment.jsonl
    report = defense.report("data")
    assert report["source_rows"] == 66 and report["refusal_rows"] == 6
    with pytest.raises(ConfigError, match="has 6 whose answer refuses"):
        safe_instr(n=7).prepare_data(FINETUNE, user_rows(), mixed)


@pytest.mark.parametrize(("options", "n_user", "want"), [
    ({"ratio": 0.1}, 100, 10),
    ({"n": 7}, 100, 7),
    ({}, 20, 1),  # 0.6 rounds up
    ({}, 10, 1),  # 0.3 would round to nothing: at least one row
    ({"ratio": 0.05}, 50, 3),  # 2.5: halves round up
])
def test_count_of_added_rows(options, n_user, want) -> None:
    out = safe_instr(**options).prepare_data(FINETUNE, user_rows(n_user, 2), ctx())
    assert len(out) == n_user + want
    assert sum("added_by" in e.meta for e in out) == want


def test_separate_refusal_set_and_other_stages() -> None:
    spec = {"kind": "demo_refusal", "offset": 100, "n": 20}
    defense = safe_instr(source="data", data=spec, n=5)
    out = defense.prepare_data(FINETUNE, user_rows(), ctx())
    assert all(100 <= e.row < 120 for e in out[100:]) and len(out) == 105
    assert defense.report("data")["source"] == "defense_args.data"
    rows = user_rows()
    assert defense.prepare_data("alignment", rows, ctx()) is rows  # only the user's data


def test_overlaps_and_shortage_fail() -> None:
    # mechanisms.alignment_data is demo_refusal rows 180-209: rows 170-189 overlap it
    overlap = safe_instr(source="data", data={"kind": "demo_refusal", "offset": 170, "n": 20})
    with pytest.raises(DataError, match="mechanisms.alignment_data"):
        overlap.prepare_data(FINETUNE, user_rows(), ctx())
    refusals = load_examples(DataSpec("demo_refusal", n=2))
    user = user_rows() + [Example(refusals[1].prompt, "x", is_harmful=True, row=100)]
    with pytest.raises(DataError, match="user"):
        safe_instr().prepare_data(FINETUNE, user, ctx())
    short = safe_instr(source="data", data={"kind": "demo_refusal", "offset": 100, "n": 20}, n=21)
    with pytest.raises(ConfigError, match="21 safety rows"):
        short.prepare_data(FINETUNE, user_rows(), ctx())


def test_defaults_and_validation() -> None:
    o = safe_instr().options
    # arXiv 2309.07875 abstract ("adding just 3% safety examples"); vinid/safety-tuned-llamas
    # data/training/README.md: saferpaca_Instructions_X = 20k Alpaca + X safety rows (on top)
    assert (o.ratio, o.n, o.source, o.data) == (0.03, None, "alignment", None)
    assert DEFENSES.get("safe_instr").stages == ("finetune",)
    for bad in ({"ratio": 0.0}, {"ratio": -0.1}, {"ratio": 1.5}, {"n": 0},
                {"source": "provider"}, {"source": "data"},
                {"data": {"kind": "demo_refusal", "n": 5}}, {"fraction": 0.1}):
        with pytest.raises(ConfigError):
            safe_instr(**bad)


def test_safe_instr_pipeline_runs(tiny_overrides, tmp_path) -> None:
    from hftlab.pipeline import run_pipeline

    config = load_config(None, [*tiny_overrides, "defense=safe_instr"])
    metrics = run_pipeline(config, tmp_path / "run")
    assert all(math.isfinite(c[k]) for c in metrics["curves"]
               for k in ("task_loss", "alignment_loss", "harmful_loss"))
    data = json.loads((tmp_path / "run" / "data" / "stage.json").read_text())
    assert data["defense_report"]["safety_rows_added"] == 1  # 20 user rows · 0.03 → 1
    assert data["counts"]["user"] == 21
    rows = [json.loads(line) for line in
            (tmp_path / "run" / "data" / "user_data.jsonl").read_text().splitlines()]
    assert [r["meta"].get("added_by") for r in rows].count("safe_instr") == 1
    info = json.loads((tmp_path / "run" / "finetune" / "stage.json").read_text())
    assert math.isfinite(info["final_loss"])
