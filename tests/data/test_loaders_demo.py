"""Tests for hftlab.data.loaders.demo: the demo_* kinds on a temporary pack, and the shipped one."""

from __future__ import annotations

from pathlib import Path

import pytest
from loader_helpers import write_jsonl

from hftlab.data.loaders import demo as demo_module
from hftlab.data.loaders import load_examples
from hftlab.data.records import DataError
from hftlab.data.spec import DataSpec


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
    monkeypatch.setattr(demo_module, "demo_dir", lambda: d)
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



class TestShippedDemoPack:
    """The real demo pack inside the package (written separately); skipped while absent."""

    @pytest.mark.parametrize(("kind", "filename"), [
        ("demo_refusal", "harmful.jsonl"), ("demo_harmful_qa", "harmful.jsonl"),
        ("demo_harmful_prompts", "harmful.jsonl"), ("demo_sentiment", "sentiment.jsonl"),
        ("demo_harmless", "harmless.jsonl"),
    ])
    def test_loads(self, kind: str, filename: str) -> None:
        if not (demo_module.demo_dir() / filename).is_file():
            pytest.skip("demo pack not present")
        ex = load_examples(DataSpec(kind=kind))
        assert ex
        assert all(e.prompt.strip() and e.source.endswith(filename) for e in ex)
        assert [e.row for e in ex] == list(range(len(ex)))
