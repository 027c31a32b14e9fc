"""Tests for hftlab.data.loaders.tasks: sst2, ag_news, gsm8k on tiny local files."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
from loader_helpers import load, write_jsonl

from hftlab.data.records import DataError

# ---------------------------------------------------------------------------------------------
# sst2
# ---------------------------------------------------------------------------------------------


class TestSST2:
    def test_glue_tsv(self, tmp_path: Path) -> None:
        path = tmp_path / "dev.tsv"
        path.write_text('sentence\tlabel\nit \'s a "charming" journey . \t1\n'
                        "unflinchingly bleak and desperate \t0\n", encoding="utf-8")
        ex = load("sst2", path)
        assert [e.prompt for e in ex] == ['it \'s a "charming" journey .',
                                          "unflinchingly bleak and desperate"]
        assert [(e.response, e.label) for e in ex] == [("positive", "positive"),
                                                       ("negative", "negative")]
        assert [e.row for e in ex] == [0, 1]

    def test_jsonl_labels(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "s.jsonl", [{"sentence": "good", "label": 1},
                                                  {"sentence": "bad", "label": "negative"}])
        assert [e.label for e in load("sst2", path)] == ["positive", "negative"]

    def test_bad_label_names_row(self, tmp_path: Path) -> None:
        path = tmp_path / "train.tsv"
        path.write_text("sentence\tlabel\ngood \t1\nbad \t-1\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"train\.tsv, row 2 \(line 3\): field 'label'"):
            load("sst2", path)

    def test_wrong_field_count(self, tmp_path: Path) -> None:
        path = tmp_path / "train.tsv"
        path.write_text("sentence\tlabel\ngood\t1\nbad\tstuff\t0\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"train\.tsv, row 2 \(line 3\): expected 2 fields"):
            load("sst2", path)

    def test_missing_column(self, tmp_path: Path) -> None:
        path = tmp_path / "s.csv"
        path.write_text("text,label\ngood,1\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"s\.csv, row 1 \(line 2\): missing field 'sentence' "
                           r"\(expected fields: sentence, label"):
            load("sst2", path)

    def test_parquet(self, tmp_path: Path) -> None:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        path = tmp_path / "train.parquet"
        pq.write_table(pa.table({"sentence": ["fine film ", "dull "], "label": [1, 0],
                                 "idx": [0, 1]}), path)
        ex = load("sst2", path)
        assert [(e.prompt, e.label, e.row) for e in ex] == [("fine film", "positive", 0),
                                                           ("dull", "negative", 1)]

    def test_parquet_without_pyarrow(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        path = tmp_path / "train.parquet"
        path.write_bytes(b"PAR1")
        monkeypatch.setitem(sys.modules, "pyarrow", None)
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
        with pytest.raises(DataError, match="needs pyarrow: pip install pyarrow"):
            load("sst2", path)


# ---------------------------------------------------------------------------------------------
# ag_news
# ---------------------------------------------------------------------------------------------


class TestAGNews:
    def test_release_csv(self, tmp_path: Path) -> None:
        path = tmp_path / "train.csv"
        path.write_text(
            '"3","Wall St. Bears Claw Back","Reuters - Short-sellers, Wall Street\'s '
            'dwindling\\band of ultra-cynics, are seeing ""green"" again."\n'
            '"2","Title","Body"\n', encoding="utf-8")
        ex = load("ag_news", path)
        assert ex[0].prompt == ("Wall St. Bears Claw Back Reuters - Short-sellers, Wall Street's "
                                'dwindling\\band of ultra-cynics, are seeing "green" again.')
        assert [(e.response, e.label, e.row) for e in ex] == [("Business", "Business", 0),
                                                             ("Sports", "Sports", 1)]

    def test_bad_class_index(self, tmp_path: Path) -> None:
        path = tmp_path / "test.csv"
        path.write_text('"1","a","b"\n"5","c","d"\n', encoding="utf-8")
        with pytest.raises(DataError,
                           match=r"test\.csv, row 2 \(line 2\): class index must be 1-4"):
            load("ag_news", path)
        path = tmp_path / "short.csv"
        path.write_text('"1","only title"\n', encoding="utf-8")
        with pytest.raises(DataError, match=r"short\.csv, row 1 \(line 1\): expected 3 fields"):
            load("ag_news", path)

    def test_hub_shaped_jsonl(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "ag.jsonl", [{"text": "t", "label": 3},
                                                   {"text": "u", "label": "World"}])
        assert [e.label for e in load("ag_news", path)] == ["Sci/Tech", "World"]
        path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "t", "label": 4}])
        with pytest.raises(DataError, match=r"bad\.jsonl, line 1: field 'label' must be 0-3"):
            load("ag_news", path)


# ---------------------------------------------------------------------------------------------
# gsm8k
# ---------------------------------------------------------------------------------------------


class TestGSM8K:
    def test_answer_rewrite(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "train.jsonl", [
            {"question": "How many clips?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n48+24 = <<48+24=72>>72\n#### 72"},
            {"question": "How much money?", "answer": "500*2 = <<500*2=1000>>1000\n#### 1,000"},
        ])
        ex = load("gsm8k", path)
        assert ex[0].response == ("Natalia sold 48/2 = 24 clips.\n48+24 = 72\n"
                                  "The final answer is: 72")
        assert ex[0].label == "72"
        assert ex[1].response == "500*2 = 1000\nThe final answer is: 1,000"
        assert ex[1].label == "1000"
        assert ex[1].prompt == "How much money?"
        assert ex[1].row == 1

    def test_missing_final_answer(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "train.jsonl", [
            {"question": "q1", "answer": "a\n#### 1"},
            {"question": "q2", "answer": "no final line"},
        ])
        with pytest.raises(DataError, match=r"train\.jsonl, line 2: field 'answer' has no final "
                           r"'#### <number>'"):
            load("gsm8k", path)

    def test_malformed_jsonl(self, tmp_path: Path) -> None:
        path = tmp_path / "train.jsonl"
        path.write_text('{"question": "q", "answer": "#### 1"}\n\n{"question": "q2",\n',
                        encoding="utf-8")
        with pytest.raises(DataError, match=r"train\.jsonl, line 3: malformed JSON"):
            load("gsm8k", path)

    def test_json_gz(self, tmp_path: Path) -> None:
        path = tmp_path / "train.json.gz"
        path.write_bytes(gzip.compress(json.dumps([{"question": "q", "answer": "x\n#### 7"}])
                                       .encode()))
        assert load("gsm8k", path)[0].label == "7"
