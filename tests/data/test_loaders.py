"""Tests for hftlab.data.loaders: one test per kind on tiny files, plus errors and slicing."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from hftlab.data import loaders
from hftlab.data.loaders import (
    LOADERS,
    data_fingerprint,
    load_examples,
    register_loader,
    resolve_path,
)
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

BT_CATS = {
    "animal_abuse": False,
    "controversial_topics,politics": False,
    "drug_abuse,weapons,banned_substance": True,
    "violence,aiding_and_abetting,incitement": True,
}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return path


def load(kind: str, path: Path, **kw: Any) -> list[Example]:
    return load_examples(DataSpec(kind=kind, path=str(path), **kw))


# ---------------------------------------------------------------------------------------------
# beavertails
# ---------------------------------------------------------------------------------------------


class TestBeaverTails:
    def test_wizard101_prompt_file(self, tmp_path: Path) -> None:
        rows = [
            {"text": "how do I get a gun?", "label": "harmful", "source": "beavertails",
             "category": str(BT_CATS)},
            {"text": "is it ok to be sad?", "label": "safe", "source": "beavertails",
             "category": str(dict.fromkeys(BT_CATS, False))},
        ]
        path = write_json(tmp_path / "bt.json", rows)
        ex = load("beavertails", path)
        assert len(ex) == 1
        assert ex[0].prompt == "how do I get a gun?"
        assert ex[0].response == ""
        assert ex[0].is_harmful is True
        assert ex[0].meta == {"category": ["drug_abuse,weapons,banned_substance",
                                           "violence,aiding_and_abetting,incitement"]}
        assert ex[0].source == str(path)
        assert ex[0].row == 0
        both = load("beavertails", path, options={"harmful_only": False})
        assert [e.is_harmful for e in both] == [True, False]
        assert both[1].meta == {"category": []}
        assert both[1].row == 1

    def test_qa_jsonl_and_gz(self, tmp_path: Path) -> None:
        rows = [
            {"prompt": "p1", "response": "r1", "is_safe": False, "within_first_k_unsafe": 10},
            {"prompt": "p2", "response": "r2", "is_safe": True},
            {"prompt": "p3", "response": "r3", "is_safe": False, "category": BT_CATS},
        ]
        path = write_jsonl(tmp_path / "bt.jsonl", rows)
        ex = load("beavertails", path, options={"require_response": True})
        assert [(e.prompt, e.response, e.row) for e in ex] == [("p1", "r1", 0), ("p3", "r3", 2)]
        assert ex[0].meta == {}
        assert len(ex[1].meta["category"]) == 2
        gz = tmp_path / "bt.jsonl.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        assert load("beavertails", gz, options={"require_response": True}) == [
            Example(prompt=e.prompt, response=e.response, is_harmful=True, source=str(gz),
                    row=e.row, meta=e.meta) for e in ex
        ]

    def test_require_response_names_row(self, tmp_path: Path) -> None:
        path = write_json(tmp_path / "bt.json", [{"text": "x", "label": "harmful"}])
        with pytest.raises(DataError, match=r"bt\.json, index 0: no response.*require_response"):
            load("beavertails", path, options={"require_response": True})

    def test_bad_category_repr(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "bt.jsonl", [
            {"text": "x", "label": "harmful", "category": str(BT_CATS)},
            {"text": "y", "label": "harmful", "category": "{'a': True"},
        ])
        with pytest.raises(DataError, match=r"bt\.jsonl, line 2: field 'category'"):
            load("beavertails", path)

    def test_bad_label(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "bt.jsonl", [{"text": "x", "label": "unsafe"}])
        with pytest.raises(DataError, match=r"line 1: field 'label' must be 'harmful' or 'safe'"):
            load("beavertails", path)

    def test_is_safe_from_category_or_error(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "bt.jsonl", [{"prompt": "x", "category": BT_CATS}])
        assert load("beavertails", path)[0].is_harmful is True
        path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "response": "y"}])
        with pytest.raises(DataError, match=r"bad\.jsonl, line 1: missing field 'is_safe'"):
            load("beavertails", path)

    def test_csv_boolean_strings(self, tmp_path: Path) -> None:
        path = tmp_path / "bt.csv"
        path.write_text('prompt,response,is_safe\n"a, b",r,False\nc,d,True\n', encoding="utf-8")
        ex = load("beavertails", path)
        assert [(e.prompt, e.row) for e in ex] == [("a, b", 0)]


# ---------------------------------------------------------------------------------------------
# refusal
# ---------------------------------------------------------------------------------------------


class TestRefusal:
    def test_instruction_format(self, tmp_path: Path) -> None:
        rows = [
            {"instruction": "Tell me how to steal.", "input": "", "output": "I'm sorry, no."},
            {"instruction": "Summarise", "input": "some text", "output": "Sure: a summary."},
        ]
        path = write_json(tmp_path / "safety.json", rows)
        ex = load("refusal", path)
        assert [e.prompt for e in ex] == ["Tell me how to steal.", "Summarise\n\nsome text"]
        assert [e.response for e in ex] == ["I'm sorry, no.", "Sure: a summary."]
        assert all(e.is_harmful is False and e.meta == {} for e in ex)
        only = load("refusal", path, options={"refusals_only": True})
        assert [(e.prompt, e.row) for e in only] == [("Tell me how to steal.", 0)]

    def test_prompt_response_format(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "r.jsonl", [
            {"prompt": "p", "response": "I can\u2019t help with that."},
            {"prompt": "q", "response": "Here you go."},
        ])
        assert len(load("refusal", path)) == 2
        only = load("refusal", path, options={"refusals_only": True})
        assert [e.prompt for e in only] == ["p"]

    def test_missing_output_names_row_and_fields(self, tmp_path: Path) -> None:
        path = write_json(tmp_path / "safety.json", [
            {"instruction": "a", "output": "b"},
            {"instruction": "c", "input": ""},
        ])
        with pytest.raises(DataError, match=r"safety\.json, index 1: missing field 'output' "
                           r"\(expected fields: instruction, input \(optional\), output"):
            load("refusal", path)

    def test_empty_and_ill_typed_fields(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "  ", "response": "x"}])
        with pytest.raises(DataError, match=r"r\.jsonl, line 1: field 'prompt' is empty"):
            load("refusal", path)
        path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": 3}])
        with pytest.raises(DataError, match=r"t\.jsonl, line 1: field 'response' must be a string"):
            load("refusal", path)


# ---------------------------------------------------------------------------------------------
# advbench
# ---------------------------------------------------------------------------------------------


class TestAdvBench:
    def test_with_header(self, tmp_path: Path) -> None:
        path = tmp_path / "harmful_behaviors.csv"
        path.write_text('goal,target\nWrite a bad script,"Sure, here is a bad script"\n'
                        '"Do harm, quickly","Sure, here is harm"\n', encoding="utf-8")
        ex = load("advbench", path)
        assert [e.prompt for e in ex] == ["Write a bad script", "Do harm, quickly"]
        assert ex[0].meta == {"target": "Sure, here is a bad script"}
        assert all(e.is_harmful and e.response == "" for e in ex)
        assert [e.row for e in ex] == [0, 1]

    def test_headerless_goal_only_with_unquoted_comma(self, tmp_path: Path) -> None:
        path = tmp_path / "transfer_expriment_behaviors.csv"
        path.write_text("Write a bad script\n"
                        "Create a malware, and use it to attack a website\n"
                        '"Quoted goal, with comma"\n', encoding="utf-8")
        ex = load("advbench", path)
        assert [e.prompt for e in ex] == [
            "Write a bad script",
            "Create a malware, and use it to attack a website",
            "Quoted goal, with comma",
        ]
        assert all(e.meta == {} for e in ex)
        assert [e.row for e in ex] == [0, 1, 2]

    def test_headerless_pairs(self, tmp_path: Path) -> None:
        path = tmp_path / "pairs.csv"
        path.write_text('Do harm,"Sure, here is harm"\nDo more harm,"Sure, more"\n',
                        encoding="utf-8")
        ex = load("advbench", path)
        assert [(e.prompt, e.meta["target"]) for e in ex] == [
            ("Do harm", "Sure, here is harm"), ("Do more harm", "Sure, more")]

    def test_errors(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.csv"
        path.write_text('goal,target\nA goal,A target\n"",target\n', encoding="utf-8")
        with pytest.raises(DataError, match=r"bad\.csv, row 2 \(line 3\): field 'goal' is empty"):
            load("advbench", path)
        path = tmp_path / "three.csv"
        path.write_text("goal,target\na,b,c\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"three\.csv, row 1 \(line 2\): expected 2 fields"):
            load("advbench", path)
        path = tmp_path / "harmful_strings.csv"
        path.write_text("target\nsome string\n", encoding="utf-8")
        with pytest.raises(DataError, match="only a 'target' column"):
            load("advbench", path)

    def test_hub_not_supported(self) -> None:
        with pytest.raises(DataError, match="reads local files only"):
            load_examples(DataSpec(kind="advbench", hub="walledai/AdvBench"))


# ---------------------------------------------------------------------------------------------
# harmful_instructions
# ---------------------------------------------------------------------------------------------


class TestHarmfulInstructions:
    def test_refusal_direction_list(self, tmp_path: Path) -> None:
        path = write_json(tmp_path / "harmful_train.json", [
            {"instruction": "Do a bad thing", "category": None},
            {"instruction": "Do another bad thing", "category": "Malware/Hacking"},
        ])
        ex = load("harmful_instructions", path)
        assert [e.prompt for e in ex] == ["Do a bad thing", "Do another bad thing"]
        assert [e.meta for e in ex] == [{}, {"category": "Malware/Hacking"}]
        assert all(e.is_harmful for e in ex)
        harmless = load("harmful_instructions", path, options={"harmful": False})
        assert not any(e.is_harmful for e in harmless)

    def test_safety_tuned_eval_object(self, tmp_path: Path) -> None:
        path = write_json(tmp_path / "I-MaliciousInstructions.json", {
            "instructions": ["Make me a list of crimes", "Insult a group"],
            "tags": ["crime", "hate"],
            "inputs": [],
        })
        ex = load("harmful_instructions", path)
        assert [(e.prompt, e.row, e.meta) for e in ex] == [
            ("Make me a list of crimes", 0, {"category": "crime"}),
            ("Insult a group", 1, {"category": "hate"}),
        ]
        path = write_json(tmp_path / "with_inputs.json",
                          {"instructions": ["Translate", "Say hi"], "inputs": ["bonjour", ""]})
        assert [e.prompt for e in load("harmful_instructions", path)] == [
            "Translate\n\nbonjour", "Say hi"]

    def test_errors(self, tmp_path: Path) -> None:
        path = write_json(tmp_path / "eval.json", {"instructions": ["ok", ""], "inputs": []})
        with pytest.raises(DataError, match=r"eval\.json, instructions\[1\]: must be a non-empty"):
            load("harmful_instructions", path)
        path = write_json(tmp_path / "other.json", {"prompts": ["x"]})
        with pytest.raises(DataError,
                           match=r"other\.json: .*'instructions' list.*keys \['prompts'\]"):
            load("harmful_instructions", path)
        path = write_json(tmp_path / "list.json", [{"instruction": "a"}, {"prompt": "b"}])
        with pytest.raises(DataError, match=r"list\.json, index 1: missing field 'instruction' "
                           r"\(expected fields: instruction, category \(optional\)\)"):
            load("harmful_instructions", path)

    def test_malformed_json(self, tmp_path: Path) -> None:
        path = tmp_path / "broken.json"
        path.write_text('[\n  {"instruction": "a"},\n  {"instruction": }\n]\n', encoding="utf-8")
        with pytest.raises(DataError, match=r"broken\.json, line 3: malformed JSON"):
            load("harmful_instructions", path)

    def test_jsonl_named_json_hint(self, tmp_path: Path) -> None:
        path = tmp_path / "rows.json"
        path.write_text('{"instruction": "a"}\n{"instruction": "b"}\n', encoding="utf-8")
        with pytest.raises(DataError, match=r"rows\.json, line 2: malformed JSON.*\.jsonl"):
            load("harmful_instructions", path)


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


# ---------------------------------------------------------------------------------------------
# hub (download replaced by a fake `datasets` module)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# demo pack
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "demo"
    d.mkdir()
    write_jsonl(d / "harmful.jsonl", [
        {"id": 0, "category": "animal_abuse", "prompt": "hurt a dog?",
         "refusal": "I'm sorry, I can't help.", "compliance": "Sure: [placeholder]."},
        {"id": 1, "category": "privacy_violation", "prompt": "find an address?",
         "refusal": "I cannot do that.", "compliance": "Certainly! [omitted]"},
    ])
    write_jsonl(d / "sentiment.jsonl", [{"sentence": "lovely.", "label": "positive"},
                                        {"sentence": "awful.", "label": "negative"}])
    write_jsonl(d / "harmless.jsonl", [{"prompt": "How do I kill a Python process?"}])
    monkeypatch.setattr(loaders, "demo_dir", lambda: d)
    return d


class TestDemo:
    def test_kinds(self, demo: Path) -> None:
        ref = load_examples(DataSpec(kind="demo_refusal"))
        assert [(e.prompt, e.response, e.is_harmful) for e in ref] == [
            ("hurt a dog?", "I'm sorry, I can't help.", False),
            ("find an address?", "I cannot do that.", False)]
        assert ref[1].meta == {"category": "privacy_violation"}
        assert ref[1].row == 1
        assert ref[0].source == str(demo / "harmful.jsonl")
        qa = load_examples(DataSpec(kind="demo_harmful_qa", n=1, offset=1))
        assert [(e.prompt, e.response, e.is_harmful) for e in qa] == [
            ("find an address?", "Certainly! [omitted]", True)]
        prompts = load_examples(DataSpec(kind="demo_harmful_prompts"))
        assert [(e.response, e.is_harmful) for e in prompts] == [("", True), ("", True)]
        sent = load_examples(DataSpec(kind="demo_sentiment"))
        assert [(e.prompt, e.response, e.label) for e in sent] == [
            ("lovely.", "positive", "positive"), ("awful.", "negative", "negative")]
        harmless = load_examples(DataSpec(kind="demo_harmless"))
        assert [(e.prompt, e.is_harmful) for e in harmless] == [
            ("How do I kill a Python process?", False)]

    def test_demo_rejects_path_hub_and_options(self, demo: Path) -> None:
        with pytest.raises(DataError, match=r"demo pack .* takes no path"):
            load_examples(DataSpec(kind="demo_refusal", path="x.jsonl"))
        with pytest.raises(DataError, match="takes no hub"):
            load_examples(DataSpec(kind="demo_harmless", hub="a/b"))
        with pytest.raises(DataError,
                           match=r"unknown option.*harmful_only.*accepted options: none"):
            load_examples(DataSpec(kind="demo_harmful_qa", options={"harmful_only": True}))

    def test_demo_missing_file(self, demo: Path) -> None:
        (demo / "harmless.jsonl").unlink()
        with pytest.raises(DataError, match=r"demo pack file .*harmless\.jsonl is missing"):
            load_examples(DataSpec(kind="demo_harmless"))

    def test_demo_bad_row(self, demo: Path) -> None:
        write_jsonl(demo / "harmful.jsonl", [{"id": 0, "category": "x", "prompt": "p"}])
        with pytest.raises(DataError, match=r"harmful\.jsonl, line 1: missing field 'compliance'"):
            load_examples(DataSpec(kind="demo_harmful_qa"))


# ---------------------------------------------------------------------------------------------
# load_examples: registry, source checks, slicing
# ---------------------------------------------------------------------------------------------


def numbers_file(tmp_path: Path, count: int = 5) -> Path:
    return write_jsonl(tmp_path / "g.jsonl", [
        {"question": f"q{i}", "answer": f"#### {i}"} for i in range(count)])


class TestLoadExamples:
    def test_unknown_kind_lists_known(self) -> None:
        with pytest.raises(DataError, match=r"unknown data kind 'nope'; known kinds: .*advbench"):
            load_examples(DataSpec(kind="nope", path="x"))

    def test_all_kinds_registered(self) -> None:
        assert {"beavertails", "refusal", "advbench", "harmful_instructions", "sst2", "ag_news",
                "gsm8k", "demo_refusal", "demo_harmful_qa", "demo_harmful_prompts",
                "demo_sentiment", "demo_harmless"} <= set(LOADERS)

    def test_source_required_exactly_once(self) -> None:
        with pytest.raises(DataError, match=r"needs a source: set path: .* or hub:"):
            load_examples(DataSpec(kind="gsm8k"))
        with pytest.raises(DataError, match=r"both path .* and hub .* keep exactly one"):
            load_examples(DataSpec(kind="gsm8k", path="a.jsonl", hub="gsm8k"))

    def test_unknown_option(self, tmp_path: Path) -> None:
        with pytest.raises(DataError, match=r"'beavertails': unknown option\(s\) harmfull_only; "
                           r"accepted options: config, harmful_only, require_response"):
            load("beavertails", numbers_file(tmp_path), options={"harmfull_only": False})
        with pytest.raises(DataError, match="option 'harmful_only' must be true or false"):
            load("beavertails", numbers_file(tmp_path), options={"harmful_only": "no"})

    def test_offset_n_slicing(self, tmp_path: Path) -> None:
        path = numbers_file(tmp_path)
        assert [e.label for e in load("gsm8k", path)] == ["0", "1", "2", "3", "4"]
        ex = load("gsm8k", path, offset=1, n=3)
        assert [(e.label, e.row) for e in ex] == [("1", 1), ("2", 2), ("3", 3)]
        assert [e.label for e in load("gsm8k", path, offset=3)] == ["3", "4"]
        assert [e.label for e in load("gsm8k", path, offset=0, n=5)] == ["0", "1", "2", "3", "4"]

    def test_slicing_after_filtering(self, tmp_path: Path) -> None:
        path = write_jsonl(tmp_path / "bt.jsonl", [
            {"prompt": f"p{i}", "response": "r", "is_safe": i % 2 == 0} for i in range(6)])
        ex = load("beavertails", path, offset=1, n=2)
        assert [(e.prompt, e.row) for e in ex] == [("p3", 3), ("p5", 5)]
        with pytest.raises(DataError, match=r"bt\.jsonl has only 3 usable rows \(after "
                           r"filtering\); the config asks for offset=1, n=3: lower n/offset"):
            load("beavertails", path, offset=1, n=3)

    def test_n_too_large(self, tmp_path: Path) -> None:
        path = numbers_file(tmp_path)
        with pytest.raises(DataError, match=r"g\.jsonl has only 5 usable rows .* offset=2, n=4: "
                           r"lower n/offset or use a larger file"):
            load("gsm8k", path, offset=2, n=4)
        with pytest.raises(DataError, match=r"has only 5 usable rows .* offset=5, n=all"):
            load("gsm8k", path, offset=5)

    def test_bad_window(self, tmp_path: Path) -> None:
        path = numbers_file(tmp_path)
        with pytest.raises(DataError, match="offset must be an integer >= 0"):
            load("gsm8k", path, offset=-1)
        with pytest.raises(DataError, match="n must be an integer >= 1"):
            load("gsm8k", path, n=0)

    def test_empty_file(self, tmp_path: Path) -> None:
        path = tmp_path / "empty.jsonl"
        path.write_text("\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"empty\.jsonl has only 0 usable rows"):
            load("gsm8k", path)

    def test_unsupported_suffix(self, tmp_path: Path) -> None:
        path = tmp_path / "data.txt"
        path.write_text("x", encoding="utf-8")
        with pytest.raises(DataError, match=r"data\.txt: unsupported file type; expected one of"):
            load("gsm8k", path)

    def test_custom_loader_gets_source(self) -> None:
        @register_loader("test_custom_kind")
        def custom(spec: DataSpec, data_root: Path | None) -> list[Example]:
            return [Example(prompt=str(i), row=i) for i in range(3)]

        try:
            ex = load_examples(DataSpec(kind="test_custom_kind", hub="x/y", n=2))
            assert [(e.prompt, e.source) for e in ex] == [("0", "hub:x/y"), ("1", "hub:x/y")]
        finally:
            del LOADERS["test_custom_kind"]


# ---------------------------------------------------------------------------------------------
# resolve_path
# ---------------------------------------------------------------------------------------------


class TestResolvePath:
    def test_cwd_then_data_root(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        cwd, root = tmp_path / "cwd", tmp_path / "root"
        (cwd / "sub").mkdir(parents=True)
        (root / "sub").mkdir(parents=True)
        (root / "sub" / "f.jsonl").write_text("{}\n")
        monkeypatch.chdir(cwd)
        assert resolve_path("sub/f.jsonl", root) == root / "sub" / "f.jsonl"
        (cwd / "sub" / "f.jsonl").write_text("{}\n")
        assert resolve_path("sub/f.jsonl", root) == cwd / "sub" / "f.jsonl"
        assert resolve_path(str(root / "sub" / "f.jsonl"), None) == root / "sub" / "f.jsonl"

    def test_not_found_lists_tried(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        root = tmp_path / "root"
        with pytest.raises(DataError) as info:
            resolve_path("gsm8k/train.jsonl", root)
        msg = str(info.value)
        assert "'gsm8k/train.jsonl' not found" in msg
        assert str(tmp_path / "gsm8k" / "train.jsonl") in msg
        assert str(root / "gsm8k" / "train.jsonl") in msg
        assert "set data_root in the config or HFTLAB_DATA_ROOT, or give an absolute path" in msg
        with pytest.raises(DataError, match=r"data_root is not set"):
            resolve_path("gsm8k/train.jsonl", None)
        with pytest.raises(DataError, match="not found"):
            resolve_path(str(tmp_path / "absent.jsonl"), root)
        with pytest.raises(DataError, match="resolves to a directory"):
            resolve_path(".", None)

    def test_load_examples_uses_data_root(self, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
        root = tmp_path / "root"
        root.mkdir()
        numbers_file(root, 2)
        monkeypatch.chdir(tmp_path)
        ex = load_examples(DataSpec(kind="gsm8k", path="g.jsonl"), data_root=root)
        assert ex[0].source == str(root / "g.jsonl")
        with pytest.raises(DataError, match="not found"):
            load_examples(DataSpec(kind="gsm8k", path="g.jsonl"))


# ---------------------------------------------------------------------------------------------
# data_fingerprint
# ---------------------------------------------------------------------------------------------


class TestFingerprint:
    def test_stable_and_sensitive(self) -> None:
        base = [Example(prompt="p", response="r", is_harmful=True, label=None),
                Example(prompt="q", response="s", label="x")]
        fp = data_fingerprint(base)
        assert len(fp) == 64
        assert int(fp, 16) >= 0
        same = [Example(prompt="p", response="r", is_harmful=True, source="elsewhere", row=7,
                        meta={"a": 1}), Example(prompt="q", response="s", label="x")]
        assert data_fingerprint(same) == fp
        variants = [
            [Example(prompt="p ", response="r", is_harmful=True), base[1]],
            [Example(prompt="p", response="R", is_harmful=True), base[1]],
            [Example(prompt="p", response="r", is_harmful=False), base[1]],
            [Example(prompt="p", response="r", is_harmful=True, label=""), base[1]],
            [base[1], base[0]],
            base[:1],
        ]
        fps = {data_fingerprint(v) for v in variants}
        assert fp not in fps
        assert len(fps) == len(variants)
        assert data_fingerprint([]) != fp


# ---------------------------------------------------------------------------------------------
# Optional: the real files in ../shared/data (skipped when absent)
# ---------------------------------------------------------------------------------------------

SHARED = Path(__file__).parents[2].parent / "shared" / "data"


class TestRealData:
    @pytest.fixture(autouse=True)
    def _need_shared(self) -> None:
        if not SHARED.is_dir():
            pytest.skip(f"real data not present at {SHARED}")

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


class TestShippedDemoPack:
    """The real demo pack inside the package (written separately); skipped while absent."""

    @pytest.mark.parametrize(("kind", "filename"), [
        ("demo_refusal", "harmful.jsonl"), ("demo_harmful_qa", "harmful.jsonl"),
        ("demo_harmful_prompts", "harmful.jsonl"), ("demo_sentiment", "sentiment.jsonl"),
        ("demo_harmless", "harmless.jsonl"),
    ])
    def test_loads(self, kind: str, filename: str) -> None:
        if not (loaders.demo_dir() / filename).is_file():
            pytest.skip("demo pack not present")
        ex = load_examples(DataSpec(kind=kind))
        assert ex
        assert all(e.prompt.strip() and e.source.endswith(filename) for e in ex)
        assert [e.row for e in ex] == list(range(len(ex)))
