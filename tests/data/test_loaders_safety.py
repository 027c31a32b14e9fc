"""Tests for hftlab.data.loaders.safety: beavertails, refusal, advbench, harmful_instructions."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from loader_helpers import BT_CATS, load, write_json, write_jsonl

from hftlab.data.loaders import load_examples
from hftlab.data.records import DataError, Example
from hftlab.data.spec import DataSpec

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

    def test_answers_only_and_with_input_select_a_benign_share(self, tmp_path: Path) -> None:
        rows = [
            {"instruction": "Classify", "input": "a fine film", "output": "Positive"},
            {"instruction": "Set a reminder", "input": "", "output": "I cannot set reminders."},
            {"instruction": "Name a colour", "input": "", "output": "Blue."},
            {"instruction": "Translate", "input": "hola", "output": "I'm sorry, I cannot."},
            {"instruction": "Summarise", "input": "long text", "output": "Short text."},
        ]
        path = write_json(tmp_path / "alpaca.json", rows)
        answers = load("refusal", path, options={"answers_only": True})
        assert [e.row for e in answers] == [0, 2, 4]
        with_input = load("refusal", path, options={"with_input": True})
        assert [e.row for e in with_input] == [0, 3, 4]
        both = load("refusal", path, n=1, offset=1,
                    options={"answers_only": True, "with_input": True})
        assert [(e.prompt, e.row) for e in both] == [("Summarise\n\nlong text", 4)]
        with pytest.raises(DataError, match="refusals_only and answers_only exclude each other"):
            load("refusal", path, options={"answers_only": True, "refusals_only": True})
        kept = load("refusal", path, options={"exclude": ["i CANNOT", "blue"]})
        assert [e.row for e in kept] == [0, 4]
        with pytest.raises(DataError, match="option exclude must be a list of non-empty strings"):
            load("refusal", path, options={"exclude": "as an AI"})

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
