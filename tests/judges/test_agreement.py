"""`hftlab judge agree`: a second judge re-scores saved completions; counts by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hftlab.cli import main
from hftlab.config import ConfigError
from hftlab.judges.agreement import judge_agreement
from hftlab.judges.keyword import KeywordJudge

REFUSAL = "I'm sorry, but I can't help with that."
ANSWER = "Placeholder answer text."


def write_run(folder: Path, rows: list[tuple[str, bool]]) -> Path:
    """A finished run whose harmful completions carry the run judge's verdicts."""
    (folder / "eval" / "final").mkdir(parents=True)
    (folder / "config.yaml").write_text("seed: 0\n")
    (folder / "metrics.json").write_text(json.dumps({"judge": {"name": "stored"}}))
    (folder / "eval" / "final" / "metrics.json").write_text("{}")  # not a run folder
    lines = [{"set": "harmful", "row": i, "prompt": f"p{i}", "completion": c, "flagged": f}
             for i, (c, f) in enumerate(rows)]
    lines.append({"set": "sst2", "row": 0, "prompt": "x", "completion": "positive",
                  "correct": True})
    (folder / "eval" / "completions.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_counts_match_a_hand_count(tmp_path) -> None:
    # run a: the stored judge agrees with the keyword judge on 2 of 3 rows
    write_run(tmp_path / "runs" / "a", [(ANSWER, True), (REFUSAL, False), (ANSWER, False)])
    # run b: keyword flags the answer; the stored judge flagged the refusal
    write_run(tmp_path / "runs" / "b", [(REFUSAL, True), (ANSWER, True)])
    result = judge_agreement(tmp_path / "runs", KeywordJudge())
    assert result["runs"] == 2 and result["n"] == 5
    # keyword verdicts: a = [T, F, T], b = [F, T]; stored: a = [T, F, F], b = [T, T]
    assert (result["both_flag"], result["only_judge"], result["only_reference"],
            result["neither"]) == (2, 1, 1, 1)
    assert result["agreement"] == pytest.approx(3 / 5)
    assert result["reference_hs"] == 60.0 and result["judge_hs"] == 60.0
    # kappa: p_o = 0.6, p_e = 0.6*0.6 + 0.4*0.4 = 0.52
    assert result["kappa"] == pytest.approx((0.6 - 0.52) / (1 - 0.52), abs=1e-4)
    per_run = {Path(r["run"]).name: r for r in result["per_run"]}
    assert per_run["a"]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert per_run["b"]["reference_hs"] == 100.0 and per_run["b"]["judge_hs"] == 50.0


def test_cli_writes_json_and_never_prints_completions(tmp_path, capsys) -> None:
    run = write_run(tmp_path / "run", [(ANSWER, True), (REFUSAL, False)])
    out = tmp_path / "agree.json"
    assert main(["judge", "agree", str(run), "--judge", "keyword", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "agreement 100.0%" in printed and ANSWER not in printed
    assert json.loads(out.read_text())["n"] == 2


def test_folder_without_runs_is_one_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="no run folder"):
        judge_agreement(tmp_path, KeywordJudge())
    assert main(["judge", "agree", str(tmp_path), "--judge", "keyword"]) == 2
    assert "no run folder" in capsys.readouterr().err
