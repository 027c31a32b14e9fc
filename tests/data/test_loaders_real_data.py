"""Optional tests on the real files in ../shared/data (skipped when absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hftlab.data.loaders import load_examples
from hftlab.data.records import DataError
from hftlab.data.spec import DataSpec

SHARED = Path(__file__).parents[2].parent / "shared" / "data"


def require_shared() -> None:
    """Skip the calling test when the real data folder :data:`SHARED` is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real data not present at {SHARED}")


def test_skips_when_shared_data_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    absent = tmp_path / "no_shared_data"
    monkeypatch.setattr(f"{__name__}.SHARED", absent)
    with pytest.raises(pytest.skip.Exception, match="real data not present at .*no_shared_data"):
        require_shared()


class TestRealData:
    @pytest.fixture(autouse=True)
    def _need_shared(self) -> None:
        require_shared()

    @pytest.mark.parametrize(("kind", "path", "options", "rows"), [
        ("beavertails", "beavertails/30k_test_prompts.json", {}, 1733),
        ("beavertails", "beavertails/30k_test_prompts.json", {"harmful_only": False}, 3021),
        ("beavertails", "beavertails/30k_train_unsafe_first200.jsonl",
         {"require_response": True}, 200),
        ("refusal", "safety_tuned_llamas/safety_only_data_Instructions.json", {}, 2483),
        ("harmful_instructions", "safety_tuned_llamas/evaluation/I-MaliciousInstructions.json",
         {}, 100),
        ("harmful_instructions", "safety_tuned_llamas/evaluation/I-CoNa.json", {}, 178),
        ("harmful_instructions", "safety_tuned_llamas/evaluation/Q-Harm.json", {}, 100),
        ("harmful_instructions", "safety_tuned_llamas/evaluation/I-PhysicalSafetySafe.json",
         {"harmful": False}, 100),
        ("harmful_instructions", "refusal_direction/harmful_train.json", {}, 260),
        ("harmful_instructions", "refusal_direction/harmful_val.json", {}, 39),
        ("harmful_instructions", "refusal_direction/harmful_test.json", {}, 572),
        ("harmful_instructions", "refusal_direction/harmless_val.json", {"harmful": False}, 6264),
        ("advbench", "advbench/harmful_behaviors.csv", {}, 520),
        ("advbench", "advbench/transfer_expriment_behaviors.csv", {}, 388),
        ("sst2", "sst2/dev.tsv", {}, 872),
        ("sst2", "sst2/train.tsv", {}, 67349),
        ("ag_news", "ag_news/test.csv", {}, 7600),
        ("ag_news", "ag_news/train_first581.csv", {}, 581),
        ("gsm8k", "gsm8k/train.jsonl", {}, 7473),
        ("gsm8k", "gsm8k/test.jsonl", {}, 1319),
    ])
    def test_row_counts(self, kind: str, path: str, options: dict[str, Any], rows: int) -> None:
        ex = load_examples(DataSpec(kind=kind, path=path, options=options), data_root=SHARED)
        assert len(ex) == rows
        assert [e.row for e in ex[:1]] == [0] or kind == "beavertails"
        assert all(e.prompt.strip() for e in ex)

    def test_details(self) -> None:
        bt = load_examples(DataSpec(kind="beavertails", path="beavertails/30k_test_prompts.json",
                                    options={"harmful_only": False}), data_root=SHARED)
        assert all(e.is_harmful == bool(e.meta["category"]) for e in bt)
        dev = load_examples(DataSpec(kind="sst2", path="sst2/dev.tsv"), data_root=SHARED)
        assert sum(e.label == "positive" for e in dev) == 444
        assert not any(e.prompt.endswith(" ") for e in dev)
        ag = load_examples(DataSpec(kind="ag_news", path="ag_news/train_first581.csv"),
                           data_root=SHARED)
        assert "dwindling\\band" in ag[0].prompt
        assert ag[0].label == "Business"
        gsm = load_examples(DataSpec(kind="gsm8k", path="gsm8k/test.jsonl"), data_root=SHARED)
        assert not any("<<" in e.response or "####" in e.response for e in gsm)
        assert all(e.label and "," not in e.label for e in gsm)
        refusals = load_examples(DataSpec(
            kind="refusal", path="safety_tuned_llamas/safety_only_data_Instructions.json",
            options={"refusals_only": True}), data_root=SHARED)
        assert 0 < len(refusals) < 2483
        with pytest.raises(DataError, match="only a 'target' column"):
            load_examples(DataSpec(kind="advbench", path="advbench/harmful_strings.csv"),
                          data_root=SHARED)
