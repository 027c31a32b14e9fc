"""The ``mix`` data kind: several sources as one set."""

from __future__ import annotations

from pathlib import Path

import pytest

from hftlab.data.loaders import load_examples
from hftlab.data.records import DataError
from hftlab.data.spec import DataSpec
from tests.data.loader_helpers import write_json, write_jsonl


def _sources(tmp_path: Path) -> list[dict]:
    refusals = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": f"bad {i}", "response": f"I cannot help with {i}."} for i in range(4)])
    benign = write_json(tmp_path / "b.json", [
        {"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(5)])
    return [{"kind": "refusal", "path": str(refusals), "offset": 1, "n": 2},
            {"kind": "refusal", "path": str(benign), "n": 3}]


def test_rows_of_each_source_in_order(tmp_path: Path) -> None:
    rows = load_examples(DataSpec(kind="mix", options={"sources": _sources(tmp_path)}))
    assert [r.prompt for r in rows] == ["bad 1", "bad 2", "task 0", "task 1", "task 2"]
    assert rows[0].source.endswith("r.jsonl") and rows[-1].source.endswith("b.json")


def test_mix_window_applies_to_the_whole(tmp_path: Path) -> None:
    spec = DataSpec(kind="mix", offset=1, n=3, options={"sources": _sources(tmp_path)})
    assert [r.prompt for r in load_examples(spec)] == ["bad 2", "task 0", "task 1"]


@pytest.mark.parametrize(("sources", "message"), [
    ([], "non-empty list"),
    (["not a spec"], r"sources\[0\] must be a data spec"),
    ([{"path": "x.json"}], "needs a 'kind'"),
    ([{"kind": "mix", "options": {"sources": []}}], "cannot itself be a mix"),
])
def test_bad_sources_fail_clearly(sources: list, message: str) -> None:
    with pytest.raises(DataError, match=message):
        load_examples(DataSpec(kind="mix", options={"sources": sources}))


def test_a_mix_takes_no_path(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        load_examples(DataSpec(kind="mix", path="x.json", options={"sources": []}))


def test_too_few_rows_names_the_mix(tmp_path: Path) -> None:
    spec = DataSpec(kind="mix", n=50, options={"sources": _sources(tmp_path)})
    with pytest.raises(DataError, match=r"the mix \(options.sources\) has only 5 usable rows"):
        load_examples(spec)
