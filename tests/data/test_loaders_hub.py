"""Tests for hub: sources of every hub-capable kind (download replaced by a fake `datasets`)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from loader_helpers import BT_CATS, load, write_jsonl

from hftlab.data.loaders import load_examples
from hftlab.data.records import DataError
from hftlab.data.spec import DataSpec


class FakeDatasets(types.ModuleType):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__("datasets")
        self.rows = rows
        self.calls: list[tuple[str, str | None, str]] = []

    def load_dataset(self, path: str, name: str | None = None, split: str = "") -> list[dict]:
        self.calls.append((path, name, split))
        return self.rows


def fake_hub(monkeypatch: pytest.MonkeyPatch, rows: list[dict[str, Any]]) -> FakeDatasets:
    fake = FakeDatasets(rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    return fake


class TestHub:
    def test_beavertails_hub_rows(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = fake_hub(monkeypatch, [
            {"prompt": "p1", "response": "r1", "category": BT_CATS, "is_safe": False},
            {"prompt": "p2", "response": "r2", "category": dict.fromkeys(BT_CATS, False),
             "is_safe": True},
        ])
        ex = load_examples(DataSpec(kind="beavertails", hub="PKU-Alignment/BeaverTails"))
        assert fake.calls == [("PKU-Alignment/BeaverTails", None, "30k_train")]
        assert [(e.prompt, e.response, e.is_harmful, e.row) for e in ex] == [
            ("p1", "r1", True, 0)]
        assert ex[0].source == "hub:PKU-Alignment/BeaverTails[30k_train]"
        assert ex[0].meta["category"] == ["drug_abuse,weapons,banned_substance",
                                          "violence,aiding_and_abetting,incitement"]

    def test_gsm8k_default_config(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = fake_hub(monkeypatch, [{"question": "q", "answer": "<<1+1=2>>2\n#### 2"}])
        ex = load_examples(DataSpec(kind="gsm8k", hub="gsm8k", split="test"))
        assert fake.calls == [("gsm8k", "main", "test")]
        assert ex[0].response == "2\nThe final answer is: 2"
        assert ex[0].source == "hub:gsm8k(main)[test]"
        load_examples(DataSpec(kind="gsm8k", hub="gsm8k", options={"config": "socratic"}))
        assert fake.calls[-1] == ("gsm8k", "socratic", "train")

    def test_sst2_and_ag_news_hub_rows(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = fake_hub(monkeypatch, [{"sentence": "nice ", "label": 1, "idx": 0}])
        ex = load_examples(DataSpec(kind="sst2", hub="glue", options={"config": "sst2"}))
        assert fake.calls == [("glue", "sst2", "train")]
        assert (ex[0].prompt, ex[0].label) == ("nice", "positive")
        fake = fake_hub(monkeypatch, [{"text": "a b", "label": 0}, {"text": "c", "label": 9}])
        with pytest.raises(DataError, match=r"hub:ag_news\[test\], index 1: field 'label'"):
            load_examples(DataSpec(kind="ag_news", hub="ag_news", split="test"))

    def test_refusal_hub_rows(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake_hub(monkeypatch, [{"prompt": "p", "response": "I cannot do that."}])
        ex = load_examples(DataSpec(kind="refusal", hub="some/refusals"))
        assert ex[0].source == "hub:some/refusals[train]"
        assert ex[0].response.startswith("I")

    def test_datasets_missing(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "datasets", None)
        with pytest.raises(DataError, match="pip install datasets"):
            load_examples(DataSpec(kind="gsm8k", hub="gsm8k"))

    def test_download_failure_wrapped(self, monkeypatch: pytest.MonkeyPatch) -> None:
        fake = fake_hub(monkeypatch, [])

        def boom(path: str, name: str | None = None, split: str = "") -> list[dict]:
            raise ConnectionError("offline")

        monkeypatch.setattr(fake, "load_dataset", boom)
        with pytest.raises(DataError, match=r"cannot load hub:gsm8k.*ConnectionError: offline"):
            load_examples(DataSpec(kind="gsm8k", hub="gsm8k"))

    def test_config_needs_hub_and_split_needs_hub(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}])
        with pytest.raises(DataError, match=r"option 'config' .* only applies with hub"):
            load("gsm8k", path, options={"config": "main"})
        with pytest.raises(DataError, match=r"split \('test'\) only applies to hub"):
            load("gsm8k", path, split="test")
