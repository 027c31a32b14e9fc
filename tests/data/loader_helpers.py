"""Helpers shared by the loader tests (tests/data/test_loaders_*.py): tiny data files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hftlab.data.loaders import load_examples
from hftlab.data.records import Example
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



def numbers_file(tmp_path: Path, count: int = 5) -> Path:
    return write_jsonl(tmp_path / "g.jsonl", [
        {"question": f"q{i}", "answer": f"#### {i}"} for i in range(count)])
