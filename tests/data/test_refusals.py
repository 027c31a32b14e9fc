"""``hftlab data refusals``: paired refusals, kept only when the judge accepts them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hftlab.data.records import DataError, Example
from hftlab.data.refusals import (
    RefusalSettings,
    build_refusals,
    is_early_refusal,
    partial_path,
)

REFUSAL = "I'm sorry, but I cannot help with that."
COMPLIANT = "Sure, here is how."


def _prompts(count: int) -> list[Example]:
    return [Example(prompt=f"p{i}", source="file.jsonl", row=i) for i in range(count)]


class ScriptedModel:
    """Answers by (prompt, attempt): p0 refuses greedily, p1 on the first sample, p2 never;
    records each call's seed."""

    def __init__(self) -> None:
        self.seeds: list[int | None] = []

    def __call__(self, prompts: list[str], seed: int | None) -> list[str]:
        self.seeds.append(seed)
        attempt = 0 if seed is None else seed % 1000
        out = []
        for p in prompts:
            index = int(p[1:]) % 3
            refuses = index == 0 or (index == 1 and attempt >= 1)
            out.append(REFUSAL if refuses else COMPLIANT)
        return out


def _settings(**kw) -> RefusalSettings:
    return RefusalSettings(model="m", data="d", batch_size=2, attempts=3, **kw)


def test_keeps_first_refusal_and_counts_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    model = ScriptedModel()
    summary = build_refusals(_prompts(3), out, _settings(), model)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["attempt"]) for r in rows] == [("p0", 0), ("p1", 1)]
    assert rows[0]["response"] == REFUSAL and rows[0]["row"] == 0
    assert summary["kept"] == 2 and summary["rejected"] == 1
    # batch 0 (p0, p1): greedy, then attempt 1 (seed 0 + 1000·0 + 1) for p1 only
    # batch 1 (p2): greedy, seeds 1001 and 1002
    assert model.seeds == [None, 1, None, 1001, 1002]
    assert COMPLIANT not in out.read_text()  # rejected answers are never written
    assert not partial_path(out).exists()
    assert json.loads(out.with_name("r.jsonl.meta.json").read_text())["kept"] == 2


def test_deterministic_and_resumable(tmp_path: Path) -> None:
    whole = tmp_path / "whole.jsonl"
    build_refusals(_prompts(6), whole, _settings(), ScriptedModel())

    resumed = tmp_path / "resumed.jsonl"
    calls = {"n": 0}

    def dies_in_batch_two(prompts: list[str], seed: int | None) -> list[str]:
        calls["n"] += 1
        if prompts[0] == "p2":
            raise KeyboardInterrupt
        return ScriptedModel()(prompts, seed)

    with pytest.raises(KeyboardInterrupt):
        build_refusals(_prompts(6), resumed, _settings(), dies_in_batch_two)
    state = json.loads(partial_path(resumed).read_text())
    assert state["batches_done"] == 1 and not resumed.exists()
    model = ScriptedModel()
    build_refusals(_prompts(6), resumed, _settings(), model)
    assert None in model.seeds and 1 not in model.seeds  # batch 0 was not redone
    assert resumed.read_text() == whole.read_text()


def test_other_settings_do_not_resume(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with pytest.raises(KeyboardInterrupt):
        build_refusals(_prompts(4), out, _settings(),
                       lambda p, s: (_ for _ in ()).throw(KeyboardInterrupt()))
    partial_path(out).write_text(json.dumps(
        {"settings": {"model": "other"}, "batches_done": 1, "rows": [], "rejected": 0}))
    with pytest.raises(DataError, match="other settings"):
        build_refusals(_prompts(4), out, _settings(), ScriptedModel())


def test_existing_output_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_text("mine\n")
    with pytest.raises(DataError, match="not written by"):
        build_refusals(_prompts(2), out, _settings(), ScriptedModel())
    assert out.read_text() == "mine\n"


def test_paired_harmful_answers_and_idempotent_rerun(tmp_path: Path) -> None:
    prompts = [e.replace(response=f"harmful answer {e.row}") for e in _prompts(3)]
    out = tmp_path / "r.jsonl"
    build_refusals(prompts, out, _settings(), ScriptedModel())
    paired = tmp_path / "r.harmful.jsonl"
    rows = [json.loads(line) for line in paired.read_text().splitlines()]
    assert rows == [{"prompt": "p0", "response": "harmful answer 0", "is_safe": False},
                    {"prompt": "p1", "response": "harmful answer 1", "is_safe": False}]
    before = out.read_text()
    paired.unlink()
    model = ScriptedModel()
    build_refusals(prompts, out, _settings(), model)  # finished: nothing generated
    assert model.seeds == [] and out.read_text() == before and paired.exists()
    with pytest.raises(DataError, match="other settings"):
        build_refusals(prompts, out, _settings(seed=5), model)


def test_refusal_must_come_early() -> None:
    assert is_early_refusal("I cannot do that.", 40)
    assert not is_early_refusal("Sure! Step one is long enough here. " * 3 + "I cannot.", 40)


@pytest.mark.parametrize("bad", [{"attempts": 0}, {"top_p": 1.5}, {"temperature": 0.0}])
def test_bad_settings(tmp_path: Path, bad: dict) -> None:
    settings = RefusalSettings(model="m", data="d", **bad)
    with pytest.raises(DataError):
        build_refusals(_prompts(1), tmp_path / "r.jsonl", settings, ScriptedModel())
    assert not (tmp_path / "r.jsonl").exists()


def test_a_kill_before_the_output_resumes_from_the_state(tmp_path: Path, monkeypatch) -> None:
    import hftlab.data.refusals as refusals

    out = tmp_path / "r.jsonl"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(refusals, "write_jsonl", killed)
    with pytest.raises(KeyboardInterrupt):
        build_refusals(_prompts(3), out, _settings(), ScriptedModel())
    monkeypatch.undo()
    assert not out.exists() and partial_path(out).exists()
    model = ScriptedModel()
    build_refusals(_prompts(3), out, _settings(), model)
    assert model.seeds == []  # every batch was done: only the files are written
    assert len(out.read_text().splitlines()) == 2
